"""How submitted code is shown to the site admin: safe for a terminal, long numeric literals summarised.

A plan literal can hold long vectors of numbers (the model spec's ``centre`` and ``head_init``: one
float per hidden unit, over a thousand lines once printed). Nobody reads them number by number, and
they bury the code an admin must read. ``render_listing`` shows each literal of more than
``MAX_INLINE_NUMBERS`` numbers as one line: its shape, its L2 norm and a digest of its exact values,
with the full literal one flag away (``fedsite admin show --full``). Only literals made of number
constants are summarised (never a name, call or string), so no code is hidden; the code hash the
admin approves is still the hash of the exact submitted source (``policies.review.code_hash``).

The digest is ``vector_digest``: the first 16 hex digits of the SHA-256 of the values as compact JSON
(``json.dumps(values, separators=(",", ":"))``, the form of ``policies.durable.canonical_json`` for a
list of numbers), so a researcher can compute it from the plan they sent:
``hashlib.sha256(json.dumps(plan["model"]["centre"], separators=(",", ":")).encode()).hexdigest()[:16]``.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

MAX_INLINE_NUMBERS = 8  # a literal of more numbers than this is summarised
DIGEST_HEX = 32  # 128 bits: a collision of two different vectors is out of reach

# Where the plan's known long vectors come from (the public-start recipe, models.with_public_start). The plan does not
# record the public texts themselves, nor their digest: the admin is told so.
_ORIGINS = {
    "plan['model']['centre']": "the mean-pooled embedding of the researcher's public texts (with_public_start)",
    "plan['model']['head_init']['weight']": "label-prompt rows, scaled on the centred public texts (prompt_head)",
    "plan['model']['head_init']['bias']": "the label-prompt head's biases (prompt_head)",
}
_NOT_RECORDED = "the plan records neither the texts nor their digest"

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` safe for an admin's terminal: control characters (escape sequences that clear the screen,
    move the cursor or hide text, bidirectional overrides) shown as ``\\x1b``-style escapes; newlines and
    tabs kept. A request or an audit record is the researcher's text; it must not redraw the review."""
    return _CONTROL.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), text)


def vector_digest(values: Any) -> str:
    """First 16 hex digits of the SHA-256 of ``values`` (nested lists of numbers) as compact JSON."""
    text = json.dumps(_as_lists(values), separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:DIGEST_HEX]


@dataclass(frozen=True)
class VectorSummary:
    """One long numeric literal of the submitted code, as the admin sees it."""

    where: str  # the literal's place, e.g. plan['model']['centre'] (or "line N" outside a dict)
    span: tuple[int, int, int, int]  # first line, column, last line, end column (1-based lines, byte columns)
    shape: tuple[int, ...]  # (384,) for a vector, (2, 384) for a matrix
    norm: float  # L2 (Frobenius) norm of all its numbers
    digest: str  # vector_digest of its exact values

    def inline(self) -> str:
        """What stands in the listing in place of the literal."""
        shape = " x ".join(map(str, self.shape))
        return f"<{shape} numbers, L2 norm {self.norm:.6g}, sha256 {self.digest}>"

    def describe(self) -> list[str]:
        """The lines of the table under the listing: place, lines and summary, then origin if known."""
        first, _, last, _ = self.span
        lines = f"line {first}" if first == last else f"lines {first}-{last}"
        origin = _ORIGINS.get(self.where)
        return [f"  {self.where} ({lines}): {self.inline()[1:-1]}",
                *([f"      from: {origin}; {_NOT_RECORDED}"] if origin else [])]


def _number(node: ast.AST) -> bool:
    """A number constant, possibly signed (``-0.5`` parses as a unary minus on 0.5); never a bool."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        node = node.operand
    return isinstance(node, ast.Constant) and type(node.value) in (int, float)


def _shape(node: ast.AST) -> tuple[int, ...] | None:
    """The shape of a rectangular list or tuple literal of numbers, else None."""
    if not isinstance(node, ast.List | ast.Tuple) or not node.elts:
        return None
    if all(_number(element) for element in node.elts):
        return (len(node.elts),)
    shapes = {_shape(element) for element in node.elts}
    inner = shapes.pop() if len(shapes) == 1 else None
    return (len(node.elts), *inner) if inner is not None else None


def _as_lists(values: Any) -> Any:
    return [_as_lists(value) for value in values] if isinstance(values, list | tuple) else values


def _flat(values: Any) -> Iterator[float]:
    for value in values:
        if isinstance(value, list | tuple):
            yield from _flat(value)
        else:
            yield float(value)


def _long_numeric(node: ast.AST) -> tuple[int, ...] | None:
    """The shape of a list or tuple literal of numbers only, with more than MAX_INLINE_NUMBERS of them
    (summarised); None for any other node."""
    shape = _shape(node)
    return shape if shape is not None and math.prod(shape) > MAX_INLINE_NUMBERS else None


def _walk(tree: ast.AST, *, stop: Callable[[ast.AST], object]) -> Iterator[tuple[ast.AST, str]]:
    """(node, its place) for every node in source order, the place named by dict keys and list indices
    from ``plan = ...``, not below a node ``stop`` accepts. Iterative: deeply nested code must not exhaust
    the stack of the admin's review; and each node is visited once, so a long listing costs linear time."""
    stack: list[tuple[ast.AST, str]] = [(tree, "")]
    while stack:
        node, where = stack.pop()
        yield node, where
        if not stop(node):
            stack.extend(reversed(list(_children(node, where))))


def _children(node: ast.AST, where: str) -> Iterator[tuple[ast.AST, str]]:
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
        yield node.targets[0], ""
        yield node.value, node.targets[0].id
    elif isinstance(node, ast.Dict) and where:
        for key, value in zip(node.keys, node.values, strict=True):
            if key is not None:
                yield key, ""
            yield value, f"{where}[{key.value!r}]" if isinstance(key, ast.Constant) else ""
    else:
        for index, child in enumerate(ast.iter_child_nodes(node)):
            yield child, f"{where}[{index}]" if where and isinstance(node, ast.List | ast.Tuple) else ""


def summarise_vectors(source: str) -> tuple[VectorSummary, ...]:
    """Every outermost literal of more than MAX_INLINE_NUMBERS numbers in ``source``, in source order.

    Code that does not parse has none (the review reports it as unparsable and shows it in full)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError):
        return ()
    found: list[VectorSummary] = []
    summarised: set[int] = set()
    # _walk asks ``stop`` after the loop body ran for a node, so a summarised literal's rows are not visited
    for node, where in _walk(tree, stop=lambda visited: id(visited) in summarised):
        shape = _long_numeric(node)
        if shape is None or not isinstance(node, ast.List | ast.Tuple):
            continue
        summarised.add(id(node))
        span = (node.lineno, node.col_offset, node.end_lineno or node.lineno, node.end_col_offset or 0)
        values = ast.literal_eval(node)  # numbers only: _shape checked every leaf
        norm = math.sqrt(math.fsum(value * value for value in _flat(values)))
        found.append(VectorSummary(where or f"line {node.lineno}", span, shape, norm, vector_digest(values)))
    return tuple(sorted(found, key=lambda summary: summary.span))


def render_listing(source: str, *, full: bool = False) -> tuple[list[str], list[str]]:
    """(the code as the admin reads it, the table of what it summarises): long numeric literals are
    summarised unless ``full`` (then the table is empty).

    Column offsets in ``ast`` count UTF-8 bytes, so each line is spliced as bytes."""
    summaries = () if full else summarise_vectors(source)
    lines = source.replace("\r\n", "\n").replace("\r", "\n").rstrip().split("\n")
    for summary in reversed(summaries):
        line, col, end_line, end_col = summary.span
        head, tail = lines[line - 1].encode()[:col], lines[end_line - 1].encode()[end_col:]
        lines[line - 1: end_line] = [(head + summary.inline().encode() + tail).decode(errors="replace")]
    if not summaries:
        return lines, []
    header = [f"{len(summaries)} long numeric literal{'s' if len(summaries) > 1 else ''} summarised above; "
              "`fedsite admin show --full REQUEST` prints them",
              "(sha256: the first 16 hex digits of the SHA-256 of the values as JSON, json.dumps(values, "
              "separators=(',', ':'))):"]
    return lines, [*header, *(line for summary in summaries for line in summary.describe())]
