"""How the researcher tells a site's refusal from a site that stopped answering."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from policies.federated_plan import FederatedPlan
from researcher.federation import (
    FederatedRound,
    RoundFailedError,
    SiteHandle,
    SiteRefusedError,
    describe_site_failure,
    make_plan,
    run_round,
)
from tests.unit.test_submission import make_raw_plan

pytestmark = pytest.mark.unit


def _round_with(failure: Exception) -> tuple[FederatedRound, SiteHandle]:
    plan = FederatedPlan.parse(make_raw_plan())

    def call(**_: Any) -> Any:
        raise failure

    client = SimpleNamespace(code=SimpleNamespace(fedsite_run_0123456789ab=call),
                             datasets={"imdb": SimpleNamespace(assets={"reviews": object()})})
    site = SiteHandle(name="site-a", client=client, identity_key=plan.roster.entries[0].identity_key.hex(),
                      _asset=object())
    return FederatedRound([site], plan, 0, 0), site


def test_a_guard_refusal_stops_the_run_with_the_sites_reason() -> None:
    round_, site = _round_with(RuntimeError("SyftException: site-a: refused: code 1c74 has no Fedsite approval"))

    with pytest.raises(SiteRefusedError, match=r"^site-a: refused: code 1c74 has no Fedsite approval$"):
        round_._call(site, "advertise_keys", {})
    assert round_.dropped == []


def test_a_site_that_cannot_be_reached_drops_out() -> None:
    round_, site = _round_with(ConnectionError("[Errno 111] Connection refused"))

    assert round_._call(site, "advertise_keys", {}) is None
    assert round_.dropped == ["site-a"]
    assert "Connection refused" in round_.drop_reasons["site-a"]
    assert site._asset is None  # looked up afresh when the site is back


def test_a_site_that_fails_server_side_drops_out_saying_where_its_traceback_is() -> None:
    # syft's whole message to a researcher when a site's service raises something other than a refusal
    round_, site = _round_with(RuntimeError("Something unexpected happened server side <class 'AttributeError'>"))

    assert round_._call(site, "share_keys", {}) is None

    assert round_.dropped == ["site-a"]
    assert round_.drop_reasons["site-a"] == (
        "share_keys: site-a failed server side with AttributeError (syft shows a researcher only its type); "
        "the traceback is in site-a's log (logger fedsite.site, level ERROR): ask its admin for it"
    )


def test_any_other_failure_is_described_by_its_type_and_message() -> None:
    assert describe_site_failure("site-b", TimeoutError("read timed out")) == "TimeoutError: read timed out"


def test_a_round_that_fails_every_attempt_says_where_and_why_each_site_dropped() -> None:
    round_, site = _round_with(ConnectionError("[Errno 111] Connection refused"))

    with pytest.raises(RoundFailedError) as failed:
        run_round([site], round_.plan, 0, np.zeros(10, dtype=np.float32), max_attempts=2)

    message = str(failed.value)
    assert message.startswith("round 0 failed 2 times: ")
    assert message.endswith("(last attempt: site-a dropped at advertise_keys: ConnectionError: "
                            "[Errno 111] Connection refused)")


def test_the_asset_is_looked_up_once_across_calls() -> None:
    lookups = []

    class Datasets:
        def __getitem__(self, name: str) -> Any:
            lookups.append(name)
            return SimpleNamespace(assets={"reviews": f"pointer-{len(lookups)}"})

    site = SiteHandle(name="site-a", client=SimpleNamespace(datasets=Datasets()), identity_key="00")

    assert [site.asset(), site.asset()] == ["pointer-1", "pointer-1"] and lookups == ["imdb"]
    site.forget_asset()
    assert site.asset() == "pointer-2"


@pytest.mark.parametrize(
    ("dp", "clip"),
    [
        ({"optimizer": "adamw", "learning_rate": 5e-3, "local_steps": 16}, 0.08),
        ({"optimizer": "sgd", "learning_rate": 0.1, "local_steps": 4, "clip_norm": 0.5}, 0.2),
    ],
)
def test_the_secure_sum_range_defaults_to_what_one_round_can_move_a_parameter(dp: dict[str, Any], clip: float) -> None:
    base = {"clip_norm": 1.0, "delta": 1e-5, "expected_batch_size": 8, "rounds": 2, "target_epsilon": 3.0}
    sites = [SiteHandle(name=f"site-{c}", client=None, identity_key=Ed25519PrivateKey.generate().public_key()
                        .public_bytes_raw().hex()) for c in "ab"]

    plan = make_plan(sites=sites, model={"name": "m", "trainable": {"kind": "lora"}}, dp={**base, **dp},
                     vector_length=10)

    assert plan.secure_sum.clip == pytest.approx(clip)
    assert make_plan(sites=sites, model={"name": "m", "trainable": {"kind": "lora"}}, dp={**base, **dp},
                     vector_length=10, clip=0.5).secure_sum.clip == 0.5
