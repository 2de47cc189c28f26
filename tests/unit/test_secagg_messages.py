"""The bad-message set: every malformed, replayed, reordered, truncated, wrong-length, wrong-round,
unsigned or wrongly signed message is refused with a clear error, before any state changes."""

import base64
import dataclasses

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.secagg_local import InMemorySession
from policies.secagg import (
    AdvertiseKeys,
    EncryptedShares,
    IncomingShares,
    MaskedInput,
    RevealedShare,
    Roster,
    RoundContext,
    RoundKeys,
    SecAggConfigError,
    SecAggProtocolError,
    SecAggSignatureError,
    SecAggThresholdError,
    SecureSumConfig,
    ShareKeys,
    SignedSurvivors,
    Survivors,
    SurvivorSignature,
    UnmaskShares,
    advertise_keys,
    consistency_check,
    mask_input,
    share_keys,
    unmask,
)

pytestmark = pytest.mark.unit

D = 64
A, B, C, E = "site-00", "site-01", "site-02", "site-03"


def federation(session="run-1/round-4"):
    keys = {f"site-{i:02d}": Ed25519PrivateKey.generate() for i in range(4)}
    roster = Roster.of((site, key.public_key().public_bytes_raw()) for site, key in keys.items())
    config = SecureSumConfig(vector_length=D, clip=1.0, quantisation_bits=16, threshold=3)
    return RoundContext(config, roster, session), keys


def updates_for(context):
    rng = np.random.default_rng(4)  # test data only, never a mask
    return {site: rng.uniform(-1, 1, D).astype(np.float32) for site in context.roster.site_ids}


@pytest.fixture()
def recorded():
    """A complete session of 4 sites, with every message each side produced, recorded by stage."""
    context, keys = federation()
    updates = updates_for(context)
    session = InMemorySession(context, keys, updates)
    log = {"round_keys": session.advertise_keys(), "states": {}}
    log["states"]["advertised"] = {s: session.state(s) for s in keys}
    log["share_keys"] = {s: share_keys(session.state(s), log["round_keys"])[1] for s in keys}
    log["inboxes"] = session.share_keys(log["round_keys"])
    log["states"]["shared"] = {s: session.state(s) for s in keys}
    log["masked"] = {s: mask_input(session.state(s), log["inboxes"][s], updates[s])[1] for s in keys}
    log["survivors"] = session.mask_input(log["inboxes"])
    log["states"]["masked"] = {s: session.state(s) for s in keys}
    signature = consistency_check(session.state(A), log["survivors"], identity_key=keys[A])[1]
    log["signature"] = signature
    log["signed"] = session.consistency_check(log["survivors"])
    log["states"]["signed"] = {s: session.state(s) for s in keys}
    log["unmask"] = unmask(session.state(A), log["signed"])[1]
    return context, keys, updates, log


# --- wire form ---------------------------------------------------------------------------------------------


def all_messages(log):
    inbox = log["inboxes"][A]
    return [
        log["round_keys"].keys[0],
        log["round_keys"],
        log["share_keys"][A],
        inbox,
        log["masked"][A],
        log["survivors"],
        log["signature"],
        log["signed"],
        log["unmask"],
    ]


def test_every_message_round_trips_through_plain_wire_values(recorded):
    # Prepare
    *_, log = recorded

    for message in all_messages(log):
        # Execute
        wire = message.to_wire()

        # Assert: only str/int/list/dict, bytes only for the masked vector
        assert type(message).from_wire(wire) == message
        assert _plain(wire, allow_bytes=isinstance(message, MaskedInput))


def _plain(value, *, allow_bytes):
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v, allow_bytes=allow_bytes) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain(v, allow_bytes=allow_bytes) for v in value)
    return isinstance(value, str | int) or (allow_bytes and isinstance(value, bytes))


def _advert_wire(log):
    return log["round_keys"].keys[0].to_wire()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda w: w.pop("signature"), r"missing fields \['signature'\]"),
        (lambda w: w.update(extra=1), r"unexpected fields \['extra'\]"),
        (lambda w: w.update(type="secagg/share-keys"), "type is 'secagg/share-keys'"),
        (lambda w: w.update(sender=7), "sender: expected a str, got int"),
        (lambda w: w.update(sender=True), "sender: expected a str, got bool"),
        (lambda w: w.update(session_id="run 1"), "is not a session id"),
        (lambda w: w.update(signature=w["signature"][:-4]), "signature: expected 64 bytes, got 63"),
        (lambda w: w.update(signature=w["signature"].rstrip("=")), "not valid base64"),
        (lambda w: w.update(signature=" " + w["signature"]), "not valid base64"),
        (
            lambda w: w.update(mask_public_key=base64.b64encode(bytes(33)).decode()),
            "expected 32 bytes, got 33",
        ),
        (lambda w: w.update(mask_public_key=b"\x00" * 32), "mask_public_key: expected a str, got bytes"),
    ],
)
def test_from_wire_refuses_malformed_fields(recorded, change, message):
    # Prepare
    *_, log = recorded
    wire = _advert_wire(log)
    change(wire)

    # Execute / Assert
    with pytest.raises(SecAggProtocolError, match=message):
        AdvertiseKeys.from_wire(wire)


@pytest.mark.parametrize(
    ("vector", "message"),
    [
        ([1, 2], "expected bytes, got list"),
        (bytearray(8), "expected bytes, got bytearray"),
        ("AAAA", "got str"),
    ],
)
def test_masked_input_vector_must_be_raw_bytes(vector, message):
    wire = {"type": MaskedInput.KIND, "session_id": "run-1/round-4", "sender": A, "vector": vector}
    with pytest.raises(SecAggProtocolError, match=message):
        MaskedInput.from_wire(wire)


@pytest.mark.parametrize(
    ("parse", "wire", "message"),
    [
        (
            RoundKeys.from_wire,
            {"type": RoundKeys.KIND, "session_id": "r", "keys": {}},
            "keys: expected a list",
        ),
        (Survivors.from_wire, {"type": Survivors.KIND, "session_id": "r", "survivors": [1]}, "not a site id"),
        (Survivors.from_wire, ["not", "a", "dict"], "expected a dict, got list"),
        (
            UnmaskShares.from_wire,
            {"type": UnmaskShares.KIND, "session_id": "r", "sender": A, "self_mask_shares": [{"owner": A}]},
            r"missing fields \['mask_key_shares'\]",
        ),
        (
            RevealedShare.from_wire,
            {"owner": A, "share": base64.b64encode(bytes(65)).decode()},
            "expected 66 bytes",
        ),
        (
            EncryptedShares.from_wire,
            {"sender": A, "recipient": B, "ciphertext": base64.b64encode(bytes(159)).decode()},
            "ciphertext: expected 160 bytes, got 159",
        ),
    ],
)
def test_from_wire_refuses_wrong_shapes(parse, wire, message):
    with pytest.raises(SecAggProtocolError, match=message):
        parse(wire)


# --- site side ---------------------------------------------------------------------------------------------


def reversed_keys(log):
    return dataclasses.replace(log["round_keys"], keys=log["round_keys"].keys[::-1])


def duplicated_keys(log):
    keys = log["round_keys"].keys
    return dataclasses.replace(log["round_keys"], keys=(keys[0], keys[0], *keys[1:]))


def without_own_keys(log):
    return dataclasses.replace(log["round_keys"], keys=log["round_keys"].keys[1:])


def unsigned_keys(log):
    keys = log["round_keys"].keys
    return dataclasses.replace(
        log["round_keys"], keys=(keys[0], dataclasses.replace(keys[1], signature=bytes(64)), *keys[2:])
    )


def wrongly_signed_keys(log):
    keys = log["round_keys"].keys
    forged = dataclasses.replace(keys[1], signature=keys[2].signature)
    return dataclasses.replace(log["round_keys"], keys=(keys[0], forged, *keys[2:]))


def replayed_keys(log):
    return dataclasses.replace(log["round_keys"], session_id="run-1/round-3")


@pytest.mark.parametrize(
    ("forge", "error", "message"),
    [
        (reversed_keys, SecAggProtocolError, "must list distinct sites in roster order"),
        (duplicated_keys, SecAggProtocolError, "must list distinct sites in roster order"),
        (without_own_keys, SecAggProtocolError, "does not carry site-00's own advertised keys"),
        (unsigned_keys, SecAggSignatureError, "the keys of site-01 is unsigned"),
        (
            wrongly_signed_keys,
            SecAggSignatureError,
            "the keys of site-01 has a signature that does not verify",
        ),
        (replayed_keys, SecAggProtocolError, "'run-1/round-3' is not this round's session"),
    ],
)
def test_share_keys_refuses_bad_round_keys(recorded, forge, error, message):
    # Prepare
    *_, log = recorded
    state = log["states"]["advertised"][A]
    before = state.to_bytes()

    # Execute / Assert
    with pytest.raises(error, match=message):
        share_keys(state, forge(log))
    assert state.to_bytes() == before


def _inbox(log, site=A):
    return log["inboxes"][site]


def tampered_inbox(log):
    first = _inbox(log).shares[0]
    flipped = first.ciphertext[:-1] + bytes([first.ciphertext[-1] ^ 1])
    return dataclasses.replace(
        _inbox(log), shares=(dataclasses.replace(first, ciphertext=flipped), *_inbox(log).shares[1:])
    )


def misaddressed_inbox(log):
    other = _inbox(log, B).shares[1]  # from site-02 to site-01
    return IncomingShares(
        _inbox(log).session_id, A, (_inbox(log).shares[0], dataclasses.replace(other, recipient=A))
    )


@pytest.mark.parametrize(
    ("forge", "error", "message"),
    [
        (
            lambda log: dataclasses.replace(_inbox(log), shares=_inbox(log).shares[::-1]),
            SecAggProtocolError,
            "roster order",
        ),
        (tampered_inbox, SecAggProtocolError, "the shares from site-01 does not decrypt"),
        (misaddressed_inbox, SecAggProtocolError, "the shares from site-02 does not decrypt"),
        (lambda log: _inbox(log, B), SecAggProtocolError, "recipient is 'site-01', not this site 'site-00'"),
        (
            lambda log: dataclasses.replace(_inbox(log), session_id="run-2/round-4"),
            SecAggProtocolError,
            "another round",
        ),
        (
            lambda log: dataclasses.replace(_inbox(log), shares=_inbox(log).shares[:1]),
            SecAggThresholdError,
            "only 2 of the sites holding shares of site-00 shared their keys",
        ),
    ],
)
def test_mask_input_refuses_bad_incoming_shares(recorded, forge, error, message):
    # Prepare
    *_, updates, log = recorded
    state = log["states"]["shared"][A]
    before = state.to_bytes()

    # Execute / Assert
    with pytest.raises(error, match=message):
        mask_input(state, forge(log), updates[A])
    assert state.to_bytes() == before


@pytest.mark.parametrize(
    ("update", "message"),
    [
        (np.zeros(D + 1, np.float32), r"shape \(65,\)"),
        (np.full(D, np.nan, np.float32), "non-finite value at index 0"),
    ],
)
def test_mask_input_refuses_a_wrong_update(recorded, update, message):
    *_, log = recorded
    with pytest.raises(SecAggProtocolError, match=message):
        mask_input(log["states"]["shared"][A], _inbox(log), update)


@pytest.mark.parametrize(
    ("survivors", "error", "message"),
    [
        ((B, A, C, E), SecAggProtocolError, "roster order"),
        ((A, A, B, C), SecAggProtocolError, "roster order"),
        ((A, B, "site-99"), SecAggProtocolError, "'site-99' is not in the roster"),
        ((B, C, E), SecAggProtocolError, "claims a live site dropped"),
        ((A, B), SecAggThresholdError, "only 2 of the sites holding shares of site-00 sent masked inputs"),
    ],
)
def test_consistency_check_refuses_bad_survivor_lists(recorded, survivors, error, message):
    # Prepare
    context, keys, _, log = recorded
    state = log["states"]["masked"][A]

    # Execute / Assert
    with pytest.raises(error, match=message):
        consistency_check(state, Survivors(context.session_id, survivors), identity_key=keys[A])


def test_consistency_check_refuses_another_sites_identity_key(recorded):
    context, keys, _, log = recorded
    with pytest.raises(SecAggConfigError, match="not the one pinned in the roster"):
        consistency_check(log["states"]["masked"][A], log["survivors"], identity_key=keys[B])


def _signed(log):
    return log["signed"]


@pytest.mark.parametrize(
    ("forge", "error", "message"),
    [
        (
            lambda log: dataclasses.replace(_signed(log), signatures=_signed(log).signatures[::-1]),
            SecAggProtocolError,
            "roster order",
        ),
        (
            lambda log: dataclasses.replace(_signed(log), survivors=(A, B, C)),
            SecAggProtocolError,
            "differs from the survivor list",
        ),
        (
            lambda log: dataclasses.replace(
                _signed(log),
                signatures=(
                    dataclasses.replace(_signed(log).signatures[0], signature=bytes(64)),
                    *_signed(log).signatures[1:],
                ),
            ),
            SecAggSignatureError,
            "signed by site-00 is unsigned",
        ),
        (
            lambda log: dataclasses.replace(
                _signed(log),
                signatures=(
                    dataclasses.replace(
                        _signed(log).signatures[0], signature=_signed(log).signatures[1].signature
                    ),
                    *_signed(log).signatures[1:],
                ),
            ),
            SecAggSignatureError,
            "signed by site-00 has a signature that does not verify",
        ),
        (
            lambda log: dataclasses.replace(_signed(log), session_id="run-1/round-3"),
            SecAggProtocolError,
            "another round",
        ),
        (
            lambda log: dataclasses.replace(_signed(log), signatures=_signed(log).signatures[:2]),
            SecAggThresholdError,
            "only 2 of the sites holding shares of site-00 signed",
        ),
    ],
)
def test_unmask_refuses_bad_signed_survivors(recorded, forge, error, message):
    # Prepare
    *_, log = recorded
    state = log["states"]["signed"][A]
    before = state.to_bytes()

    # Execute / Assert
    with pytest.raises(error, match=message):
        unmask(state, forge(log))
    assert state.to_bytes() == before


# --- aggregator side ---------------------------------------------------------------------------------------


def test_aggregator_refuses_bad_messages_at_every_stage_and_still_sums_exactly():
    # Prepare: a fresh session of the same sites
    context, keys = federation()
    updates = updates_for(context)
    session = InMemorySession(context, keys, updates)
    aggregator = session.aggregator
    other_round, _ = federation(session="run-1/round-5")

    # Execute / Assert: Round 0
    adverts = {}
    for site in keys:
        session.states[site], adverts[site] = _advertise(context, keys, site)
    aggregator.receive_advertise_keys(adverts[A])
    with pytest.raises(SecAggProtocolError, match="AdvertiseKeys from site-00 was already received.*replay"):
        aggregator.receive_advertise_keys(adverts[A])
    with pytest.raises(SecAggProtocolError, match="another round"):
        aggregator.receive_advertise_keys(dataclasses.replace(adverts[B], session_id=other_round.session_id))
    with pytest.raises(
        SecAggSignatureError, match="the keys of site-01 has a signature that does not verify"
    ):
        aggregator.receive_advertise_keys(dataclasses.replace(adverts[B], signature=adverts[C].signature))
    with pytest.raises(SecAggProtocolError, match="from 'site-99', which is not expected"):
        aggregator.receive_advertise_keys(dataclasses.replace(adverts[B], sender="site-99"))
    for site in (B, C, E):
        aggregator.receive_advertise_keys(adverts[site])
    round_keys = aggregator.close_advertise_keys()

    # Round 1
    shares = {}
    for site in keys:
        state, shares[site] = share_keys(session.state(site), round_keys)
        session.states[site] = state.to_bytes()
    truncated = dataclasses.replace(shares[A], shares=shares[A].shares[:-1])
    with pytest.raises(SecAggProtocolError, match="truncated, reordered or padded share list"):
        aggregator.receive_share_keys(truncated)
    reordered = dataclasses.replace(shares[A], shares=shares[A].shares[::-1])
    with pytest.raises(SecAggProtocolError, match="truncated, reordered or padded share list"):
        aggregator.receive_share_keys(reordered)
    for site in keys:
        aggregator.receive_share_keys(shares[site])
    with pytest.raises(SecAggProtocolError, match="ShareKeys from site-02 was already received"):
        aggregator.receive_share_keys(shares[C])
    inboxes = aggregator.close_share_keys()

    # Round 2
    masked = {}
    for site in keys:
        state, masked[site] = mask_input(session.state(site), inboxes[site], updates[site])
        session.states[site] = state.to_bytes()
    short = dataclasses.replace(masked[A], vector=masked[A].vector[:-4])
    with pytest.raises(
        SecAggProtocolError, match=r"expected 256 bytes \(64 little-endian uint32 words\), got 252"
    ):
        aggregator.receive_masked_input(short)
    for site in keys:
        aggregator.receive_masked_input(masked[site])
    with pytest.raises(SecAggProtocolError, match="MaskedInput from site-00 was already received"):
        aggregator.receive_masked_input(masked[A])
    survivors = aggregator.close_masked_input()

    # Round 3
    signatures = {}
    for site in keys:
        state, signatures[site] = consistency_check(session.state(site), survivors, identity_key=keys[site])
        session.states[site] = state.to_bytes()
    with pytest.raises(
        SecAggSignatureError, match="survivor list signed by site-00 has a signature that does not"
    ):
        aggregator.receive_survivor_signature(
            dataclasses.replace(signatures[A], signature=signatures[B].signature)
        )
    for site in keys:
        aggregator.receive_survivor_signature(signatures[site])
    signed = aggregator.close_consistency_check()

    # Round 4
    revealed = {site: unmask(session.state(site), signed)[1] for site in keys}
    swapped = dataclasses.replace(
        revealed[A],
        self_mask_shares=revealed[A].self_mask_shares[:-1],
        mask_key_shares=revealed[A].self_mask_shares[-1:],
    )
    with pytest.raises(SecAggProtocolError, match="expected self-mask shares of"):
        aggregator.receive_unmask_shares(swapped)
    for site in keys:
        aggregator.receive_unmask_shares(revealed[site])
    result = aggregator.finish()

    # Assert: nothing rejected left a trace; the sum is exact
    clamped = np.sum([np.clip(updates[s].astype(np.float64), -1, 1) for s in keys], axis=0)
    assert result.participants == tuple(keys)
    assert np.abs(result.total - clamped).max() < 4 * context.encoding.step


def _advertise(context, keys, site):
    state, message = advertise_keys(context, site_id=site, identity_key=keys[site])
    return state.to_bytes(), message


def test_messages_refuse_inconsistent_nested_entries(recorded):
    # Prepare
    *_, log = recorded
    entry = log["share_keys"][A].shares[0]

    # Execute / Assert: a ShareKeys carrying another sender's share, an inbox with another recipient's
    with pytest.raises(SecAggProtocolError, match="every entry must come from the sender site-01"):
        ShareKeys(log["share_keys"][A].session_id, B, (entry,))
    with pytest.raises(SecAggProtocolError, match="every entry must be addressed to site-03"):
        IncomingShares(log["share_keys"][A].session_id, E, (entry,))
    with pytest.raises(SecAggProtocolError, match="signatures: expected a tuple of SurvivorSignature"):
        SignedSurvivors("run-1/round-4", (A,), [log["signature"]])
    with pytest.raises(SecAggProtocolError, match="signature: expected 64 bytes, got 0"):
        SurvivorSignature("run-1/round-4", A, b"")
