"""Run a whole session in one process: the reference for how a round is driven.

A deployment runs each site stage as a separate execution at that site and carries the messages
over syft; this driver makes the same calls in the same order, with every message round-tripped
through ``to_wire``/``from_wire`` and every site state through ``to_bytes``/``from_bytes`` (as if
each stage ran in a fresh process). Tests use it for exact-sum and dropout properties, and
``bench/secure_sum.py`` for timings.

Order of calls (U1 >= U2 >= U3 >= U4 >= U5 are the sites still answering):

    aggregator = SecureSumAggregator(context)
    state, msg = advertise_keys(context, site_id=u, identity_key=key_u)     # every site
    aggregator.receive_advertise_keys(msg)
    round_keys = aggregator.close_advertise_keys()
    state, msg = share_keys(state, round_keys)                              # every site in U1
    aggregator.receive_share_keys(msg)
    inboxes = aggregator.close_share_keys()
    state, msg = mask_input(state, inboxes[u], update_u)                    # every site in U2
    aggregator.receive_masked_input(msg)
    survivors = aggregator.close_masked_input()
    state, msg = consistency_check(state, survivors, identity_key=key_u)    # every site in U3
    aggregator.receive_survivor_signature(msg)
    signed = aggregator.close_consistency_check()
    state, msg = unmask(state, signed)                                      # every site in U4
    aggregator.receive_unmask_shares(msg)
    result = aggregator.finish()
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, TypeVar

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from policies.secagg.aggregator import SecureSumAggregator, SecureSumResult
from policies.secagg.context import RoundContext
from policies.secagg.messages import (
    AdvertiseKeys,
    IncomingShares,
    MaskedInput,
    RoundKeys,
    ShareKeys,
    SignedSurvivors,
    Survivors,
    SurvivorSignature,
    UnmaskShares,
)
from policies.secagg.site import advertise_keys, consistency_check, mask_input, share_keys, unmask
from policies.secagg.state import SiteRoundState

_M = TypeVar("_M")


class DropPoint(IntEnum):
    """The first stage a site no longer answers (Figure 4: it leaves U1, U2, U3, U4 or U5)."""

    ADVERTISE_KEYS = 0  # never advertises keys: not in U1
    SHARE_KEYS = 1  # advertised keys, then silent: in U1, not in U2
    MASKED_INPUT = 2  # shared its keys, then silent: in U2, not in U3 (its pairwise masks are undone)
    CONSISTENCY_CHECK = 3  # sent its masked input, then silent: in U3 (its input counts), not in U4
    UNMASK = 4  # signed U3, then silent: in U4, not in U5


@dataclass
class LocalRound:
    """The outcome of ``run_in_memory_round``: the sum, each site's last state, and the seconds
    spent per party ("aggregator" or a site id) and stage."""

    result: SecureSumResult
    states: dict[str, SiteRoundState]
    seconds: dict[str, dict[str, float]] = field(default_factory=lambda: defaultdict(dict))

    def site_seconds(self, site: str) -> float:
        return sum(self.seconds[site].values())

    def aggregator_seconds(self) -> float:
        return sum(self.seconds["aggregator"].values())


def run_in_memory_round(
    context: RoundContext,
    identity_keys: Mapping[str, Ed25519PrivateKey],
    updates: Mapping[str, np.ndarray],
    *,
    dropouts: Mapping[str, DropPoint] | None = None,
) -> LocalRound:
    """Run one session over every roster site that has an update, dropping sites as told."""
    session = InMemorySession(context, identity_keys, updates, dropouts=dropouts)
    round_keys = session.advertise_keys()
    inboxes = session.share_keys(round_keys)
    survivors = session.mask_input(inboxes)
    signed = session.consistency_check(survivors)
    result = session.unmask(signed)
    states = {site: session.state(site) for site in session.states}
    return LocalRound(result=result, states=states, seconds=session.seconds)


class InMemorySession:
    """The parties of one session in one process, advanced one stage at a time.

    Each stage method runs the site side at every site still answering (per ``dropouts``), feeds
    each outgoing message through its wire form to the aggregator, closes the stage and returns the
    aggregator's broadcast, also through its wire form. Sites keep only the bytes of their state
    between stages. Tests that play a malicious aggregator stop after any stage and call the site
    functions themselves with ``state(site)``.
    """

    def __init__(
        self,
        context: RoundContext,
        identity_keys: Mapping[str, Ed25519PrivateKey],
        updates: Mapping[str, np.ndarray],
        *,
        dropouts: Mapping[str, DropPoint] | None = None,
    ) -> None:
        self.context = context
        self.identity_keys = identity_keys
        self.updates = updates
        self.dropouts = dict(dropouts or {})
        self.aggregator = SecureSumAggregator(context)
        self.states: dict[str, bytes] = {}  # what each site persisted after its last stage
        self.seconds: dict[str, dict[str, float]] = defaultdict(dict)

    def state(self, site: str) -> SiteRoundState:
        return SiteRoundState.from_bytes(self.states[site])

    def advertise_keys(self) -> RoundKeys:
        """Round 0 at every answering site, then the aggregator's RoundKeys broadcast."""
        for site in self._answering(DropPoint.ADVERTISE_KEYS, self.context.roster.site_ids):
            wire = self._timed(site, "advertise_keys", self._advertise, site)
            self._timed(
                "aggregator",
                "advertise_keys",
                self.aggregator.receive_advertise_keys,
                AdvertiseKeys.from_wire(wire),
            )
        closed = self._timed("aggregator", "advertise_keys", self.aggregator.close_advertise_keys)
        return RoundKeys.from_wire(closed.to_wire())

    def share_keys(self, round_keys: RoundKeys) -> dict[str, IncomingShares]:
        """Round 1 at every answering site in U1, then each site's forwarded shares."""
        for site in self._answering(DropPoint.SHARE_KEYS, self.aggregator.advertised):
            wire = self._timed(site, "share_keys", self._site_step, site, share_keys, round_keys)
            self._timed(
                "aggregator", "share_keys", self.aggregator.receive_share_keys, ShareKeys.from_wire(wire)
            )
        inboxes = self._timed("aggregator", "share_keys", self.aggregator.close_share_keys)
        return {site: IncomingShares.from_wire(inbox.to_wire()) for site, inbox in inboxes.items()}

    def mask_input(self, inboxes: Mapping[str, IncomingShares]) -> Survivors:
        """Round 2 at every answering site in U2, then the Survivors (U3) broadcast."""
        for site in self._answering(DropPoint.MASKED_INPUT, self.aggregator.shared):
            wire = self._timed(
                site, "mask_input", self._site_step, site, mask_input, inboxes[site], self.updates[site]
            )
            self._timed(
                "aggregator", "mask_input", self.aggregator.receive_masked_input, MaskedInput.from_wire(wire)
            )
        closed = self._timed("aggregator", "mask_input", self.aggregator.close_masked_input)
        return Survivors.from_wire(closed.to_wire())

    def consistency_check(self, survivors: Survivors) -> SignedSurvivors:
        """Round 3 at every answering site in U3, then the SignedSurvivors broadcast."""
        for site in self._answering(DropPoint.CONSISTENCY_CHECK, self.aggregator.survivors):
            key = self.identity_keys[site]
            wire = self._timed(
                site,
                "consistency_check",
                self._site_step,
                site,
                consistency_check,
                survivors,
                identity_key=key,
            )
            signature = SurvivorSignature.from_wire(wire)
            self._timed(
                "aggregator", "consistency_check", self.aggregator.receive_survivor_signature, signature
            )
        closed = self._timed("aggregator", "consistency_check", self.aggregator.close_consistency_check)
        return SignedSurvivors.from_wire(closed.to_wire())

    def unmask(self, signed: SignedSurvivors) -> SecureSumResult:
        """Round 4 at every answering site in U4, then the aggregator's result."""
        for site in self._answering(DropPoint.UNMASK, self.aggregator.signers):
            wire = self._timed(site, "unmask", self._site_step, site, unmask, signed)
            self._timed(
                "aggregator", "unmask", self.aggregator.receive_unmask_shares, UnmaskShares.from_wire(wire)
            )
        return self._timed("aggregator", "unmask", self.aggregator.finish)

    def _answering(self, stage: DropPoint, among: tuple[str, ...]) -> list[str]:
        """The sites of ``among`` with an update that have not dropped by ``stage``."""
        return [s for s in among if s in self.updates and self.dropouts.get(s, len(DropPoint)) > stage]

    def _timed(self, party: str, stage: str, call: Callable[..., _M], *args: Any, **kwargs: Any) -> _M:
        start = time.perf_counter()
        value = call(*args, **kwargs)
        self.seconds[party][stage] = self.seconds[party].get(stage, 0.0) + time.perf_counter() - start
        return value

    def _advertise(self, site: str) -> dict[str, Any]:
        state, message = advertise_keys(self.context, site_id=site, identity_key=self.identity_keys[site])
        self.states[site] = state.to_bytes()
        return message.to_wire()

    def _site_step(
        self, site: str, stage: Callable[..., tuple[SiteRoundState, Any]], *args: Any, **kwargs: Any
    ) -> dict[str, Any]:
        """Restore the site's state from bytes, run one stage, persist the new state, then release."""
        new_state, message = stage(self.state(site), *args, **kwargs)
        self.states[site] = new_state.to_bytes()  # persisted before the message is released
        wire: dict[str, Any] = message.to_wire()
        return wire
