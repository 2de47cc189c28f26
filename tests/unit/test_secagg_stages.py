"""Every stage transition of both state machines: the valid ones run, every invalid one is refused."""

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.secagg_local import InMemorySession
from policies.secagg import (
    AggregatorStage,
    Roster,
    RoundContext,
    SecAggStageError,
    SecAggThresholdError,
    SecureSumConfig,
    SiteStage,
    advertise_keys,
    consistency_check,
    mask_input,
    share_keys,
    unmask,
)

pytestmark = pytest.mark.unit

D = 16
SITE = "site-00"


def federation():
    keys = {f"site-{i:02d}": Ed25519PrivateKey.generate() for i in range(3)}
    roster = Roster.of((site, key.public_key().public_bytes_raw()) for site, key in keys.items())
    config = SecureSumConfig(vector_length=D, clip=1.0, quantisation_bits=16, threshold=2)
    return RoundContext(config, roster, "run-1/round-1"), keys


def recorded_session():
    """One complete session: site-00's state after each stage, and each broadcast and site message."""
    context, keys = federation()
    updates = {site: np.zeros(D, np.float32) for site in keys}
    session = InMemorySession(context, keys, updates)
    states, broadcasts = {}, {}
    broadcasts["round_keys"] = session.advertise_keys()
    states[SiteStage.KEYS_ADVERTISED] = session.state(SITE)
    broadcasts["inboxes"] = session.share_keys(broadcasts["round_keys"])
    states[SiteStage.KEYS_SHARED] = session.state(SITE)
    broadcasts["survivors"] = session.mask_input(broadcasts["inboxes"])
    states[SiteStage.INPUT_MASKED] = session.state(SITE)
    broadcasts["signed"] = session.consistency_check(broadcasts["survivors"])
    states[SiteStage.SURVIVORS_SIGNED] = session.state(SITE)
    session.unmask(broadcasts["signed"])
    states[SiteStage.UNMASKED] = session.state(SITE)
    return context, keys, states, broadcasts


CONTEXT, KEYS, STATES, BROADCASTS = recorded_session()
SITE_STAGES = {
    "share_keys": (SiteStage.KEYS_ADVERTISED, lambda s: share_keys(s, BROADCASTS["round_keys"])),
    "mask_input": (SiteStage.KEYS_SHARED, lambda s: mask_input(s, BROADCASTS["inboxes"][SITE], np.zeros(D))),
    "consistency_check": (
        SiteStage.INPUT_MASKED,
        lambda s: consistency_check(s, BROADCASTS["survivors"], identity_key=KEYS[SITE]),
    ),
    "unmask": (SiteStage.SURVIVORS_SIGNED, lambda s: unmask(s, BROADCASTS["signed"])),
}
INVALID_SITE_TRANSITIONS = [
    (stage, action) for stage in SiteStage for action, (valid, _) in SITE_STAGES.items() if stage is not valid
]


@pytest.mark.parametrize(("stage", "action"), INVALID_SITE_TRANSITIONS, ids=lambda v: getattr(v, "value", v))
def test_site_refuses_every_invalid_transition(stage, action):
    # Prepare
    state = STATES[stage]
    before = state.to_bytes()

    # Execute / Assert
    with pytest.raises(
        SecAggStageError, match=f"{action} needs a site at stage .* but {SITE} is at '{stage.value}'"
    ):
        SITE_STAGES[action][1](state)
    assert state.to_bytes() == before


@pytest.mark.parametrize("action", list(SITE_STAGES))
def test_site_runs_every_valid_transition_once(action):
    # Prepare
    valid, call = SITE_STAGES[action]

    # Execute
    new_state, _ = call(STATES[valid])

    # Assert: each stage advances to the next one
    order = list(SiteStage)
    assert new_state.stage is order[order.index(valid) + 1]


def test_sixteen_invalid_site_transitions_are_enumerated():
    assert len(INVALID_SITE_TRANSITIONS) == len(SiteStage) * len(SITE_STAGES) - len(SITE_STAGES) == 16


# --- aggregator --------------------------------------------------------------------------------------------


def aggregator_messages():
    """One valid message of each kind a site sends, from a complete session with fresh keys."""
    context, keys = federation()
    updates = {site: np.zeros(D, np.float32) for site in keys}
    session = InMemorySession(context, keys, updates)
    messages = {}
    _, messages["advertise_keys"] = advertise_keys(context, site_id=SITE, identity_key=keys[SITE])
    round_keys = session.advertise_keys()
    _, messages["share_keys"] = share_keys(session.state(SITE), round_keys)
    inboxes = session.share_keys(round_keys)
    _, messages["masked_input"] = mask_input(session.state(SITE), inboxes[SITE], updates[SITE])
    survivors = session.mask_input(inboxes)
    _, messages["signature"] = consistency_check(session.state(SITE), survivors, identity_key=keys[SITE])
    signed = session.consistency_check(survivors)
    _, messages["unmask"] = unmask(session.state(SITE), signed)
    return messages


MESSAGES = aggregator_messages()
AGGREGATOR_ACTIONS = {
    "receive_advertise_keys": (
        AggregatorStage.COLLECTING_KEYS,
        lambda a: a.receive_advertise_keys(MESSAGES["advertise_keys"]),
    ),
    "close_advertise_keys": (AggregatorStage.COLLECTING_KEYS, lambda a: a.close_advertise_keys()),
    "receive_share_keys": (
        AggregatorStage.COLLECTING_SHARES,
        lambda a: a.receive_share_keys(MESSAGES["share_keys"]),
    ),
    "close_share_keys": (AggregatorStage.COLLECTING_SHARES, lambda a: a.close_share_keys()),
    "receive_masked_input": (
        AggregatorStage.COLLECTING_MASKED_INPUTS,
        lambda a: a.receive_masked_input(MESSAGES["masked_input"]),
    ),
    "close_masked_input": (AggregatorStage.COLLECTING_MASKED_INPUTS, lambda a: a.close_masked_input()),
    "receive_survivor_signature": (
        AggregatorStage.COLLECTING_SIGNATURES,
        lambda a: a.receive_survivor_signature(MESSAGES["signature"]),
    ),
    "close_consistency_check": (AggregatorStage.COLLECTING_SIGNATURES, lambda a: a.close_consistency_check()),
    "receive_unmask_shares": (
        AggregatorStage.COLLECTING_UNMASK_SHARES,
        lambda a: a.receive_unmask_shares(MESSAGES["unmask"]),
    ),
    "finish": (AggregatorStage.COLLECTING_UNMASK_SHARES, lambda a: a.finish()),
}


def aggregator_at(stage):
    """A fresh aggregator of a complete 3-site session, driven up to ``stage``."""
    context, keys = federation()
    session = InMemorySession(context, keys, {site: np.zeros(D, np.float32) for site in keys})
    steps = [
        session.advertise_keys,
        session.share_keys,
        session.mask_input,
        session.consistency_check,
        session.unmask,
    ]
    value = None
    for step in steps[: list(AggregatorStage).index(stage)]:
        value = step() if value is None else step(value)
    assert session.aggregator.stage is stage
    return session.aggregator


@pytest.mark.parametrize("stage", list(AggregatorStage), ids=lambda s: s.value)
def test_aggregator_refuses_every_invalid_transition(stage):
    # Prepare
    aggregator = aggregator_at(stage)
    invalid = [action for action, (valid, _) in AGGREGATOR_ACTIONS.items() if valid is not stage]

    # Execute / Assert: every other action is refused and leaves the stage unchanged
    for action in invalid:
        with pytest.raises(
            SecAggStageError, match=f"needs the aggregator at stage .* but it is at '{stage.value}'"
        ):
            AGGREGATOR_ACTIONS[action][1](aggregator)
        assert aggregator.stage is stage
    assert len(invalid) == 10 - (0 if stage is AggregatorStage.FINISHED else 2)


def test_closing_a_stage_below_threshold_is_refused_without_a_transition():
    # Prepare
    aggregator = aggregator_at(AggregatorStage.COLLECTING_KEYS)

    # Execute / Assert
    with pytest.raises(SecAggThresholdError, match="no site advertised keys"):
        aggregator.close_advertise_keys()
    assert aggregator.stage is AggregatorStage.COLLECTING_KEYS
