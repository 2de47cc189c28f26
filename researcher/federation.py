"""The researcher's side of a federated run: plan, submit, then drive DP rounds through the secure sum.

The researcher is also the aggregator (DESIGN.md, "Roles"). For each round it runs one SecAgg
session (Bonawitz et al. 2017, Figure 4) over the sites: every stage is one call of the approved
function at every site still answering, made concurrently; a site that fails to answer (killed,
unreachable) drops out of the session, which completes with the survivors when at least the
threshold of them remain; a site that *refuses* (its policy says no) stops the run with the site's
reason. The sum of the survivors' clipped DP updates is averaged into the global model (FedAvg).

A round that cannot finish is retried with a new session only while no site has released its masked
input for it. A site that released a round has spent privacy on it and refuses any second session of
it, so once one has, the round is *lost* (``researcher.lost_rounds``) and the run goes on with the next
round from the last global model.
"""

from __future__ import annotations

import importlib.util
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from policies.approvals import Approval
from policies.contracts import (
    ASSET,
    INPUT_POLICY,
    OUTPUT_POLICY,
    ContractError,
    DryRun,
    Refused,
    Stage,
    StageMessage,
    encode_vector,
    find_refusal,
    reply_from_wire,
)
from policies.federated_plan import FederatedPlan
from policies.review import code_hash
from policies.secagg import (
    AdvertiseKeys,
    MaskedInput,
    SecAggError,
    SecureSumAggregator,
    ShareKeys,
    SurvivorSignature,
    UnmaskShares,
)
from policies.submission import SubmissionError, dry_run, function_name, render_round_function
from policies.syft_client import quiet
from researcher.lost_rounds import RoundLostError
from researcher.planning import make_plan as make_plan  # re-exported: planning and submitting go together
from researcher.planning import new_run_id as new_run_id
from researcher.planning import update_clip as update_clip
from researcher.report import LostRound

# What syft 0.9.5 tells a caller below the data-owner role when a service raises anything but a refusal
_HIDDEN_SERVER_ERROR = re.compile(r"Something unexpected happened server side <class '([^']+)'>")


class SiteRefusedError(RuntimeError):
    """A site's policy refused a call; the message is the site's reason."""


class RoundFailedError(RuntimeError):
    """Too few sites answered to finish a round's secure sum, in every attempt; no site released it."""


def describe_site_failure(site: str, exc: BaseException) -> str:
    """Why a call to ``site`` failed, in words the researcher can act on.

    syft hides a site's unexpected server-side exception from a researcher behind its type; the site
    logs the traceback (``datasites.server_errors``), so the message says where it is.
    """
    hidden = _HIDDEN_SERVER_ERROR.search(str(exc))
    if hidden is None:
        return f"{type(exc).__name__}: {exc}"
    kind = hidden.group(1).rsplit(".", 1)[-1]
    return (f"{site} failed server side with {kind} (syft shows a researcher only its type); the traceback is "
            f"in {site}'s log (logger fedsite.site, level ERROR): ask its admin for it")


@dataclass
class SiteHandle:
    """One datasite as the researcher sees it."""

    name: str  # the site's id in the roster (its syft server name)
    client: Any  # the researcher's logged-in syft client
    identity_key: str  # the site's Ed25519 public key (hex), as its admin published it and you pinned it
    dataset: str = "imdb"
    # The private asset's pointer, looked up once and kept across rounds: syft 0.9.5 refetches the whole
    # API on every `client.datasets[...]` (seconds per call). Forgotten when the site stops answering.
    _asset: Any = field(default=None, repr=False, compare=False)

    def asset(self) -> Any:
        if self._asset is None:
            with quiet():
                self._asset = self.client.datasets[self.dataset].assets[ASSET]
        return self._asset

    def forget_asset(self) -> None:
        self._asset = None


def load_round_function(plan: FederatedPlan, directory: Path) -> Callable[..., Any]:
    """Write the canonical round function for ``plan`` to a file and import it (syft reads its source)."""
    directory.mkdir(parents=True, exist_ok=True)
    name = function_name(plan.run_id)
    path = directory / f"{name}.py"
    path.write_text(render_round_function(plan), encoding="utf-8")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def submit(site: SiteHandle, plan: FederatedPlan, directory: Path) -> None:
    """Request execution of the round function at ``site``, bound to its private asset."""
    name = function_name(plan.run_id)
    source = render_round_function(plan)
    with quiet():
        earlier = site.client.api.services.code.get_by_service_func_name(name)
    if isinstance(earlier, list) and earlier:
        if all(code_hash(str(code.raw_code)) == code_hash(source) for code in earlier):
            return  # this exact request is already at the site: submitting is idempotent
        raise SubmissionError(
            f"{site.name} already has a request for run {plan.run_id} with different code or plan; syft calls "
            "a function by name, so one run_id must mean one function: make a new plan (make_plan draws a "
            "fresh run_id) and submit that"
        )
    request_execution(site, plan, directory)


def request_execution(site: SiteHandle, plan: FederatedPlan, directory: Path) -> None:
    """Send syft's code request for ``plan`` at ``site`` without ``submit``'s check for an earlier one.

    The sites never rely on that check (a researcher can skip it): their guard refuses any code that
    lacks Fedsite's approval, which is what the end-to-end attack suite shows with this call.
    """
    import syft as sy
    from syft.service.policy import policy as syft_policy

    function = load_round_function(plan, directory)
    asset = site.asset()
    with quiet():
        syft_function = sy.syft_function(
            input_policy=getattr(syft_policy, INPUT_POLICY)(client=site.client, data=asset, stage=str, message=dict),
            # syft 0.9.5 does not enforce this limit; the site's own policy counts rounds
            output_policy=getattr(syft_policy, OUTPUT_POLICY)(limit=1_000_000),
        )(function)
        try:
            site.client.code.request_code_execution(syft_function)
        except Exception as exc:
            if _HIDDEN_SERVER_ERROR.search(str(exc)) is None:
                raise
            raise SubmissionError(f"{site.name} did not take the code request: {describe_site_failure(site.name, exc)}"
                                  ) from exc
        # The request adds the function to this user's API at the site; fetch the API now, or the first
        # round's first call finds it missing and syft refetches the API then (seconds, mid-round).
        site.client.refresh()


def dry_run_on_mock(site: SiteHandle, plan: FederatedPlan) -> DryRun:
    """Run the exact function you would submit on ``site``'s mock twin, locally (nothing is sent).

    It builds the planned model, checks its size against the plan and takes one noisy step, as the
    site's admin will in the review; a failure here will be a refusal there.
    """
    source = render_round_function(plan)
    approval = Approval(request_id="local-dry-run", code_hash=code_hash(source), researcher="you",
                        researcher_email="you", dataset=plan.dataset, plan=plan.to_dict(), calibrated={}, admin="none",
                        approved_at=datetime.now(UTC).isoformat())
    with quiet():
        mock = site.asset().mock
    result = dry_run(source, mock, site=site.name, researcher="you", approval=approval)
    if isinstance(result, Refused):
        raise SiteRefusedError(f"dry run on {site.name}'s mock: {result.reason}")
    if not isinstance(result, DryRun):
        raise SiteRefusedError(f"dry run on {site.name}'s mock answered {type(result).__name__}, not a dry run")
    return result


@dataclass
class StageTimes:
    """Seconds of one round, by where they went."""

    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        self.seconds[key] = round(self.seconds.get(key, 0.0) + value, 3)


@dataclass(frozen=True)
class RoundOutcome:
    round_index: int
    attempt: int
    participants: tuple[str, ...]  # whose updates are in the sum
    dropped: tuple[str, ...]  # sites that stopped answering during the round
    average: np.ndarray  # mean of the participants' clipped DP updates, float64 [vector_length]
    times: dict[str, float]
    epsilon_spent: dict[str, float]  # site -> the researcher's cumulative epsilon there, as the site reported
    drop_reasons: dict[str, str]  # dropped site -> why (describe_site_failure)


class FederatedRound:
    """One attempt at one round: a SecAgg session driven over the sites."""

    def __init__(self, sites: Sequence[SiteHandle], plan: FederatedPlan, round_index: int, attempt: int) -> None:
        self.sites = {site.name: site for site in sites}
        self.plan = plan
        self.round_index, self.attempt = round_index, attempt
        self.aggregator = SecureSumAggregator(plan.context(round_index, attempt))
        self.function = function_name(plan.run_id)
        self.dropped: list[str] = []
        self.drop_reasons: dict[str, str] = {}
        self.epsilon_spent: dict[str, float] = {}
        self.times = StageTimes()
        self.stage = Stage.ADVERTISE_KEYS  # the stage under way, or the last one called
        self.masked_sent: tuple[str, ...] = ()  # sites asked for their masked input
        self.released: dict[str, float | None] = {}  # site -> the epsilon its masked-input reply reported

    def _call(self, site: SiteHandle, stage: Stage, extra: Mapping[str, Any]) -> StageMessage | None:
        """One stage at one site: its message, None if it did not answer; raises on a refusal."""
        message = {"round": self.round_index, "attempt": self.attempt, **extra}
        try:
            with quiet():
                result = getattr(site.client.code, self.function)(data=site.asset(), stage=Stage(stage).value,
                                                                 message=message)  # syft sends plain str
            reply = result.get() if hasattr(result, "get") and not isinstance(result, dict) else result
        except Exception as exc:  # noqa: BLE001 - a site that cannot answer drops out of the session
            refused = find_refusal(str(exc))  # the site's guard or gate said no: not a dropout
            if refused is not None:
                raise SiteRefusedError(refused) from None
            site.forget_asset()  # a restarted site is looked up afresh next time
            self._dropped(site.name, f"{stage}: {describe_site_failure(site.name, exc)}")
            return None
        if not isinstance(reply, dict):
            text = str(reply)
            if "refused" in text:
                raise SiteRefusedError(text)
            self._dropped(site.name, f"{stage}: {text}")
            return None
        try:
            typed = reply_from_wire(reply)
        except ContractError as exc:
            self._dropped(site.name, f"{stage}: {exc}")
            return None
        if isinstance(typed, Refused):
            raise SiteRefusedError(typed.reason)
        if not isinstance(typed, StageMessage):
            self._dropped(site.name, f"{stage}: the site answered {type(typed).__name__}, not a stage message")
            return None
        if stage == Stage.MASK_INPUT:  # it spent and released: this round can never have another session there
            self.released[site.name] = typed.epsilon_spent
        return typed

    def _dropped(self, site: str, why: str) -> None:
        if site not in self.dropped:
            self.dropped.append(site)
            self.drop_reasons[site] = why

    def _stage(self, stage: Stage, among: Sequence[str],
               extra: Callable[[str], Mapping[str, Any]]) -> dict[str, StageMessage]:
        """Call ``stage`` at every site of ``among`` concurrently; returns the replies of those that answered."""
        started = time.perf_counter()
        live = [name for name in among if name not in self.dropped]
        self.stage = stage
        if stage == Stage.MASK_INPUT:
            self.masked_sent = tuple(live)
        with ThreadPoolExecutor(max_workers=max(1, len(live))) as pool:
            futures = {name: pool.submit(self._call, self.sites[name], stage, extra(name)) for name in live}
            replies = {name: future.result() for name, future in futures.items()}
        self.times.add(stage, time.perf_counter() - started)
        return {name: reply for name, reply in replies.items() if reply is not None}

    def run(self, global_vector: np.ndarray) -> RoundOutcome:
        agg = self.aggregator
        for reply in self._stage(Stage.ADVERTISE_KEYS, list(self.sites), lambda _: {}).values():
            agg.receive_advertise_keys(AdvertiseKeys.from_wire(reply.message))
        round_keys = agg.close_advertise_keys().to_wire()
        for reply in self._stage(Stage.SHARE_KEYS, agg.advertised, lambda _: {"round_keys": round_keys}).values():
            agg.receive_share_keys(ShareKeys.from_wire(reply.message))
        inboxes = {name: inbox.to_wire() for name, inbox in agg.close_share_keys().items()}
        model = encode_vector(global_vector)
        replies = self._stage(Stage.MASK_INPUT, agg.shared,
                              lambda name: {"incoming": inboxes[name], "global_model": model})
        for name, reply in replies.items():
            agg.receive_masked_input(MaskedInput.from_wire(reply.message))
            self.epsilon_spent[name] = reply.epsilon_spent or 0.0
        survivors = agg.close_masked_input().to_wire()
        for reply in self._stage(Stage.CONSISTENCY_CHECK, agg.survivors, lambda _: {"survivors": survivors}).values():
            agg.receive_survivor_signature(SurvivorSignature.from_wire(reply.message))
        signed = agg.close_consistency_check().to_wire()
        for reply in self._stage(Stage.UNMASK, agg.signers, lambda _: {"signed": signed}).values():
            agg.receive_unmask_shares(UnmaskShares.from_wire(reply.message))
        started = time.perf_counter()
        self.stage = Stage.UNMASK
        result = agg.finish()
        self.times.add("unmask_aggregate", time.perf_counter() - started)
        average = np.asarray(result.total, dtype=np.float64) / len(result.participants)
        participants = tuple(result.participants)
        dropped = tuple(name for name in self.sites if name not in participants)
        return RoundOutcome(self.round_index, self.attempt, participants, dropped, average, dict(self.times.seconds),
                            {name: self.epsilon_spent[name] for name in participants if name in self.epsilon_spent},
                            {name: self.drop_reasons.get(name, "left the secure sum") for name in dropped})

    def lost(self, reason: str) -> LostRound:
        """This session as a lost round: who released (and the epsilon each reported), where, why."""
        reported = {name: value for name, value in self.released.items()
                    if isinstance(value, float) and math.isfinite(value) and value >= 0}
        return LostRound(round_index=self.round_index, attempt=self.attempt, stage=self.stage, reason=reason,
                         released=tuple(name for name in self.sites if name in self.released),
                         epsilon_spent=reported,
                         unconfirmed=tuple(name for name in self.masked_sent if name not in self.released),
                         drop_reasons=dict(self.drop_reasons), seconds=dict(self.times.seconds))


def run_round(sites: Sequence[SiteHandle], plan: FederatedPlan, round_index: int, global_vector: np.ndarray,
              *, max_attempts: int = 3, first_attempt: int = 0) -> RoundOutcome:
    """Run ``round_index``; retry with a new session when too few sites finish (e.g. a crash) and none released.

    Raises ``RoundLostError`` when a session fails after any site released its masked input (a retry could
    never finish: that site refuses a second session of the round), ``RoundFailedError`` after the last
    attempt, ``SiteRefusedError`` when a site refuses before any release.
    """
    last_error: Exception | None = None
    reasons: dict[str, str] = {}
    for attempt in range(first_attempt, first_attempt + max_attempts):
        session = FederatedRound(sites, plan, round_index, attempt)
        try:
            return session.run(global_vector)
        except (SecAggError, SiteRefusedError) as exc:  # below threshold at some stage, or a site said no
            if session.released:
                raise RoundLostError(session.lost(str(exc))) from exc
            if isinstance(exc, SiteRefusedError):
                raise
            last_error, reasons = exc, session.drop_reasons
    why = "; ".join(f"{name} dropped at {reason}" for name, reason in sorted(reasons.items()))
    raise RoundFailedError(f"round {round_index} failed {max_attempts} times: {last_error}"
                           + (f" (last attempt: {why})" if why else ""))

