"""Planning a run: the typed plan for a set of sites, with a fresh run id and the secure sum's clip."""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from policies.dp import DPPlan, DPPlanError
from policies.federated_plan import PLAN_FORMAT, FederatedPlan


class PlannedSite(Protocol):
    """What a plan needs of a site: its name and the identity key its peers' admins pinned (hex)."""

    name: str
    identity_key: str


def new_run_id() -> str:
    return "run-" + secrets.token_hex(6)


def update_clip(dp: DPPlan) -> float:
    """A per-coordinate bound on one round's update: ``learning_rate * local_steps`` (times ``clip_norm`` for SGD).

    An AdamW step moves each parameter by about ``learning_rate`` at most (the ratio of the bias-corrected
    moments stays near 1 in magnitude); an SGD step by ``learning_rate`` times the clipped mean gradient,
    whose coordinates are at most ``clip_norm``, plus noise. Clamping is post-processing of the DP output,
    so a tight range costs no privacy; it only keeps quantisation fine (24 bits over ``[-clip, clip]``).
    """
    per_step = dp.learning_rate if dp.optimizer == "adamw" else dp.learning_rate * dp.clip_norm
    return float(per_step * dp.local_steps)


def make_plan(
    *,
    sites: Sequence[PlannedSite],
    model: Mapping[str, Any],
    dp: Mapping[str, Any],
    vector_length: int,
    threshold: int | None = None,
    clip: float | None = None,
    quantisation_bits: int = 24,
    dataset: str = "imdb",
    run_id: str | None = None,
) -> FederatedPlan:
    """The typed plan for ``sites``, parsed by the same parser the sites use (``to_dict()`` is what is submitted).

    ``clip`` is the secure sum's per-coordinate range for one site's update; by default the most one
    round of local steps can move a parameter (``update_clip``), so the clamp rarely bites.
    """
    if clip is None:
        try:
            clip = update_clip(DPPlan.from_dict(dict(dp)))
        except DPPlanError:
            clip = 1.0  # a placeholder: FederatedPlan.parse below refuses the plan and names the bad field

    raw = {
        "format": PLAN_FORMAT,
        "run_id": run_id or new_run_id(),
        "dataset": dataset,
        "model": dict(model),
        "dp": dict(dp),
        "secure_sum": {"vector_length": vector_length, "clip": float(clip), "quantisation_bits": quantisation_bits,
                       "threshold": threshold if threshold is not None else len(sites) // 2 + 1,
                       "modulus_bits": 32, "neighbourhood_size": None},
        "roster": [[site.name, site.identity_key] for site in sites],
    }
    return FederatedPlan.parse(raw)


__all__ = ["PlannedSite", "make_plan", "new_run_id", "update_clip"]
