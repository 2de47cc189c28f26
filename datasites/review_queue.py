"""The admin's review queue: what a request runs, what it touches, what it costs; approve or deny.

A review shows the admin the exact code, the static summary (``policies.review``), whether the
code is the canonical Fedsite round function with the site's canonical syft policies bound to this
site's private asset, the plan and its projected epsilon against the budget left, and a dry run of
the very code on the mock twin. Approval is refused while any of that fails; an approval is
recorded in the site's own registry and audit log *before* syft is told, so the execution guard
and the audit trail never lag behind syft.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from datasites.errors import FedsiteError
from datasites.sitedir import SiteDir
from policies.approvals import Approval, ApprovalRegistry
from policies.audit import AuditLog, RequestApproved, RequestDenied
from policies.dp import CalibratedPlan, DPPlanError, calibrate_plan
from policies.federated_plan import FederatedPlan, FederatedPlanError
from policies.fingerprint import UnknownDatasetError, read_dataset_facts
from policies.ledger import BudgetExceededError, PrivacyLedger
from policies.review import CodeReview, code_hash, review_code
from policies.submission import SubmissionError, canonical_plan, dry_run, function_name
from policies.syft_client import quiet

CANONICAL_INPUT_POLICY = "MixedInputPolicy"
CANONICAL_OUTPUT_POLICY = "OutputPolicyExecuteCount"
ASSET = "reviews"


@dataclass(frozen=True)
class RequestSummary:
    request_id: str  # syft request UID, hex
    function: str  # the submitted function's name
    researcher: str  # requesting user's email
    status: str  # pending / approved / rejected


@dataclass(frozen=True)
class ReviewReport:
    """Everything the admin sees before deciding; ``problems`` block approval."""

    summary: RequestSummary
    code: str
    code_review: CodeReview
    plan: FederatedPlan | None
    calibrated: CalibratedPlan | None
    budget_epsilon: float | None
    spent_epsilon: float | None
    dry_run: dict[str, Any] | None
    problems: tuple[str, ...] = field(default=())

    def render_text(self) -> str:
        s = self.summary
        lines = [f"request {s.request_id}  {s.function}  from {s.researcher}  [{s.status}]", "",
                 "--- code " + "-" * 60, self.code.rstrip(), "-" * 69, "", self.code_review.render_text(), ""]
        if self.plan is not None:
            dp = self.plan.dp
            model = dict(self.plan.model.__dict__)
            if model.get("centre") is not None:  # a fixed input shift, not worth 384 numbers on screen
                model["centre"] = f"<{len(model['centre'])} values, norm {math.hypot(*model['centre']):.3f}>"
            if model.get("head_init") is not None:  # the classifier's starting weights (researcher.models.prompt_head)
                weight = model["head_init"]["weight"]
                model["head_init"] = f"<{len(weight)} x {len(weight[0])} weights and {len(weight)} biases>"
            lines += [f"plan {self.plan.run_id}: dataset {self.plan.dataset}, model {model}",
                      f"  {dp.rounds} rounds x {dp.local_steps} local steps, batch {dp.expected_batch_size}, "
                      f"clip {dp.clip_norm}, target epsilon {dp.target_epsilon}, delta {dp.delta:g}",
                      f"  reads {dp.max_length} tokens of each review"
                      + (f" (of a longer one its first {dp.max_length - 2 - dp.tail_tokens} and last {dp.tail_tokens})"
                         if dp.tail_tokens else " (its first ones)"),
                      f"  secure sum over {', '.join(self.plan.roster.site_ids)} (threshold "
                      f"{self.plan.secure_sum.threshold}, {self.plan.secure_sum.vector_length} values)"]
        if self.calibrated is not None:
            lines.append(f"privacy: noise multiplier {self.calibrated.noise_multiplier:.3f}; this run alone epsilon "
                         f"{self.calibrated.run_epsilon:.3f}; spent so far {self.spent_epsilon:.3f}; projected "
                         f"{self.calibrated.projected_epsilon:.3f} of budget {self.budget_epsilon:g}")
        if self.dry_run is not None:
            lines.append(f"dry run on the mock twin: {self.dry_run}")
        lines.append("")
        lines += ["PROBLEMS (approval refused):", *(f"  - {p}" for p in self.problems)] if self.problems else \
            ["no problems: the request can be approved"]
        return "\n".join(lines)


def _status(request: Any) -> str:
    return str(request.status).rsplit(".", 1)[-1].lower()


def list_requests(client: Any) -> list[RequestSummary]:
    with quiet():
        return [RequestSummary(str(r.id.no_dash), r.code.service_func_name, r.requesting_user_email, _status(r))
                for r in client.requests]


def _find(client: Any, request_id: str) -> Any:
    """The request whose id starts with ``request_id`` (at least 6 hex digits; dashes ignored)."""
    prefix = request_id.replace("-", "").lower()
    if len(prefix) < 6:
        raise FedsiteError(f"request id {request_id!r} is too short: give at least 6 hex digits")
    with quiet():
        matches = [r for r in client.requests if str(r.id.no_dash).startswith(prefix)]
    if len(matches) > 1:
        ids = ", ".join(str(r.id.no_dash)[:12] for r in matches)
        raise FedsiteError(f"request id {request_id!r} is ambiguous ({ids}): give more digits")
    if not matches:
        raise FedsiteError(f"no request {request_id!r} on this site: list them with `fedsite admin requests`")
    return matches[0]


def _policy_problems(code: Any, asset_action_id: str | None) -> list[str]:
    """The syft policies must be the site's canonical ones, bound to this site's private asset."""
    problems = []
    if code.input_policy_type.__name__ != CANONICAL_INPUT_POLICY:
        problems.append(f"input policy is {code.input_policy_type.__name__}, not syft's {CANONICAL_INPUT_POLICY}")
    if code.output_policy_type.__name__ != CANONICAL_OUTPUT_POLICY:
        problems.append(f"output policy is {code.output_policy_type.__name__}, not syft's {CANONICAL_OUTPUT_POLICY}")
    kwargs = list(code.input_policy_init_kwargs.values())
    bound = kwargs[0] if len(kwargs) == 1 else {}
    if set(bound) != {"data", "stage", "message"}:
        problems.append(f"the function must take exactly data, stage, message; it binds {sorted(bound)}")
    else:
        data = bound["data"]
        if asset_action_id is None or str(getattr(getattr(data, "val", None), "no_dash", "")) != asset_action_id:
            problems.append("`data` is not bound to this site's private asset of the planned dataset")
        for name in ("stage", "message"):
            if "UserOwned" not in str(bound[name]):
                problems.append(f"`{name}` must be a researcher-owned plain value")
    return problems


def review_request(client: Any, site: SiteDir, request_id: str, *, with_dry_run: bool = True) -> ReviewReport:
    """Build the admin's review of one request (reads only; changes nothing)."""
    request = _find(client, request_id)
    with quiet():
        code = request.code
        raw = code.raw_code
        summary = RequestSummary(str(request.id.no_dash), code.service_func_name, request.requesting_user_email,
                                 _status(request))
    problems: list[str] = []
    static = review_code(raw)
    problems += [f"static review: {f.category.value} at line {f.line}: {f.detail}" for f in static.findings]
    plan = calibrated = None
    budget = spent = dry = None
    try:
        plan = FederatedPlan.parse(canonical_plan(raw))
        if summary.function != function_name(plan.run_id):
            problems.append(f"function name {summary.function} does not match the plan's run id {plan.run_id}")
    except (SubmissionError, FederatedPlanError) as exc:
        problems.append(str(exc))
    meta = site.meta()
    asset = _asset(client, plan.dataset) if plan else None  # one lookup: syft re-fetches its API for each
    asset_id = str(asset.action_id.no_dash) if asset is not None else None
    problems += _policy_problems(code, asset_id)
    if plan is not None:
        problems += _roster_problems(plan, site)
        try:
            facts = read_dataset_facts(site.path, plan.dataset)
            ledger = PrivacyLedger(site.path, plan.dataset, summary.researcher, site=meta.name,
                                   accountant=plan.dp.accountant)
            budget, spent = ledger.budget.epsilon, ledger.spent()
            calibrated = calibrate_plan(plan.dp, n_records=int(facts["n_records"]), ledger=ledger)
        except (UnknownDatasetError, BudgetExceededError, DPPlanError) as exc:
            problems.append(f"privacy: {exc}")
        if with_dry_run and not problems and asset is not None:
            with quiet():
                mock = asset.mock
            dry = _dry_run(mock, site, raw, summary, plan, calibrated, problems)
    return ReviewReport(summary, raw, static, plan, calibrated, budget, spent, dry, tuple(problems))


def _asset(client: Any, dataset: str) -> Any | None:
    with quiet():
        try:
            return client.datasets[dataset].assets[ASSET]
        except (KeyError, IndexError, AttributeError):
            return None


def _roster_problems(plan: FederatedPlan, site: SiteDir) -> list[str]:
    name = site.meta().name
    if name not in plan.roster:
        return [f"the roster does not list this site ({name})"]
    pinned = plan.roster.entries[plan.roster.position(name)].identity_key.hex()
    own = site.identity_public_hex()
    if pinned != own:
        return [f"the roster pins key {pinned[:16]}... for {name}, but this site's key is {own[:16]}...: "
                "check the roster with the other admins (`fedsite admin identity`)"]
    return []


def _dry_run(mock: Any, site: SiteDir, raw: str, summary: RequestSummary, plan: FederatedPlan,
             calibrated: CalibratedPlan | None, problems: list[str]) -> dict[str, Any] | None:
    """Run the exact submitted function on the mock twin, in this process, spending nothing."""
    provisional = Approval(request_id=summary.request_id, code_hash=code_hash(raw), researcher=summary.researcher,
                           dataset=plan.dataset, plan=dict(plan.raw), calibrated=calibrated.to_dict() if calibrated else {},
                           admin="review", approved_at=datetime.now(UTC).isoformat())
    result = dry_run(raw, mock, site=site.meta().name, researcher=summary.researcher, approval=provisional)
    if "refused" in result:
        problems.append(f"dry run: {result['refused']}")
        return None
    return result


def approve_request(client: Any, site: SiteDir, request_id: str, *, admin: str) -> Approval:
    """Approve after a clean review: site registry and audit log first, then syft."""
    report = review_request(client, site, request_id)
    if report.problems:
        raise FedsiteError(f"request {request_id} cannot be approved: {report.problems[0]} "
                           f"({len(report.problems)} problem(s); see `fedsite admin show {request_id}`)")
    if report.plan is None or report.calibrated is None:
        raise FedsiteError(f"request {request_id} has no valid plan")
    approval = Approval(request_id=report.summary.request_id, code_hash=code_hash(report.code),
                        researcher=report.summary.researcher, dataset=report.plan.dataset,
                        plan=dict(report.plan.raw), calibrated=report.calibrated.to_dict(), admin=admin,
                        approved_at=datetime.now(UTC).isoformat())
    ApprovalRegistry(site.path).record(approval)
    AuditLog(site.path).record(RequestApproved(request_id=approval.request_id, code_hash=approval.code_hash,
                                               researcher=approval.researcher, dataset=approval.dataset,
                                               plan_digest=approval.plan_digest, admin=admin))
    with quiet():
        _find(client, request_id).approve()
    return approval


def deny_request(client: Any, site: SiteDir, request_id: str, *, reason: str, admin: str) -> None:
    """Deny with a reason the researcher sees (recorded in the audit log first)."""
    if not reason.strip():
        raise FedsiteError("a denial needs a reason the researcher will see: pass --reason '...'")
    request = _find(client, request_id)
    with quiet():
        raw, researcher = request.code.raw_code, request.requesting_user_email
    AuditLog(site.path).record(RequestDenied(request_id=str(request.id.no_dash), code_hash=code_hash(raw),
                                             researcher=researcher, dataset=_planned_dataset(raw), admin=admin,
                                             reason=reason))
    with quiet():
        request.deny(reason=reason)


def _planned_dataset(raw: str) -> str:
    try:
        return str(canonical_plan(raw).get("dataset") or "?")
    except SubmissionError:
        return "?"


def revoke_approval(site: SiteDir, request_id: str, *, reason: str, admin: str) -> Approval:
    """Stop an approved run: the execution guard refuses its code from now on (recorded in the audit log)."""
    if not reason.strip():
        raise FedsiteError("a revocation needs a reason the researcher will see: pass --reason '...'")
    prefix = request_id.replace("-", "").lower()
    registry = ApprovalRegistry(site.path)
    matches = [a for a in registry.all() if a.request_id.startswith(prefix)] if len(prefix) >= 6 else []
    if len(matches) != 1:
        raise FedsiteError(f"{len(matches)} live approvals match {request_id!r}: give at least 6 digits of one "
                           "approved request id (`fedsite admin audit` lists them)")
    approval = matches[0]
    registry.revoke(approval.code_hash, reason=reason, admin=admin)
    AuditLog(site.path).record(RequestDenied(request_id=approval.request_id, code_hash=approval.code_hash,
                                             researcher=approval.researcher, dataset=approval.dataset, admin=admin,
                                             reason=f"approval revoked: {reason}"))
    return approval
