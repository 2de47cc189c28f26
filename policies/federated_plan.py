"""The plan of one federated run: what a researcher asks every site to run, and what each admin approves.

It is plain JSON, written as a literal into the submitted function (so the code hash covers it) and
validated here in full, by the researcher before submitting and by the site at review and at
every execution. Both sides use this one parser, so they cannot disagree about a field. The model
field's schema is ``models.spec.ModelSpec`` (the site-installed ``models`` package), parsed from here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from models.spec import ModelConfigError, ModelSpec
from policies.dp import DPPlan, DPPlanError
from policies.secagg import Roster, RoundContext, SecAggError, SecureSumConfig

PLAN_FORMAT = 1
_RUN_ID = re.compile(r"^run-[0-9a-f]{8,32}$")
_DATASET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class FederatedPlanError(ValueError):
    """A federated plan is malformed; the message names the field and the fix."""


def _require(raw: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str = "plan") -> Any:
    if key not in raw:
        raise FederatedPlanError(f"{where} has no {key!r}")
    value = raw[key]
    if isinstance(value, bool) and kind is not bool:
        raise FederatedPlanError(f"{where}[{key!r}] must be {kind}, got a bool")
    if not isinstance(value, kind):
        raise FederatedPlanError(f"{where}[{key!r}] must be {kind}, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class FederatedPlan:
    """A validated plan (see the module docstring)."""

    run_id: str  # "run-<hex>": names the run in every ledger record, session id and file of the sites
    dataset: str  # the site dataset it trains on
    model: ModelSpec  # which model every site builds: its schema is models.spec, its builder models.build_from_spec
    dp: DPPlan  # the DP-SGD plan of every site (rounds, local steps, batch, clip, target epsilon, delta)
    secure_sum: SecureSumConfig  # the secure-sum parameters (vector_length = trainable parameters)
    roster: Roster  # the sites, in order, with their admin-pinned Ed25519 identity keys
    raw: Mapping[str, Any]  # the JSON it was parsed from (hashed into the approval)

    @staticmethod
    def parse(raw: object) -> FederatedPlan:
        if not isinstance(raw, Mapping):
            raise FederatedPlanError(f"a federated plan must be a mapping, got {type(raw).__name__}")
        if raw.get("format") != PLAN_FORMAT:
            raise FederatedPlanError(f"plan['format'] must be {PLAN_FORMAT}, got {raw.get('format')!r}")
        unknown = set(raw) - {"format", "run_id", "dataset", "model", "dp", "secure_sum", "roster"}
        if unknown:
            raise FederatedPlanError(f"plan has unknown fields {sorted(unknown)}")
        run_id = _require(raw, "run_id", str)
        if not _RUN_ID.match(run_id):
            raise FederatedPlanError(f"plan['run_id'] must look like 'run-<8 to 32 hex digits>', got {run_id!r}")
        dataset = _require(raw, "dataset", str)
        if not _DATASET.match(dataset):
            raise FederatedPlanError(f"plan['dataset'] {dataset!r} is not a dataset name")
        try:
            dp = DPPlan.from_dict(_require(raw, "dp", Mapping))
            if dp.clipping_mode != "hooks":
                # Ghost clipping never holds per-sample gradients, so a record whose gradient overflows (a
                # crafted global model can make one) would poison its batch's sum: see policies.dp.optimizers._FiniteRecords.
                raise DPPlanError(f"clipping_mode must be 'hooks' in a federated plan, got {dp.clipping_mode!r}: "
                                  "ghost clipping cannot leave out a record whose gradient is not finite")
            secure_sum = SecureSumConfig.from_wire(_require(raw, "secure_sum", Mapping))
            roster = Roster.of((str(site), bytes.fromhex(str(key))) for site, key in _require(raw, "roster", list))
            RoundContext(config=secure_sum, roster=roster, session_id=f"{run_id}/check")
        except (DPPlanError, SecAggError, ValueError, TypeError) as exc:
            raise FederatedPlanError(f"invalid plan: {exc}") from exc
        try:
            model = ModelSpec.parse(raw.get("model"), where="plan['model']")
        except ModelConfigError as exc:
            raise FederatedPlanError(str(exc)) from exc
        return FederatedPlan(run_id=run_id, dataset=dataset, model=model, dp=dp, secure_sum=secure_sum, roster=roster,
                             raw=raw)

    def session_id(self, round_index: int, attempt: int) -> str:
        """The secure-sum session of one attempt at one round; fixed by the plan, not by the researcher."""
        return f"{self.run_id}/round-{round_index}/attempt-{attempt}"

    def context(self, round_index: int, attempt: int) -> RoundContext:
        return RoundContext(config=self.secure_sum, roster=self.roster, session_id=self.session_id(round_index, attempt))
