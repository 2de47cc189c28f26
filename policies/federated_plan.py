"""The plan of one federated run: what a researcher asks every site to run, and what each admin approves.

It is plain JSON, written as a literal into the submitted function (so the code hash covers it) and
validated here in full, by the researcher before submitting and by the site at review and at
every execution. Both sides use this one parser, so they cannot disagree about a field.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from policies.dp import DPPlan, DPPlanError
from policies.secagg import Roster, RoundContext, SecAggError, SecureSumConfig

PLAN_FORMAT = 1
_RUN_ID = re.compile(r"^run-[0-9a-f]{8,32}$")
_DATASET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_TRAINABLE_KEYS = {"kind", "top_k", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets"}
# A test model's sizes, bounded: the admin's review builds the model (a huge one would exhaust its machine).
_TINY_KEYS = {"vocab_size": 250_000, "hidden_size": 4096, "layers": 48, "heads": 64, "max_length": 8192}
# A model a site loads from its own installed copy: a Hugging Face name, never a path into the site's disk
# (from_pretrained would read any directory there, and whether it exists would answer the researcher).
_MODEL_NAME = re.compile(r"(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")


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
class ModelSpec:
    """Which model every site builds (from its own installed copy; nothing is downloaded)."""

    name: str | None  # a Hugging Face BERT-family name (never a path: _MODEL_NAME); None with ``tiny``; default MiniLM
    tiny: Mapping[str, int] | None  # keyword arguments of researcher.models.tiny_bert_config (tests)
    trainable: Mapping[str, Any]  # keyword arguments of researcher.models.TrainableSet
    seed: int  # seeds every weight that is not loaded (tiny models, new heads), identical at every site
    pooling: str = "mean"  # what the classifier reads: "mean" (masked mean of the last layer) or "cls"
    centre: tuple[float, ...] | None = None  # subtracted from the mean-pooled embedding (researcher.models)
    head_init: Mapping[str, Any] | None = None  # the classifier's initial weight and bias (researcher.models.prompt_head)
    dropout: float | None = None  # every dropout probability of the model; None keeps the checkpoint's

    @staticmethod
    def parse(raw: object) -> ModelSpec:
        if not isinstance(raw, Mapping):
            raise FederatedPlanError("plan['model'] must be a mapping with name, tiny and trainable")
        unknown = set(raw) - {"name", "tiny", "trainable", "seed", "pooling", "centre", "head_init", "dropout"}
        if unknown:
            raise FederatedPlanError(f"plan['model'] has unknown fields {sorted(unknown)}")
        name, tiny = raw.get("name"), raw.get("tiny")
        if (name is None) == (tiny is None):
            raise FederatedPlanError("plan['model'] needs exactly one of 'name' (a checkpoint) and 'tiny' (a config)")
        if name is not None and not isinstance(name, str):
            raise FederatedPlanError(f"plan['model']['name'] must be a str, got {type(name).__name__}")
        if name is not None and not _MODEL_NAME.fullmatch(name):
            raise FederatedPlanError(f"plan['model']['name'] {name!r} is not a model name: use a Hugging Face name such as "
                                     "all-MiniLM-L6-v2 or org/model (a site loads it from its own installed copy; "
                                     "no absolute path, no '..')")
        if tiny is not None and (not isinstance(tiny, Mapping) or set(tiny) - set(_TINY_KEYS)
                                 or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= _TINY_KEYS[k]
                                            for k, v in tiny.items())):
            raise FederatedPlanError(f"plan['model']['tiny'] must map some of {sorted(_TINY_KEYS)} to ints in "
                                     f"1..{_TINY_KEYS}")
        if tiny is not None and _tiny_parameters(tiny) > MAX_TINY_PARAMETERS:
            raise FederatedPlanError(f"plan['model']['tiny'] makes a model of about {_tiny_parameters(tiny):,} "
                                     f"parameters, over {MAX_TINY_PARAMETERS:,}: a tiny model is for tests; name a "
                                     "checkpoint for a real one")
        trainable = _require(raw, "trainable", Mapping, "plan['model']")
        if set(trainable) - _TRAINABLE_KEYS or "kind" not in trainable:
            raise FederatedPlanError(f"plan['model']['trainable'] needs 'kind' and only {sorted(_TRAINABLE_KEYS)}")
        seed = raw.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise FederatedPlanError(f"plan['model']['seed'] must be an int, got {seed!r}")
        pooling = raw.get("pooling", "mean")
        if pooling not in ("mean", "cls"):
            raise FederatedPlanError(f"plan['model']['pooling'] must be 'mean' or 'cls', got {pooling!r}")
        centre = raw.get("centre")
        if centre is not None:
            if pooling != "mean":
                raise FederatedPlanError("plan['model']['centre'] applies to pooling 'mean' only: drop it")
            if not _finite_floats(centre, most=8192):
                raise FederatedPlanError("plan['model']['centre'] must be a list of 1 to 8192 finite floats "
                                         "(researcher.models.public_centre makes one)")
            centre = tuple(centre)
        head_init = raw.get("head_init")
        if head_init is not None:
            if pooling != "mean":
                raise FederatedPlanError("plan['model']['head_init'] applies to pooling 'mean' only: drop it")
            _check_head_init(head_init)
        dropout = raw.get("dropout")
        if dropout is not None and (not isinstance(dropout, float) or not 0 <= dropout < 1):
            raise FederatedPlanError(f"plan['model']['dropout'] must be a float in [0, 1) (e.g. 0.0), got {dropout!r}")
        return ModelSpec(name=name, tiny=tiny, trainable=trainable, seed=seed, pooling=pooling, centre=centre,
                         head_init=head_init, dropout=dropout)


MAX_TINY_PARAMETERS = 50_000_000  # the admin's review builds the model before anything else: keep it small


def _tiny_parameters(tiny: Mapping[str, int]) -> int:
    """About how many parameters researcher.models.tiny_bert_config makes (FFN width 2h), without building it."""
    sizes = {"vocab_size": 128, "hidden_size": 32, "layers": 2, "max_length": 64, **tiny}
    hidden = sizes["hidden_size"]
    return (sizes["vocab_size"] + sizes["max_length"] + 2) * hidden + sizes["layers"] * (8 * hidden * hidden + 9 * hidden)


def _finite_floats(value: object, *, most: int) -> bool:
    return (isinstance(value, list) and 1 <= len(value) <= most
            and all(isinstance(v, float) and math.isfinite(v) for v in value))


def _check_head_init(head_init: object) -> None:
    """A head_init is {"weight": labels x hidden finite floats, "bias": labels finite floats}."""
    fix = "(researcher.models.prompt_head makes one)"
    if not isinstance(head_init, Mapping) or set(head_init) != {"weight", "bias"}:
        raise FederatedPlanError(f"plan['model']['head_init'] must be a mapping with 'weight' and 'bias' {fix}")
    weight, bias = head_init["weight"], head_init["bias"]
    if (not isinstance(weight, list) or not 2 <= len(weight) <= 64
            or not all(_finite_floats(row, most=8192) for row in weight)
            or len({len(row) for row in weight}) != 1):
        raise FederatedPlanError("plan['model']['head_init']['weight'] must be 2 to 64 rows (one per label) of "
                                 f"equally many finite floats {fix}")
    if not _finite_floats(bias, most=64) or len(bias) != len(weight):
        raise FederatedPlanError(f"plan['model']['head_init']['bias'] must be one finite float per weight row {fix}")


@dataclass(frozen=True)
class FederatedPlan:
    """A validated plan (see the module docstring)."""

    run_id: str  # "run-<hex>": names the run in every ledger record, session id and file of the sites
    dataset: str  # the site dataset it trains on
    model: ModelSpec
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
                # crafted global model can make one) would poison its batch's sum: see policies.dp._FiniteRecords.
                raise DPPlanError(f"clipping_mode must be 'hooks' in a federated plan, got {dp.clipping_mode!r}: "
                                  "ghost clipping cannot leave out a record whose gradient is not finite")
            secure_sum = SecureSumConfig.from_wire(_require(raw, "secure_sum", Mapping))
            roster = Roster.of((str(site), bytes.fromhex(str(key))) for site, key in _require(raw, "roster", list))
            RoundContext(config=secure_sum, roster=roster, session_id=f"{run_id}/check")
        except (DPPlanError, SecAggError, ValueError, TypeError) as exc:
            raise FederatedPlanError(f"invalid plan: {exc}") from exc
        return FederatedPlan(run_id=run_id, dataset=dataset, model=ModelSpec.parse(raw.get("model")), dp=dp,
                             secure_sum=secure_sum, roster=roster, raw=raw)

    def session_id(self, round_index: int, attempt: int) -> str:
        """The secure-sum session of one attempt at one round; fixed by the plan, not by the researcher."""
        return f"{self.run_id}/round-{round_index}/attempt-{attempt}"

    def context(self, round_index: int, attempt: int) -> RoundContext:
        return RoundContext(config=self.secure_sum, roster=self.roster, session_id=self.session_id(round_index, attempt))
