"""The shape docs/design.md promises a newcomer: no module of the packages over 400 lines."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.code_shape import MODULE_LIMIT, PACKAGES, function_lengths, modules

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_module_stays_within_the_limit() -> None:
    paths = modules(ROOT)
    assert {path.relative_to(ROOT).parts[0] for path in paths} == set(PACKAGES)  # every package was read
    too_long = {str(path.relative_to(ROOT)): lines for path in paths
                if (lines := len(path.read_text(encoding="utf-8").splitlines())) > MODULE_LIMIT}
    assert too_long == {}, f"split these modules (docs/design.md keeps each under {MODULE_LIMIT} lines): {too_long}"


def test_function_lengths_are_measured_from_def_to_last_line(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def short():\n    return 1\n\n\nclass C:\n    def longer(self):\n        x = 1\n\n"
                      "        return x\n", encoding="utf-8")

    assert sorted(function_lengths(source)) == [(2, f"{source}:1 short"), (4, f"{source}:6 longer")]
