"""Static review of a researcher's submitted training function, shown to the site admin.

syft 0.9.5 runs approved code with plain ``exec`` in the server process, without a sandbox: it can
read files, the environment (including ``SERVER_PRIVATE_KEY``) and start processes (docs/syft.md,
"Policies, approval and execution"). The admin's approval is the only gate, so this module makes it sharp: it parses
the source with ``ast`` (never executing, importing or compiling it to bytecode) and lists every place
where the code reaches outside the packages a training function needs.

Notes
-----
The analysis is deliberately conservative and flow-insensitive: an import or an assignment anywhere
binds its name everywhere, a name that *may* refer to something dangerous is flagged, and merely
referring to a dangerous function counts (``f = os.system`` is flagged on that line, before any call).
Aliasing therefore does not evade it: ``import os as o``, ``from os import environ as e``,
``o = os``, ``from subprocess import *``, ``__import__("os")``, ``importlib.import_module("os")``,
``getattr(os, "environ")``, ``sys.modules["os"]`` and modules reached through an allowed package
(``torch.serialization.os``) all resolve to the real name. What cannot be resolved statically
(``getattr`` with a computed name, ``eval``, ``globals()``, dunder attributes) is itself a finding.

A "clean" verdict means no finding, not proof of safety: the allowed packages can do a lot (e.g.
``transformers`` reads model files in ``from_pretrained``). It tells the admin there is nothing
here beyond ordinary training code to read for.
"""

from __future__ import annotations

import ast
import builtins
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Literal

from policies.review_render import VectorSummary, printable, summarise_vectors
from policies.review_rules import (
    ATTRIBUTE_HINTS,
    DUNDER_IN_TEXT,
    ESCAPE_DUNDERS,
    HARMLESS_DUNDERS,
    INTROSPECTION_ATTRIBUTES,
    REMOTE_CODE_WHY,
    REROOTED_MODULES,
    RULES,
    Category,
)

__all__ = [
    "ALLOWED_MODULES", "ALLOWED_PACKAGES", "Category", "CodeReview", "CodeReviewError", "Finding", "VectorSummary",
    "code_hash", "printable", "review_code", "summarise_vectors",
]

# Top-level packages a training function may import. `policies` is the site's own package;
# `__future__` only switches compiler features.
ALLOWED_PACKAGES = frozenset(
    {
        "torch", "transformers", "opacus", "peft", "numpy", "math", "collections", "dataclasses",
        "typing", "functools", "itertools", "policies", "__future__",
    }
)


# Modules of the Fedsite distribution the site itself installed, outside the packages above: the
# researcher cannot change the site's copy, so code may build its model with them.
ALLOWED_MODULES = frozenset({"models"})


class CodeReviewError(ValueError):
    """The submitted code cannot be reviewed (it does not parse)."""


@dataclass(frozen=True)
class Finding:
    """One place where the code reaches outside what training needs."""

    category: Category
    line: int  # 1-based line in the submitted source
    snippet: str  # that source line, stripped (shortened past 120 characters)
    detail: str  # "<resolved name>: <why it matters>"


@dataclass(frozen=True)
class CodeReview:
    """What the admin sees before approving a request."""

    code_sha256: str  # code_hash(source): the value that approval binds to
    imports: tuple[str, ...]  # imported module names, in order of first appearance
    findings: tuple[Finding, ...]  # ordered by line, then category
    verdict: Literal["clean", "flagged"]  # "clean" iff there are no findings

    def __post_init__(self) -> None:
        expected = "flagged" if self.findings else "clean"
        if self.verdict != expected:
            raise ValueError(f"verdict must be {expected!r} with {len(self.findings)} findings, got {self.verdict!r}")

    def render_text(self) -> str:
        """Plain text for the CLI and notebooks."""
        count = len(self.findings)
        lines = [
            f"code review: {self.verdict.upper()} ({count} finding{'' if count == 1 else 's'})",
            f"code sha256: {self.code_sha256}",
            f"imports:     {', '.join(self.imports) or '(none)'}",
        ]
        for finding in self.findings:
            lines.append(f"  line {finding.line:<4} {finding.category.value:<13} {finding.detail}")
            lines.append(f"{'':<12}| {finding.snippet}")
        return "\n".join(lines)


def code_hash(source: str) -> str:
    """The canonical hash of submitted code, bound at approval and checked at every execution.

    SHA-256 (lowercase hex) of the UTF-8 encoding of ``source`` after replacing CRLF and lone CR
    by LF. Nothing else is normalised: no stripping, no dedenting, no Unicode normalisation, no
    removal of comments or blank lines. Line endings are the one exception because they can change
    in transit (an editor, git's autocrlf, an HTTP form) while Python reads all three as the same
    program. Any other change, even one space or one character of a comment, changes the hash, so
    "the code that runs is the code the admin read" is checked byte for byte and never depends on
    our judgement of which changes are harmless.
    """
    if not isinstance(source, str):
        raise TypeError(f"source must be str, got {type(source).__name__}")
    normalised = source.replace("\r\n", "\n").replace("\r", "\n")
    return hashlib.sha256(normalised.encode("utf-8")).hexdigest()


def _is_dunder(name: str) -> bool:
    return len(name) > 4 and name.startswith("__") and name.endswith("__")


def _matches(pattern: str, name: str) -> bool:
    return fnmatchcase(name, pattern) or fnmatchcase(name, pattern + ".*")


def _literal_str(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _import_name(node: ast.ImportFrom) -> str:
    return "." * node.level + (node.module or "")


class _Reviewer:
    """One pass over one parsed source. Use ``review_code``."""

    def __init__(self, source: str, tree: ast.Module) -> None:
        # ast counts lines at \n, \r\n and \r only (str.splitlines also splits at \f, \u2028, ...)
        self.lines = source.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        self.tree = tree
        self.aliases: dict[str, set[str]] = {}  # local name -> dotted names it may refer to
        self.star_modules: set[str] = set()  # modules imported with `from m import *`
        self.imports: dict[str, tuple[int, int]] = {}  # module -> (line, column) of its first import
        self.findings: dict[tuple[Category, int, str], Finding] = {}
        self.parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    # --- name resolution ---------------------------------------------------------------------

    def _bind(self, name: str, targets: Iterable[str]) -> bool:
        known = self.aliases.setdefault(name, set())
        before = len(known)
        known.update(targets)
        return len(known) != before

    def collect_aliases(self) -> None:
        """Imports bind names; then assignments of resolvable values, until nothing changes."""
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    local = alias.asname or alias.name.split(".")[0]
                    self._bind(local, [alias.name if alias.asname else local])
            elif isinstance(node, ast.ImportFrom):
                module = _import_name(node)
                for alias in node.names:
                    if alias.name == "*":
                        self.star_modules.add(module)
                    else:
                        self._bind(alias.asname or alias.name, [f"{module}.{alias.name}"])
        changed, rounds = True, 0
        while changed and rounds < 20:  # each round binds a longer chain; 20 is far beyond real code
            changed = any([self._bind_assignment(node) for node in ast.walk(self.tree)])
            rounds += 1

    def _bind_assignment(self, node: ast.AST) -> bool:
        pairs: list[tuple[ast.expr, ast.expr]] = []
        if isinstance(node, ast.Assign):
            pairs = [(target, node.value) for target in node.targets]
        elif isinstance(node, ast.AnnAssign | ast.NamedExpr) and node.value is not None:
            pairs = [(node.target, node.value)]
        changed = False
        while pairs:
            target, value = pairs.pop()
            if isinstance(target, ast.Tuple | ast.List) and isinstance(value, ast.Tuple | ast.List):
                pairs.extend(zip(target.elts, value.elts, strict=False))
            elif isinstance(target, ast.Name):
                changed |= self._bind(target.id, self.resolve(value))
        return changed

    def resolve(self, node: ast.AST) -> list[str]:
        """Dotted names ``node`` may evaluate to (empty if it cannot be resolved statically)."""
        if isinstance(node, ast.Name):
            found = set(self.aliases.get(node.id, ()))
            if hasattr(builtins, node.id):
                found.add(f"builtins.{node.id}")
            found.update(f"{module}.{node.id}" for module in self.star_modules)
            return sorted(found)
        if isinstance(node, ast.Attribute):
            return [f"{base}.{node.attr}" for base in self.resolve(node.value)]
        if isinstance(node, ast.Call):
            return self._resolve_call(node)
        if isinstance(node, ast.Subscript):
            key = _literal_str(node.slice)
            if key is not None and "sys.modules" in self.resolve(node.value):
                return [key]
        return []

    def _resolve_call(self, node: ast.Call) -> list[str]:
        imported = self._dynamic_import(node)
        if imported is not None:  # __import__("a.b") returns a, importlib.import_module("a.b") returns a.b
            return sorted({imported, imported.split(".")[0]})
        callee = self.resolve(node.func)
        attribute = _literal_str(node.args[1]) if len(node.args) >= 2 else None
        if attribute is not None and "builtins.getattr" in callee:
            return [f"{base}.{attribute}" for base in self.resolve(node.args[0])]
        return []

    def _dynamic_import(self, node: ast.Call) -> str | None:
        """The module named by ``__import__("m")`` or ``importlib.import_module("m")``, else None."""
        first = _literal_str(node.args[0]) if node.args else None
        if first is not None and {"builtins.__import__", "importlib.import_module"} & set(self.resolve(node.func)):
            return first
        return None

    # --- findings ----------------------------------------------------------------------------

    def flag(self, node: ast.AST, category: Category, detail: str) -> None:
        line = getattr(node, "lineno", 0)
        snippet = self.lines[line - 1].strip() if 0 < line <= len(self.lines) else ""
        if len(snippet) > 120:
            snippet = snippet[:117] + "..."
        self.findings.setdefault((category, line, detail), Finding(category, line, snippet, detail))

    def check_names(self, node: ast.AST, names: Iterable[str]) -> None:
        for name in names:
            parts = name.split(".")
            rerooted = [".".join(parts[i:]) for i in range(1, len(parts)) if parts[i] in REROOTED_MODULES]
            for candidate in [name, *rerooted]:
                rule = next((rule for rule in RULES if _matches(rule[0], candidate)), None)
                if rule is not None:
                    via = f" (reached through {name[: -len(candidate) - 1]})" if candidate != name else ""
                    self.flag(node, rule[1], f"{candidate}: {rule[2]}{via}")

    def check_module(self, node: ast.AST, module: str) -> None:
        where = (getattr(node, "lineno", 0), getattr(node, "col_offset", 0))
        self.imports[module] = min(where, self.imports.get(module, where))
        top = module.split(".")[0]
        if module.startswith("."):
            self.flag(node, Category.IMPORT, f"{module}: relative import, submitted code must be self-contained")
        elif top not in ALLOWED_PACKAGES and module not in ALLOWED_MODULES:
            self.flag(node, Category.IMPORT, f"{module}: {top!r} is not one of the allowed packages")

    def visit(self, node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            self._visit_import(node)
        elif isinstance(node, ast.ImportFrom):
            self._visit_import_from(node)
        elif isinstance(node, ast.Name):
            self._visit_name(node)
        elif isinstance(node, ast.Attribute):
            self._visit_attribute(node)
        elif isinstance(node, ast.Call):
            self._visit_call(node)
        elif isinstance(node, ast.Subscript) and not self._is_chain_link(node):
            self.check_names(node, self.resolve(node))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value == "trust_remote_code":  # passed as **{"trust_remote_code": True}
                self.flag(node, Category.DYNAMIC_CODE, REMOTE_CODE_WHY)
            for name in sorted(set(DUNDER_IN_TEXT.findall(node.value)) & ESCAPE_DUNDERS):
                self.flag(node, Category.DUNDER, f"{name}: named in a string (usable through getattr or str.format)")

    def _is_chain_link(self, node: ast.AST) -> bool:
        """True if ``node`` is the object of an attribute access, whose full name is checked instead."""
        parent = self.parents.get(node)
        return isinstance(parent, ast.Attribute) and parent.value is node

    def _visit_import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.check_module(node, alias.name)
            self.check_names(node, [alias.name])

    def _visit_import_from(self, node: ast.ImportFrom) -> None:
        module = _import_name(node)
        self.check_module(node, module)
        for alias in node.names:
            if alias.name == "*":
                self.flag(node, Category.IMPORT, f"{module}.*: a star import hides which names the code uses")
                self.check_names(node, [module])
            else:
                if _is_dunder(alias.name):
                    self.flag(node, Category.DUNDER, f"{alias.name}: imports an interpreter internal")
                self.check_names(node, [f"{module}.{alias.name}"])

    def _visit_name(self, node: ast.Name) -> None:
        if node.id == "getattr" and not self._is_literal_getattr(node):
            self.flag(node, Category.DYNAMIC_CODE, "builtins.getattr: with a computed name it reaches any attribute")
        if _is_dunder(node.id) and node.id not in {"__name__", "__import__"}:
            self.flag(node, Category.DUNDER, f"{node.id}: interpreter internal")
        if not self._is_chain_link(node):
            self.check_names(node, self.resolve(node))

    def _is_literal_getattr(self, node: ast.Name) -> bool:
        call = self.parents.get(node)
        return (
            isinstance(call, ast.Call) and call.func is node and len(call.args) >= 2
            and _literal_str(call.args[1]) is not None
        )

    def _visit_attribute(self, node: ast.Attribute) -> None:
        if node.attr in INTROSPECTION_ATTRIBUTES:
            self.flag(node, Category.DUNDER, f"{node.attr}: frame or code internals reach every global")
        elif _is_dunder(node.attr) and node.attr not in HARMLESS_DUNDERS:
            self.flag(node, Category.DUNDER, f"{node.attr}: interpreter internal, a classic sandbox escape")
        names = self.resolve(node)
        if not self._is_chain_link(node):
            self.check_names(node, names)
        if not names:
            for pattern, category, why in ATTRIBUTE_HINTS:
                if fnmatchcase(node.attr, pattern):
                    self.flag(node, category, f".{node.attr}: {why}")
                    break

    def _visit_call(self, node: ast.Call) -> None:
        imported = self._dynamic_import(node)
        if imported is not None:
            self.check_module(node, imported)
        names = self.resolve(node)
        if not self._is_chain_link(node):
            self.check_names(node, names)
        self._check_unsafe_loading(node)

    def _check_unsafe_loading(self, node: ast.Call) -> None:
        """Loaders that run code unless told not to: remote model code, pickles."""
        callee = set(self.resolve(node.func))
        keywords = {keyword.arg: keyword.value for keyword in node.keywords if keyword.arg is not None}
        if "trust_remote_code" in keywords and not _is_constant(keywords["trust_remote_code"], False):
            self.flag(node, Category.DYNAMIC_CODE, REMOTE_CODE_WHY)
        if callee & {"torch.load", "torch.serialization.load"}:
            if not _is_constant(keywords.get("weights_only"), True):
                self.flag(node, Category.DYNAMIC_CODE, "torch.load: without weights_only=True it unpickles objects")
        if "numpy.load" in callee and not _is_constant(keywords.get("allow_pickle", ast.Constant(False)), False):
            self.flag(node, Category.DYNAMIC_CODE, "numpy.load: allow_pickle unpickles arbitrary objects")

    def review(self) -> tuple[tuple[str, ...], tuple[Finding, ...]]:
        """(imports, findings ordered by line, category and detail)."""
        self.collect_aliases()
        for node in ast.walk(self.tree):
            self.visit(node)
        findings = sorted(self.findings.values(), key=lambda f: (f.line, f.category.value, f.detail))
        return tuple(sorted(self.imports, key=self.imports.__getitem__)), tuple(findings)


def _is_constant(node: ast.AST | None, value: bool) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _parse(source: str) -> ast.Module:
    def unparsable(problem: str) -> CodeReviewError:
        return CodeReviewError(
            f"submitted code does not parse: {problem}; it cannot be reviewed, ask the researcher to resubmit"
        )

    try:
        return ast.parse(source, filename="<submitted code>")
    except SyntaxError as exc:
        where = f" at line {exc.lineno}, column {exc.offset}" if exc.lineno is not None else ""
        raise unparsable(f"{exc.msg}{where}") from exc
    except ValueError as exc:  # NUL bytes, on Python versions that raise ValueError for them
        raise unparsable(str(exc)) from exc
    except RecursionError as exc:  # nesting deeper than the parser's stack (e.g. thousands of chained operators)
        raise unparsable(f"it is nested too deeply to parse ({exc})") from exc


def review_code(source: str) -> CodeReview:
    """Review ``source`` statically and return what the admin should see; never executes it."""
    if not isinstance(source, str):
        raise TypeError(f"source must be str, got {type(source).__name__}")
    imports, findings = _Reviewer(source, _parse(source)).review()
    return CodeReview(
        code_sha256=code_hash(source),
        imports=imports,
        findings=findings,
        verdict="flagged" if findings else "clean",
    )
