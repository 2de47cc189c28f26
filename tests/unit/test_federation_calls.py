"""How the researcher tells a site's refusal from a site that stopped answering."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from policies.federated_plan import FederatedPlan
from researcher.federation import FederatedRound, SiteHandle, SiteRefusedError
from tests.unit.test_submission import make_raw_plan

pytestmark = pytest.mark.unit


def _round_with(failure: Exception) -> tuple[FederatedRound, SiteHandle]:
    plan = FederatedPlan.parse(make_raw_plan())

    def call(**_: Any) -> Any:
        raise failure

    client = SimpleNamespace(code=SimpleNamespace(fedsite_run_0123456789ab=call))
    site = SiteHandle(name="site-a", client=client, identity_key=plan.roster.entries[0].identity_key.hex())
    round_ = FederatedRound([site], plan, 0, 0)
    round_._assets["site-a"] = object()
    return round_, site


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
