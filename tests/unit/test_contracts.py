"""The contracts both sides read: stages, refusals, the vector codec and the typed stage reply."""

from __future__ import annotations

import numpy as np
import pytest

from policies.contracts import (
    ContractError,
    DryRun,
    MockRun,
    Refused,
    Stage,
    StageMessage,
    decode_vector,
    encode_vector,
    find_refusal,
    refusal,
    reply_from_wire,
    reply_to_wire,
)

pytestmark = pytest.mark.unit


def test_stages_are_in_protocol_order_and_unknown_ones_are_named() -> None:
    assert [s.value for s in Stage] == ["advertise_keys", "share_keys", "mask_input", "consistency_check", "unmask"]
    assert Stage.parse("mask_input") is Stage.MASK_INPUT
    with pytest.raises(ContractError, match="unknown stage 'train'.*advertise_keys"):
        Stage.parse("train")


def test_a_refusal_is_found_in_an_exception_text_and_a_dead_connection_is_not() -> None:
    text = "SyftException: " + refusal("site-b", "code abc has no Fedsite approval")
    assert find_refusal(text) == "site-b: refused: code abc has no Fedsite approval"
    assert find_refusal("ConnectionError: [Errno 111] Connection refused") is None


def test_the_vector_codec_is_exact_and_refuses_wrong_shapes() -> None:
    vector = np.array([0.0, -1.5, 3.25e-8, 65504.0], dtype=np.float32)
    decoded = decode_vector(encode_vector(vector), 4)
    assert decoded.dtype == np.dtype("<f4") and decoded.tobytes() == vector.tobytes()
    with pytest.raises(ContractError, match="has 3 values, the plan has 4"):
        decode_vector(encode_vector(vector[:3]), 4)
    with pytest.raises(ContractError, match="NaN or infinite"):
        decode_vector(encode_vector(np.array([np.nan], dtype=np.float32)), 1)
    with pytest.raises(ContractError, match="base64 str"):
        decode_vector(b"AAAA", 1)
    with pytest.raises(ContractError, match="base64"):
        decode_vector("not base64!", 1)


@pytest.mark.parametrize("reply", [
    StageMessage(message={"type": "advertise_keys", "x": [1, 2]}),
    StageMessage(message={"type": "masked_input"}, epsilon_spent=2.67),
    Refused(reason="site-a: refused: round 3 already ran here"),
    MockRun(),
    DryRun(trainable_parameters=74_498, mock_rows=64, mock_loss=0.6931, seconds=1.25),
])
def test_every_reply_round_trips_through_its_wire_form(reply: object) -> None:
    assert reply_from_wire(reply_to_wire(reply)) == reply  # type: ignore[arg-type]


@pytest.mark.parametrize(("raw", "problem"), [
    ([], "must be a mapping"),
    ({"refused": "x"}, "'reply' must be message, refused, mock or dry_run"),
    ({"reply": "message", "message": "abc"}, "'message' must be a mapping"),
    ({"reply": "message", "message": {}, "epsilon_spent": float("nan")}, "'epsilon_spent' must be a finite number"),
    ({"reply": "dry_run", "trainable_parameters": True}, "'trainable_parameters' must be a finite number"),
])
def test_a_malformed_reply_is_refused_with_what_is_wrong(raw: object, problem: str) -> None:
    with pytest.raises(ContractError, match=problem):
        reply_from_wire(raw)
