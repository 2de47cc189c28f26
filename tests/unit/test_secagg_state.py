"""Parameters, roster and the persisted site state: validated on construction and on load."""

import json
import math
import os
import stat

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.secagg_local import InMemorySession
from policies.secagg import (
    EncodingOverflowError,
    Roster,
    RosterEntry,
    RoundContext,
    SecAggConfigError,
    SecAggProtocolError,
    SecureSumConfig,
    ShareKind,
    SiteRoundState,
    SiteStage,
    advertise_keys,
    load_round_state,
    save_round_state,
)

pytestmark = pytest.mark.unit


def identity(i):
    return Ed25519PrivateKey.from_private_bytes(bytes([i + 1]) * 32)


def roster_of(n):
    return Roster.of((f"site-{i:02d}", identity(i).public_key().public_bytes_raw()) for i in range(n))


def config(**overrides):
    values = {"vector_length": 8, "clip": 1.0, "quantisation_bits": 16, "threshold": 3, **overrides}
    return SecureSumConfig(**values)


# --- config and roster -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"clip": 0.0}, "clip must be finite and > 0, got 0.0"),
        ({"clip": math.nan}, "clip must be finite and > 0, got nan"),
        ({"clip": True}, "clip must be a number, got True"),
        ({"vector_length": 0}, "vector_length must be >= 1, got 0"),
        ({"vector_length": True}, "vector_length must be an int, got True"),
        ({"modulus_bits": 48}, r"modulus_bits must be one of \(32, 64\), got 48"),
        ({"quantisation_bits": 32}, r"quantisation_bits must be in \[1, 31\], got 32"),
        ({"threshold": 1}, "threshold must be >= 2, got 1"),
        ({"threshold": 2.0}, "threshold must be an int, got 2.0"),
        ({"neighbourhood_size": 3}, "neighbourhood_size must be even .* use 4"),
    ],
)
def test_config_refuses_bad_parameters_naming_them(overrides, message):
    with pytest.raises(SecAggConfigError, match=message):
        config(**overrides)


def test_config_is_keyword_only():
    with pytest.raises(TypeError):
        SecureSumConfig(8, 1.0, 16, 3)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("n", "overrides", "error", "message"),
    [
        (6, {"threshold": 3}, SecAggConfigError, r"threshold=3 must be in \[4, 6\] for 6 holders"),
        (4, {"threshold": 5}, SecAggConfigError, r"threshold=5 must be in \[3, 4\]"),
        (
            6,
            {"neighbourhood_size": 6, "threshold": 4},
            SecAggConfigError,
            "is not below 5 .* omit neighbourhood_size",
        ),
        (
            12,
            {"neighbourhood_size": 4, "threshold": 2},
            SecAggConfigError,
            r"must be in \[3, 5\] for 5 holders",
        ),
        (50, {"quantisation_bits": 27, "threshold": 26}, EncodingOverflowError, "quantisation_bits <= 26"),
    ],
)
def test_round_context_checks_the_config_against_the_roster(n, overrides, error, message):
    with pytest.raises(error, match=message):
        RoundContext(config(**overrides), roster_of(n), "run-1/round-1")


@pytest.mark.parametrize("session_id", ["", "run 1", "x" * 201, "../etc"])
def test_round_context_refuses_bad_session_ids(session_id):
    with pytest.raises(SecAggProtocolError, match="is not a session id"):
        RoundContext(config(), roster_of(4), session_id)


def test_roster_refuses_duplicates_bad_keys_and_single_sites():
    key = identity(0).public_key().public_bytes_raw()
    with pytest.raises(SecAggConfigError, match="must be distinct"):
        Roster.of([("site-a", key), ("site-a", identity(1).public_key().public_bytes_raw())])
    with pytest.raises(SecAggConfigError, match="must be distinct"):
        Roster.of([("site-a", key), ("site-b", key)])
    with pytest.raises(SecAggConfigError, match="at least 2 sites"):
        Roster.of([("site-a", key)])
    with pytest.raises(SecAggConfigError, match="must be 32 raw Ed25519 bytes"):
        RosterEntry("site-a", key[:31])
    with pytest.raises(SecAggProtocolError, match="is not a site id"):
        RosterEntry("Site A", key)


def test_share_positions_follow_roster_order_not_names():
    # Prepare: names sorted differently from the roster order
    roster = Roster.of(
        [
            ("zeta", identity(0).public_key().public_bytes_raw()),
            ("alpha", identity(1).public_key().public_bytes_raw()),
        ]
    )

    # Execute / Assert
    assert (roster.share_x("zeta"), roster.share_x("alpha")) == (1, 2)


def test_config_and_roster_round_trip_through_their_wire_forms():
    original = config(neighbourhood_size=None, modulus_bits=64, quantisation_bits=40)
    assert SecureSumConfig.from_wire(json.loads(json.dumps(original.to_wire()))) == original
    assert Roster.from_wire(json.loads(json.dumps(roster_of(3).to_wire()))) == roster_of(3)
    with pytest.raises(SecAggProtocolError, match="vector_length: expected an int, got bool"):
        SecureSumConfig.from_wire({**original.to_wire(), "vector_length": True})


def test_advertise_keys_refuses_an_identity_key_the_roster_does_not_pin():
    context = RoundContext(config(), roster_of(4), "run-1/round-1")
    with pytest.raises(SecAggConfigError, match="not the one pinned in the roster"):
        advertise_keys(context, site_id="site-00", identity_key=identity(1))
    with pytest.raises(SecAggConfigError, match="'site-77' is not in the roster"):
        advertise_keys(context, site_id="site-77", identity_key=identity(1))


def test_the_session_digest_binds_config_roster_and_session():
    base = RoundContext(config(), roster_of(4), "run-1/round-1")
    digests = {
        base.digest,
        RoundContext(config(clip=2.0), roster_of(4), "run-1/round-1").digest,
        RoundContext(config(), roster_of(4), "run-1/round-2").digest,
        RoundContext(config(threshold=4), roster_of(5), "run-1/round-1").digest,
    }
    assert len(digests) == 4


# --- persisted state ---------------------------------------------------------------------------------------


@pytest.fixture()
def states_by_stage():
    keys = {f"site-{i:02d}": identity(i) for i in range(4)}
    context = RoundContext(config(), roster_of(4), "run-1/round-1")
    session = InMemorySession(context, keys, {site: np.zeros(8, np.float32) for site in keys})
    states = {}
    broadcast = session.advertise_keys()
    states[SiteStage.KEYS_ADVERTISED] = session.state("site-01")
    for stage, step in zip(
        list(SiteStage)[1:],
        [session.share_keys, session.mask_input, session.consistency_check, session.unmask],
        strict=True,
    ):
        broadcast = step(broadcast)
        states[stage] = session.state("site-01")
    return states


def test_state_round_trips_at_every_stage(states_by_stage):
    for stage, state in states_by_stage.items():
        # Execute
        restored = SiteRoundState.from_bytes(state.to_bytes())

        # Assert
        assert restored == state
        assert restored.stage is stage


def test_state_records_what_was_revealed(states_by_stage):
    # Execute
    revealed = SiteRoundState.from_bytes(states_by_stage[SiteStage.UNMASKED].to_bytes()).revealed

    # Assert: a complete session reveals the self-mask share of every site, the mask key of none
    assert revealed == {f"site-{i:02d}": ShareKind.SELF_MASK for i in range(4)}


def test_saved_state_is_private_and_loads_back(tmp_path, states_by_stage):
    # Prepare
    path = tmp_path / "secagg" / "run-1-round-1.json"
    state = states_by_stage[SiteStage.SURVIVORS_SIGNED]

    # Execute
    save_round_state(path, state)

    # Assert
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_round_state(path) == state


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda j: j.update(format="v0"), "format: 'v0' is not"),
        (lambda j: j.update(stage="done"), "stage: 'done' is not one of"),
        (lambda j: j.update(site_id="site-99"), "site_id: 'site-99' is not a site of the roster"),
        (lambda j: j.update(mask_secret_key=j["mask_secret_key"][:8]), "mask_secret_key: expected 32 bytes"),
        (lambda j: j.update(revealed={"site-00": "both"}), "revealed: 'both' is not one of"),
        (lambda j: j.update(peer_keys=[]), "peer_keys: expected a dict"),
        (lambda j: j.pop("revealed"), r"missing fields \['revealed'\]"),
    ],
)
def test_corrupted_state_is_refused_on_load(states_by_stage, change, message):
    # Prepare
    document = states_by_stage[SiteStage.INPUT_MASKED].to_json()
    change(document)

    # Execute / Assert
    with pytest.raises(SecAggProtocolError, match=message):
        SiteRoundState.from_json(document)
    with pytest.raises(SecAggProtocolError, match="not UTF-8 JSON"):
        SiteRoundState.from_bytes(b"\xff{")
