"""The shape of the code a newcomer must read: module sizes and function lengths.

    python bench/code_shape.py            # the packages (tests and bench aside)
    python bench/code_shape.py --top 15   # and the longest modules and functions

Lines are physical lines of the file (blank lines and docstrings included), as `wc -l` counts them; a
function's length runs from its `def` (decorators aside) to its last line.
"""

from __future__ import annotations

import argparse
import ast
import statistics
from pathlib import Path

PACKAGES = ("models", "policies", "datasites", "researcher", "fedsite")
MODULE_LIMIT = 400


def modules(root: Path) -> list[Path]:
    return sorted(path for package in PACKAGES if (root / package).is_dir()
                  for path in (root / package).rglob("*.py"))


def function_lengths(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [(node.end_lineno - node.lineno + 1, f"{path}:{node.lineno} {node.name}")
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno is not None]


def percentile(values: list[int], share: float) -> float:
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--top", type=int, default=5, help="list this many of the longest modules and functions")
    args = parser.parse_args()
    paths = modules(args.root)
    sizes = sorted(((len(p.read_text(encoding="utf-8").splitlines()), p.relative_to(args.root)) for p in paths),
                   reverse=True)
    functions = sorted((length, name.replace(str(args.root) + "/", ""))
                       for p in paths for length, name in function_lengths(p))
    lengths = [length for length, _ in functions]
    over = [f"{path} ({lines})" for lines, path in sizes if lines > MODULE_LIMIT]
    print(f"modules: {len(sizes)} in {', '.join(PACKAGES)}; {sum(s for s, _ in sizes):,} lines; largest "
          f"{sizes[0][0]} ({sizes[0][1]}); over {MODULE_LIMIT} lines: {', '.join(over) if over else 'none'}")
    print(f"functions: {len(lengths)}; length median {statistics.median(lengths):g}, "
          f"90th percentile {percentile(lengths, 0.9):g}, longest {lengths[-1]} lines")
    print(f"longest modules: {'; '.join(f'{path} {lines}' for lines, path in sizes[: args.top])}")
    print(f"longest functions: {'; '.join(f'{name} {length}' for length, name in functions[::-1][: args.top])}")


if __name__ == "__main__":
    main()
