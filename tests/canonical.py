"""Canonical round functions submitted and approved by hand, for tests of what a site lets run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from datasites.server import InProcessSite, quiet
from policies.approvals import Approval, ApprovalRegistry
from policies.review import code_hash
from policies.submission import function_name
from tests.conftest import ADMIN_PASSWORD

SPEC = {"name": None, "tiny": {"hidden_size": 32, "layers": 2, "heads": 2, "max_length": 64},
        "trainable": {"kind": "lora", "lora_rank": 4}, "seed": 0}
DP = {"clip_norm": 1.0, "delta": 1e-5, "expected_batch_size": 16, "local_steps": 2, "rounds": 2,
      "target_epsilon": 3.0, "max_length": 64, "max_physical_batch_size": 16}


def submit_canonical(site: InProcessSite, researcher: Any, workdir: Path, *, dataset: str = "imdb") -> str:
    """Submit a canonical round function for ``site`` (the only code a researcher can submit); its name."""
    from researcher.federation import SiteHandle, make_plan, request_execution

    stranger = Ed25519PrivateKey.generate().public_key().public_bytes_raw().hex()  # no round runs in these tests
    handles = [SiteHandle(name=site.meta.name, client=researcher, identity_key=site.site.identity_public_hex(),
                          dataset=dataset),
               SiteHandle(name="site-z", client=researcher, identity_key=stranger, dataset=dataset)]
    plan = make_plan(sites=handles, model=SPEC, dp=DP, vector_length=10, threshold=2, dataset=dataset)
    request_execution(handles[0], plan, workdir)
    return function_name(plan.run_id)


def researcher_id(site: InProcessSite, email: str) -> str:
    admin = site.login(email=site.meta.admin_email, password=ADMIN_PASSWORD)
    with quiet():
        return next(str(u.id.no_dash) for u in admin.users.get_all() if u.email == email)


def approve_by_hand(site: InProcessSite, function: str, *, email: str, dataset: str = "imdb") -> None:
    """Approve ``function`` in syft and record it as `fedsite admin approve` would (without the review)."""
    admin = site.login(email=site.meta.admin_email, password=ADMIN_PASSWORD)
    with quiet():
        request = next(r for r in admin.requests if r.code.service_func_name == function)
        request.approve()
        raw_code = request.code.raw_code
    ApprovalRegistry(site.site.path).record(Approval(
        request_id=str(request.id.no_dash), code_hash=code_hash(raw_code), researcher=researcher_id(site, email),
        researcher_email=email, dataset=dataset, plan={}, calibrated={}, admin=site.meta.admin_email,
        approved_at="2026-11-26T00:00:00+00:00"))
