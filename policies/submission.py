"""The one shape of code a Fedsite site approves: a thin wrapper around the site runtime.

A researcher submits, per run, a function generated from ``ROUND_FUNCTION_TEMPLATE``: the plan as a
literal (so the code hash covers every parameter the admin approves) and a call into
``policies.site_runtime.run_stage`` with a model built by the site's installed ``models`` package
from the plan's model spec. The model and the loss are the researcher's choice through that spec;
clipping, noise, sampling, accounting and masking are the site's code.

The site's review (``canonical_plan``) parses the submitted source and accepts it only if, with the
plan literal taken out, its syntax tree is exactly the template's: no extra statement, import, or
argument can ride along with an approval.
"""

from __future__ import annotations

import ast
import importlib
import io
import pprint
import tempfile
import textwrap
import time
import tokenize
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from policies.contracts import StageReply, reply_from_wire

if TYPE_CHECKING:  # the plan's parser loads torch; a site preloads it with the runtime, not with this module
    from policies.federated_plan import FederatedPlan

ROUND_FUNCTION_TEMPLATE = '''\
def {name}(data, stage, message):
    plan = {plan}
    from policies.site_runtime import run_stage
    from models import build_from_spec

    def make_model():
        return build_from_spec(plan["model"])

    return run_stage(data, stage=stage, message=message, plan=plan, make_model=make_model)
'''


class SubmissionError(ValueError):
    """Submitted code is not the canonical Fedsite round function."""


def function_name(run_id: str) -> str:
    return "fedsite_" + run_id.replace("-", "_")


def render_round_function(plan: FederatedPlan) -> str:
    """The source of the function to submit for ``plan``: its canonical JSON as the literal."""
    return render_literal(plan.to_dict())


def render_literal(raw: Mapping[str, Any]) -> str:
    """The template around any JSON literal with a ``run_id`` (what a site's review must judge, valid or not)."""
    literal = textwrap.indent(pprint.pformat(dict(raw), width=96, sort_dicts=True), " " * 11).lstrip()
    return ROUND_FUNCTION_TEMPLATE.format(name=function_name(str(raw["run_id"])), plan=literal)


def _runtime_imports() -> list[ast.ImportFrom]:
    node = _function_node(ROUND_FUNCTION_TEMPLATE.format(name="f", plan="None"))
    return [statement for statement in ast.walk(node) if isinstance(statement, ast.ImportFrom) and statement.module]


def runtime_modules() -> tuple[str, ...]:
    """The modules the canonical round function imports when it runs at a site, read from the template."""
    return tuple(str(statement.module) for statement in _runtime_imports())


def load_runtime() -> float:
    """Import the round function's modules and names now; returns the seconds it took.

    They bring in torch, transformers, opacus and peft: ~8 s of CPU on this project's 2-core machine.
    A served site loads them at start-up, so that its first approved call (the first round's key
    advertisement) does not pay for them while the researcher and the other sites wait. The names are
    looked up too: ``models`` loads a name's module (and peft with it) on first use.
    """
    started = time.perf_counter()
    for statement in _runtime_imports():
        module = importlib.import_module(str(statement.module))
        for alias in statement.names:
            getattr(module, alias.name)
    return time.perf_counter() - started


def _function_node(source: str) -> ast.FunctionDef:
    try:
        module = ast.parse(textwrap.dedent(source))
    except SyntaxError as exc:
        raise SubmissionError(f"the code does not parse: {exc.msg} (line {exc.lineno})") from None
    functions = [node for node in module.body if isinstance(node, ast.FunctionDef)]
    if len(module.body) != 1 or len(functions) != 1:
        raise SubmissionError("the code must be exactly one function definition")
    return functions[0]


def _without_plan(node: ast.FunctionDef) -> tuple[str, ast.expr]:
    """The tree with the plan literal replaced by a placeholder, and the literal itself."""
    first = node.body[0] if node.body else None
    if not (isinstance(first, ast.Assign) and len(first.targets) == 1 and isinstance(first.targets[0], ast.Name)
            and first.targets[0].id == "plan"):
        raise SubmissionError("the function must start with `plan = {...}`")
    literal = first.value
    first.value = ast.Constant(value=None)
    node.decorator_list = []
    return ast.dump(node, annotate_fields=False, include_attributes=False), literal


def _check_characters(source: str) -> None:
    """Printable ASCII, newlines and no comments: what ``render_round_function`` writes, and nothing an
    admin's terminal would interpret (an escape sequence in a comment can redraw the review shown)."""
    odd = sorted({ch for ch in source if not (" " <= ch <= "~" or ch == "\n")})
    if odd:
        raise SubmissionError(f"the code holds characters outside printable ASCII ({', '.join(map(ascii, odd[:5]))}): "
                              "regenerate it with researcher.federation")
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(textwrap.dedent(source)).readline))
    except (tokenize.TokenError, SyntaxError) as exc:
        raise SubmissionError(f"the code does not tokenize: {exc}") from None
    if any(token.type == tokenize.COMMENT for token in tokens):
        raise SubmissionError("the code holds a comment: the canonical round function has none")


def _check_plan_strings(value: Any, where: str = "plan") -> None:
    if isinstance(value, str):
        if not value.isprintable():
            raise SubmissionError(f"{where} holds a non-printable character")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_plan_strings(key, where)
            _check_plan_strings(item, f"{where}[{key!r}]")
    elif isinstance(value, list | tuple):
        for item in value:
            _check_plan_strings(item, where)


MAX_SOURCE_CHARS = 16 * 2**20  # the largest valid plan (a 64 x 8192 head_init) renders to about 12 MB


def canonical_plan(source: str) -> dict[str, Any]:
    """The plan of a canonical round function; raises SubmissionError for anything else.

    A plan that parses must also be written in its canonical form (``FederatedPlan.to_dict()``, as
    ``render_round_function`` writes it): no key twice, no default left out, no alias (``1`` for ``1.0``, a
    key in capitals), so the listing an admin reads shows each value once, as it takes effect.
    """
    if len(source) > MAX_SOURCE_CHARS:
        raise SubmissionError(f"the code is {len(source):,} characters, over {MAX_SOURCE_CHARS:,}: no valid plan is "
                              "that large")
    node = _function_node(source)
    _check_characters(source)
    shape, literal = _without_plan(node)
    try:
        plan = ast.literal_eval(literal)
    except ValueError:
        raise SubmissionError("the plan must be a literal (no names, calls or expressions)") from None
    except TypeError as exc:  # e.g. a list or dict as a dict key
        raise SubmissionError(f"the plan's literal cannot be built ({exc}): keys must be strings") from None
    if not isinstance(plan, dict) or not isinstance(plan.get("run_id"), str):
        raise SubmissionError("the plan must be a dict with a 'run_id'")
    _check_plan_strings(plan)
    _check_no_repeated_keys(literal)
    _check_canonical_form(plan)
    expected, _ = _without_plan(_function_node(ROUND_FUNCTION_TEMPLATE.format(
        name=function_name(plan["run_id"]), plan="None")))
    if shape != expected:
        raise SubmissionError(
            "the code is not the canonical Fedsite round function (something was added, removed or changed "
            "besides the plan): regenerate it with researcher.federation"
        )
    return plan


def _check_no_repeated_keys(literal: ast.expr) -> None:
    for node in ast.walk(literal):
        if isinstance(node, ast.Dict):
            # as the dict itself compares keys (1 == 1.0, tuples by value); counted, as a literal may hold 10**6
            counts = Counter(ast.literal_eval(key) for key in node.keys if key is not None)
            repeated = sorted(repr(key) for key, count in counts.items() if count > 1)
            if repeated:
                raise SubmissionError(f"the plan repeats the key(s) {', '.join(repeated)}: Python keeps the last, "
                                      "the listing shows both; regenerate the function with make_plan")


def _check_canonical_form(plan: dict[str, Any]) -> None:
    from policies.durable import canonical_json
    from policies.federated_plan import FederatedPlan, FederatedPlanError

    try:
        canonical = FederatedPlan.parse(plan).to_dict()
    except FederatedPlanError:
        return  # not a valid plan: the review lists why, and no site can approve it
    if canonical_json(plan) != canonical_json(canonical):
        raise SubmissionError("the plan is not written in its canonical form (a default left out, 1 for 1.0, a key in "
                              "other letters): regenerate the function with make_plan, which writes "
                              "FederatedPlan.to_dict()")


def dry_run(source: str, data: Any, *, site: str, researcher: str, approval: Any) -> StageReply:
    """Run a canonical round function's source on mock ``data`` in a dry-run context; spends nothing.

    Used by the admin's review (on the site's mock twin) and by the researcher before submitting (on
    the mock it downloaded). The dry-run context points at a scratch directory and is never one the
    execution guard creates, so this path cannot touch a site's private data, ledger or keys.
    """
    plan = canonical_plan(source)
    from policies.approvals import ExecutionContext, authorised

    namespace: dict[str, Any] = {}
    node = _function_node(source)
    node.decorator_list = []  # syft's decorator, if written in the source, is not part of the function
    code = compile(ast.unparse(node), "<submitted round function>", "exec")
    exec(code, namespace)
    with tempfile.TemporaryDirectory() as scratch:
        execution = ExecutionContext(site=site, data_dir=Path(scratch), approval=approval, researcher=researcher,
                                     researcher_email=approval.researcher_email, dry_run=True)
        with authorised(execution):
            result = namespace[function_name(plan["run_id"])](data=data, stage="dry_run", message={})
    return reply_from_wire(result)
