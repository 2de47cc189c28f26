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
from datasites.mock import describe_mock_record
from datasites.request_ids import request_prefix, resolve_request_id
from datasites.sitedir import SiteDir
from policies.approvals import Approval, ApprovalRegistry
from policies.audit import AuditLog, RequestApproved, RequestDenied
from policies.dp import CalibratedPlan, DPPlan, DPPlanError, calibrate_plan
from policies.federated_plan import FederatedPlan, FederatedPlanError
from policies.fingerprint import UnknownDatasetError, read_dataset_facts
from policies.ledger import BudgetExceededError, PrivacyLedger
from policies.peers import PeerPins, RosterEntryStatus
from policies.review import CodeReview, code_hash, printable, review_code
from policies.review_render import render_listing
from policies.submission import SubmissionError, canonical_plan, dry_run, function_name
from policies.syft_client import quiet

CANONICAL_INPUT_POLICY = "MixedInputPolicy"
CANONICAL_OUTPUT_POLICY = "OutputPolicyExecuteCount"
ASSET = "reviews"


@dataclass(frozen=True)
class RequestSummary:
    request_id: str  # syft request UID, hex
    function: str  # the submitted function's name; for a request that is not a code request, its kind
    researcher: str  # requesting user's immutable id (syft user id; the key of approvals and ledgers)
    researcher_email: str  # requesting user's e-mail, shown beside the id
    status: str  # pending / approved / rejected
    is_code: bool = True  # False for any other kind of syft request: listed, never reviewed or approved


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
    roster: tuple[RosterEntryStatus, ...] = field(default=())  # every roster entry: key fingerprint, pin status
    warnings: tuple[str, ...] = field(default=())  # shown as WARNING lines; they do not block approval
    mock_twin: str | None = None  # the dataset's mock: size, label balance and their source (datasites.mock)

    def render_text(self, *, full: bool = False) -> str:
        """The review as text; the plan's long numeric literals are summarised unless ``full``."""
        s = self.summary
        listing, summarised = render_listing(self.code, full=full)
        lines = [f"request {s.request_id}  {s.function}  from {s.researcher_email} (id {s.researcher})  [{s.status}]", "",
                 "--- code " + "-" * 60, *listing, "-" * 69, *summarised, "", self.code_review.render_text(), ""]
        if self.plan is not None:
            dp = self.plan.dp
            model = dict(self.plan.model.__dict__)
            if model.get("centre") is not None:  # a fixed input shift, not worth 384 numbers on screen
                model["centre"] = f"<{len(model['centre'])} values, norm {math.hypot(*model['centre']):.3f}>"
            if model.get("head_init") is not None:  # the classifier's starting weights (models.prompt_head)
                weight = model["head_init"]["weight"]
                model["head_init"] = f"<{len(weight)} x {len(weight[0])} weights and {len(weight)} biases>"
            lines += [f"plan {self.plan.run_id}: dataset {self.plan.dataset}, model {model}",
                      f"  {dp.rounds} rounds x {dp.local_steps} local steps, batch {dp.expected_batch_size}, "
                      f"clip {dp.clip_norm}, target epsilon {dp.target_epsilon}, delta {dp.delta:g}",
                      f"  reads {dp.max_length} tokens of each review"
                      + (f" (of a longer one its first {dp.max_length - 2 - dp.tail_tokens} and last {dp.tail_tokens})"
                         if dp.tail_tokens else " (its first ones)"),
                      f"  secure sum over {', '.join(self.plan.roster.site_ids)} (threshold "
                      f"{self.plan.secure_sum.threshold}, {self.plan.secure_sum.vector_length} values); roster:"]
            lines += [f"    {entry.site_id:<20} key {entry.fingerprint}  {entry.status}" for entry in self.roster]
        if self.calibrated is not None:
            lines.append(f"privacy: noise multiplier {self.calibrated.noise_multiplier:.3f}; this run alone epsilon "
                         f"{self.calibrated.run_epsilon:.3f}; spent so far {self.spent_epsilon:.3f}; projected "
                         f"{self.calibrated.projected_epsilon:.3f} of budget {self.budget_epsilon:g}")
        if self.dry_run is not None:
            lines.append(f"dry run on the mock twin: {self.dry_run}")
        if self.mock_twin is not None:
            lines.append(f"mock twin: {self.mock_twin}")
        lines.append("")
        lines += [f"WARNING: {warning}" for warning in self.warnings]
        lines += ["PROBLEMS (approval refused):", *(f"  - {p}" for p in self.problems)] if self.problems else \
            ["no problems: the request can be approved"]
        return printable("\n".join(lines))  # the code and plan are the researcher's text: no terminal escapes


SECURE_NOISE_OFF = (
    "this plan turns off cryptographically secure noise (dp.secure_mode = false): its DP-SGD noise and Poisson "
    "batches would come from torch's generators, which are not cryptographic and which code in the site's process "
    "can seed, with no defence against floating-point attacks on the noise; approve it for a benchmark or a test "
    "on data that is not private, never otherwise"
)


def plan_warnings(dp: DPPlan) -> tuple[str, ...]:
    """What the admin must read before approving ``dp`` but that does not block approval (``problems`` do)."""
    return () if dp.secure_mode else (SECURE_NOISE_OFF,)


def _status(request: Any) -> str:
    return str(request.status).rsplit(".", 1)[-1].lower()


def _summary(client: Any, request: Any) -> RequestSummary:
    """One request as the admin sees it; a request of another kind than code is named by its changes."""
    user = client.api.services.user.get_by_verify_key(request.requesting_user_verify_key)
    researcher, email = str(user.id.no_dash), str(user.email)
    code = request.code
    if not hasattr(code, "service_func_name"):  # syft answers a SyftError for a request without code
        kinds = ", ".join(sorted({type(change).__name__ for change in request.changes})) or "no changes"
        return RequestSummary(str(request.id.no_dash), f"(not a code request: {kinds})", researcher, email,
                              _status(request), is_code=False)
    return RequestSummary(str(request.id.no_dash), code.service_func_name, researcher, email, _status(request))


def list_requests(client: Any) -> list[RequestSummary]:
    with quiet():
        return [_summary(client, r) for r in client.requests]


def _find(client: Any, request_id: str) -> Any:
    """The syft request that ``request_id`` (a full id or a unique prefix) names (``datasites.request_ids``)."""
    request_prefix(request_id)  # a malformed id is refused before syft is asked
    with quiet():
        requests = list(client.requests)
    return resolve_request_id(request_id, requests, lambda request: str(request.id.no_dash))


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
        summary = _summary(client, request)
        if not summary.is_code:
            raise FedsiteError(f"request {summary.request_id[:12]} is {summary.function[1:-1]}: a Fedsite site reviews "
                               "and approves only code requests; deny it with `fedsite admin deny`")
        code = request.code
        raw = code.raw_code
    problems: list[str] = []
    static = review_code(raw)
    problems += [f"static review: {f.category.value} at line {f.line}: {f.detail}" for f in static.findings]
    plan = calibrated = None
    roster: tuple[RosterEntryStatus, ...] = ()
    mock_twin: str | None = None
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
        pins = PeerPins(site.path, own_name=meta.name).load()
        roster = tuple(pins.roster_status(plan.roster))
        problems += pins.roster_problems(plan.roster, plan.secure_sum.threshold)
        try:
            facts = read_dataset_facts(site.path, plan.dataset)
            mock_twin = describe_mock_record(facts.get("mock"))
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
    return ReviewReport(summary, raw, static, plan, calibrated, budget, spent, dry, tuple(problems), roster=roster,
                        warnings=plan_warnings(plan.dp) if plan is not None else (), mock_twin=mock_twin)


def _asset(client: Any, dataset: str) -> Any | None:
    with quiet():
        try:
            return client.datasets[dataset].assets[ASSET]
        except (KeyError, IndexError, AttributeError):
            return None


def _dry_run(mock: Any, site: SiteDir, raw: str, summary: RequestSummary, plan: FederatedPlan,
             calibrated: CalibratedPlan | None, problems: list[str]) -> dict[str, Any] | None:
    """Run the exact submitted function on the mock twin, in this process, spending nothing."""
    provisional = Approval(request_id=summary.request_id, code_hash=code_hash(raw), researcher=summary.researcher,
                           researcher_email=summary.researcher_email, dataset=plan.dataset, plan=dict(plan.raw), calibrated=calibrated.to_dict() if calibrated else {},
                           admin="review", approved_at=datetime.now(UTC).isoformat())
    try:
        result = dry_run(raw, mock, site=site.meta().name, researcher=summary.researcher, approval=provisional)
    except Exception as exc:  # noqa: BLE001 - the researcher's code failing on the mock is a finding, not a crash
        problems.append(f"dry run: the code failed on the mock twin with {type(exc).__name__}: "
                        f"{printable(str(exc))[:300]}")
        return None
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
                        researcher=report.summary.researcher, researcher_email=report.summary.researcher_email,
                        dataset=report.plan.dataset,
                        plan=dict(report.plan.raw), calibrated=report.calibrated.to_dict(), admin=admin,
                        approved_at=datetime.now(UTC).isoformat())
    ApprovalRegistry(site.path).record(approval)
    AuditLog(site.path).record(RequestApproved(request_id=approval.request_id, code_hash=approval.code_hash,
                                               researcher=approval.researcher,
                                               researcher_email=approval.researcher_email, dataset=approval.dataset,
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
        summary = _summary(client, request)
        raw = request.code.raw_code if summary.is_code else ""
    AuditLog(site.path).record(RequestDenied(request_id=summary.request_id, code_hash=code_hash(raw),
                                             researcher=summary.researcher, researcher_email=summary.researcher_email,
                                             dataset=_planned_dataset(raw) if summary.is_code else "?", admin=admin,
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
    registry = ApprovalRegistry(site.path)
    approval = resolve_request_id(request_id, registry.all(), lambda approval: approval.request_id,
                                  what="live approval", listed_by="`fedsite admin audit`")
    registry.revoke(approval.code_hash, reason=reason, admin=admin)
    AuditLog(site.path).record(RequestDenied(request_id=approval.request_id, code_hash=approval.code_hash,
                                             researcher=approval.researcher, researcher_email=approval.researcher_email,
                                             dataset=approval.dataset, admin=admin,
                                             reason=f"approval revoked: {reason}"))
    return approval
