"""The end-to-end attack suite: a hostile researcher against three `fedsite serve` sites over HTTP.

Three sites run as separate processes, onboarded by their admins (``datasites.admin`` over HTTP and the
``fedsite admin`` CLI: peers pinned with ``fedsite admin peers add``, requests approved with ``fedsite
admin approve``). ``rita`` has one approved run, of which one real round ran at every site; ``eve`` is a
second researcher at site-a. The attacker never uses Fedsite's researcher helpers: it logs in with
``sy.login``, signs ``SyftAPICall``s by hand (``tests.raw_syft.raw_call``), builds ``Action``/
``ActionObject``/``TwinObject`` values itself and sends plain HTTP requests with ``requests``. Every
answer it receives is kept (``Attacker.received``); the last test checks that none of it holds anything
private, and each test checks its own answers the same way. One test per attack class; the tests share one
federation and pass in any order.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import stat
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from datasites.admin import add_researcher, connect_admin, upload_partition
from datasites.partition import partition_indices
from datasites.review_queue import list_requests
from datasites.sitedir import SiteDir
from fedsite.cli import main
from models import build_from_spec
from policies.approvals import ApprovalRegistry
from policies.audit import ApiCallRefused, AuditLog, OutputReleased, PrivacySpent
from policies.budget import PrivacyBudget
from policies.contracts import encode_vector
from policies.federated_plan import FederatedPlan
from policies.identity import key_fingerprint
from policies.ledger import PrivacyLedger
from policies.review import code_hash
from policies.secagg import AdvertiseKeys, ShareKeys
from policies.submission import function_name, render_round_function
from policies.syft_client import login, quiet
from researcher.fedavg import flatten_trainable
from researcher.federation import FederatedRound, SiteHandle, make_plan, submit
from tests.conftest import ADMIN_PASSWORD, RESEARCHER_PASSWORD
from tests.e2e.conftest import ServedSite, fedsite, free_port
from tests.e2e.kill import kill9
from tests.raw_syft import gate_refusal, raw_call, refusal, value_of

pytestmark = pytest.mark.e2e

T = TypeVar("T")

NAMES = ("site-a", "site-b", "site-c")
RITA, EVE = "rita@uni.org", "eve@uni.org"
RENAMED = "rita.renamed@uni.org"
REVIEWS_PER_SITE = 150
SPEC = {"name": None, "tiny": {"hidden_size": 32, "layers": 2, "heads": 2, "max_length": 64},
        "trainable": {"kind": "lora", "lora_rank": 4}, "seed": 0}
DP = {"clip_norm": 1.0, "delta": 1e-5, "expected_batch_size": 16, "local_steps": 2, "rounds": 4,
      "target_epsilon": 3.0, "max_length": 64, "max_physical_batch_size": 16}
NOT_ALLOWED = "not on the site's allowlist (default deny)"


# ---- the hostile researcher's tools ---------------------------------------------------------------------------


def _as_text(answer: Any) -> str:
    """Everything of an answer a researcher could print: its repr, its text, and any data it carries."""
    parts = [repr(answer), str(answer)]
    for name in ("message", "value", "syft_action_data_cache"):
        value = getattr(answer, name, None)
        if value is not None:
            parts.append(repr(value))
            parts += [repr(getattr(value, "syft_action_data_cache", ""))]
    return "\n".join(parts)


@dataclass
class Attacker:
    """A researcher who talks to the sites with syft's raw client API and plain HTTP, and keeps every answer."""

    received: list[str] = field(default_factory=list)
    # (id of the client, dataset) -> (the client, kept alive so that its id is never reused; the asset), read once
    _assets: dict[tuple[int, str], tuple[Any, Any]] = field(default_factory=dict)

    def login(self, served: ServedSite, email: str) -> Any:
        import syft as sy

        with quiet():
            return sy.login(url=served.url, port=served.port, email=email, password=RESEARCHER_PASSWORD)

    def call(self, client: Any, path: str, *args: Any, **kwargs: Any) -> Any:
        """One API call signed by hand (``tests.raw_syft.raw_call``); the answer, as the site sent it."""
        with quiet():
            answer = raw_call(client, path, *args, **kwargs)
        self.received.append(_as_text(answer))
        return answer

    def http(self, method: str, served: ServedSite, route: str, **kwargs: Any) -> requests.Response:
        response = requests.request(method, f"{served.url}:{served.port}/api/v2{route}", timeout=60, **kwargs)
        self.received.append(response.content.decode("latin-1"))
        return response

    def post_call(self, served: ServedSite, call: Any) -> Any:
        """``call`` (a SyftAPICall, signed or not) POSTed to /api_call as raw bytes; what the site's reply carries."""
        from syft.serde.deserialize import _deserialize
        from syft.serde.serialize import _serialize

        response = self.http("POST", served, "/api_call", data=_serialize(call, to_bytes=True),
                             headers={"Content-Type": "application/octet-stream"})
        return _deserialize(response.content, from_bytes=True).message.data

    def upload(self, client: Any, value: Any) -> Any:
        """An object uploaded as syft's client does it (blob allocate, write, action.set); its pointer."""
        from syft.service.action.action_object import ActionObject

        with quiet():
            return ActionObject.from_obj(value).send(client)

    def asset(self, client: Any, dataset: str = "imdb") -> Any:
        """The asset as syft's client lists it (its pointer and mock, never its data)."""
        if (id(client), dataset) not in self._assets:
            with quiet():
                self._assets[id(client), dataset] = (client, client.datasets[dataset].assets["reviews"])
        return self._assets[id(client), dataset][1]

    def own_code_id(self, client: Any, function: str) -> Any:
        (code,) = value_of(self.call(client, "code.get_by_service_func_name", function))
        return code.id

    def stage(self, client: Any, code_id: Any, stage: str, message: dict[str, Any],
              inputs: tuple[Any, Any] | None = None) -> Any:
        """One stage of an approved run, called by hand: the site's reply (a dict), or its refusal (SyftError)."""
        from syft.service.response import SyftError

        stage_obj, message_obj = inputs or (self.upload(client, stage), self.upload(client, message))
        answer = self.call(client, "code.call", uid=code_id, data=self.asset(client), stage=stage_obj,
                           message=message_obj)
        if isinstance(answer, SyftError):
            return answer
        output = value_of(answer)
        return value_of(self.call(client, "action.get", output.id, resolve_nested=True)).syft_action_data

    def submit(self, client: Any, plan: FederatedPlan, workdir: Path) -> Any:
        """Submit the canonical round function of ``plan`` (the only code a site takes) as syft's client would."""
        import syft as sy
        from syft.service.policy.policy import OutputPolicyExecuteCount

        name = function_name(plan.run_id)
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / f"{name}.py"
        path.write_text(render_round_function(plan), encoding="utf-8")  # syft reads the source from the file
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        asset = self.asset(client, plan.dataset)
        with quiet():
            submission = sy.syft_function(
                input_policy=sy.MixedInputPolicy(client=client, data=asset, stage=str, message=dict),
                output_policy=OutputPolicyExecuteCount(limit=1_000_000))(getattr(module, name))
        return self.call(client, "code.request_code_execution", submission)


# ---- the federation ---------------------------------------------------------------------------------------------


@dataclass
class Federation:
    """Three served sites, their admins' clients, rita's honest handles and the attacker's clients."""

    served: dict[str, ServedSite]
    admins: dict[str, Any]
    rita: dict[str, SiteHandle]  # rita's honest handles (her own federated loop)
    rita_ids: dict[str, str]  # site -> rita's immutable id there
    eve_id: str  # eve's id at site-a
    root: Path
    vector_length: int
    private_texts: list[str]  # the first characters of every private review of every site
    attacker: Attacker
    raw: dict[str, Any] = field(default_factory=dict)  # site -> rita's raw client (sy.login)
    eve: Any = None  # eve's raw client at site-a

    def site(self, name: str) -> SiteDir:
        return SiteDir(self.served[name].data_dir)

    def key(self, name: str) -> str:
        return self.site(name).identity_public_hex()

    def plan(self, *, sites: list[SiteHandle] | None = None, **overrides: Any) -> FederatedPlan:
        dp = {**DP, **overrides.pop("dp", {})}
        return make_plan(sites=sites or list(self.rita.values()), model=SPEC, dp=dp,
                         vector_length=self.vector_length, clip=0.5, **overrides)

    def ledger(self, name: str) -> PrivacyLedger:
        return PrivacyLedger(self.site(name).path, "imdb", self.rita_ids[name], site=name)

    def admin_cli(self, name: str, *args: str) -> tuple[int, str, str]:
        """`fedsite admin ARGS --data-dir D` as the site's admin runs it (in this process: one import of syft)."""
        return _cli(["admin", *args, "--data-dir", str(self.served[name].data_dir)])

    def peers(self, name: str, *args: str) -> Any:
        """`fedsite admin peers ARGS --data-dir D` in a fresh interpreter, as the site's admin runs it."""
        done = fedsite("admin", "peers", *args, "--data-dir", str(self.served[name].data_dir))
        assert done.returncode == 0, done.stderr
        return done

    def pending(self, name: str, run_id: str) -> str:
        requests_ = [r for r in list_requests(self.admins[name]) if r.function == function_name(run_id)
                     and r.status == "pending"]
        assert len(requests_) == 1, requests_
        return requests_[0].request_id

    def refusals(self, name: str) -> list[ApiCallRefused]:
        return [e for e in AuditLog(self.site(name).path).events() if isinstance(e, ApiCallRefused)]


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _at_every_site(work: Callable[[str], T]) -> dict[str, T]:
    with ThreadPoolExecutor(max_workers=len(NAMES)) as pool:
        futures = {name: pool.submit(work, name) for name in NAMES}
        return {name: future.result() for name, future in futures.items()}


def _onboard(served: ServedSite, reviews: pd.DataFrame) -> tuple[Any, str, str | None]:
    """The admin uploads the partition and creates the researchers' accounts (eve at site-a only)."""
    site = SiteDir(served.data_dir)
    admin = connect_admin(site, password=ADMIN_PASSWORD)
    upload_partition(admin, site, dataset="imdb", reviews=reviews, budget=PrivacyBudget(epsilon=8.0, delta=1e-5))
    rita_id = add_researcher(admin, name="Rita", email=RITA, password=RESEARCHER_PASSWORD)
    eve_id = add_researcher(admin, name="Eve", email=EVE, password=RESEARCHER_PASSWORD) if served.name == "site-a" \
        else None
    return admin, rita_id, eve_id


def _pin_the_others(fed: Federation, name: str) -> None:
    """What the site's admin does after comparing keys with the other admins out of band."""
    for other in NAMES:
        if other != name:
            fed.peers(name, "add", other, fed.key(other))


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory, imdb_train: pd.DataFrame) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("attacks")
    served = {name: ServedSite(name=name, data_dir=root / name, port=free_port(), log=root / f"{name}.log",
                               admin_password=ADMIN_PASSWORD) for name in NAMES}
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("FEDSITE_ADMIN_PASSWORD", ADMIN_PASSWORD)  # for the admin commands run in this process
            for site in served.values():
                site.start()
            for site in served.values():
                site.wait_ready()
            parts = partition_indices(imdb_train["label"].to_numpy(), n_sites=60, seed=0)
            reviews = {name: imdb_train.iloc[parts[i][:REVIEWS_PER_SITE]].reset_index(drop=True)
                       for i, name in enumerate(NAMES)}
            # The admins onboard from a Python session with the usual umask (022), as datasites.admin is used in a
            # notebook; the in-process CLI (fedsite.cli.main) sets 077 for this process, so set it back here
            # whatever ran before.
            previous = os.umask(0o022)
            try:
                onboarded = _at_every_site(lambda name: _onboard(served[name], reviews[name]))
            finally:
                os.umask(previous)
            model, _ = build_from_spec(SPEC)
            rita = {name: SiteHandle(name=name, client=login(served[name].url, port=served[name].port, email=RITA,
                                                             password=RESEARCHER_PASSWORD),
                                     identity_key=SiteDir(served[name].data_dir).identity_public_hex())
                    for name in NAMES}
            private = [text[:40] for frame in reviews.values() for text in frame["text"].str.strip() if len(text) >= 40]
            fed = Federation(served, {n: a for n, (a, _, _) in onboarded.items()}, rita,
                             {n: r for n, (_, r, _) in onboarded.items()}, str(onboarded["site-a"][2]), root,
                             len(flatten_trainable(model)[0]), private, Attacker())
            _at_every_site(lambda name: _pin_the_others(fed, name))
            fed.raw = {name: fed.attacker.login(served[name], RITA) for name in NAMES}
            fed.eve = fed.attacker.login(served["site-a"], EVE)
            yield fed
    finally:
        for site in served.values():
            kill9(site)


def _private_in(fed: Federation, answers: list[str]) -> list[str]:
    """What of the sites' private data the answers hold: a review's first 40 characters, or a site secret."""
    received = "\n".join(answers)
    found = [f"private review {text!r}" for text in fed.private_texts if text in received]
    for name in NAMES:
        for secret in sorted((fed.site(name).path / "secrets").iterdir()):
            found += [f"{name}'s {secret.name}" for value in re.findall(r"[0-9a-f]{64}", secret.read_text())
                      if value in received]
    return found


@pytest.fixture(autouse=True)
def nothing_private_in_this_tests_answers(fed: Federation) -> Iterator[None]:
    """Each test (in any order, or alone) fails if an answer it (or a fixture it set up) received holds private data."""
    start = len(fed.attacker.received)
    yield
    answers = fed.attacker.received[start:]
    assert _private_in(fed, answers) == [], f"{len(answers)} answers reached the researcher with private data"


class RecordingRound(FederatedRound):
    """rita's honest round, keeping every site's reply of every stage."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.replies: dict[str, dict[str, Any]] = {}

    def _stage(self, stage: str, among: Any, extra: Any) -> dict[str, Any]:
        replies = super()._stage(stage, among, extra)
        self.replies[stage] = replies
        return replies


@dataclass(frozen=True)
class ApprovedRun:
    plan: FederatedPlan
    function: str
    digests: dict[str, str]  # site -> code hash of the approved request
    round_0: RecordingRound  # the one real round every site trained


@pytest.fixture(scope="module")
def run(fed: Federation) -> ApprovedRun:
    """rita's run, reviewed and approved by every admin with `fedsite admin approve`; round 0 runs for real."""
    plan = fed.plan()
    digests = {}
    for name in NAMES:
        submit(fed.rita[name], plan, fed.root / "rita")
        request_id = fed.pending(name, plan.run_id)
        code, out, err = fed.admin_cli(name, "approve", request_id)
        assert code == 0, err
        assert out.startswith(f"approved request {request_id[:12]} "), out
        (approval,) = [a for a in ApprovalRegistry(fed.site(name).path).all() if a.request_id == request_id]
        digests[name] = approval.code_hash
    round_0 = RecordingRound(list(fed.rita.values()), FederatedPlan.parse(plan), 0, 0)
    model, _ = build_from_spec(SPEC)
    outcome = round_0.run(flatten_trainable(model)[0])
    assert outcome.participants == NAMES
    fed.attacker.received += [_as_text(replies) for replies in round_0.replies.values()]  # what rita received
    return ApprovedRun(plan, function_name(plan.run_id), digests, round_0)


def _eve_plan(fed: Federation) -> FederatedPlan:
    handles = [SiteHandle(name=name, client=None, identity_key=fed.key(name)) for name in NAMES]
    return fed.plan(sites=handles)


# ---- 1. the generic action API and syft's other routes --------------------------------------------------------


def test_the_action_api_blobs_jobs_forwarding_and_extra_routes_are_closed(fed: Federation, run: ApprovedRun) -> None:
    from syft.client.api import SyftAPI, SyftAPICall
    from syft.serde.deserialize import _deserialize
    from syft.server.credentials import SyftSigningKey
    from syft.service.action.action_object import Action, ActionObject
    from syft.types.blob_storage import CreateBlobStorageEntry
    from syft.types.uid import UID, LineageID

    # Prepare: eve's own blob and upload, her own (pending) submission, and what the admin knows of the asset
    a, at = fed.served["site-a"], fed.attacker
    rita, eve = fed.raw["site-a"], fed.eve
    eve_plan = _eve_plan(fed)
    at.submit(eve, eve_plan, fed.root / "eve")
    eve_function = function_name(eve_plan.run_id)
    assert any(r.function == eve_function and r.researcher == fed.eve_id for r in list_requests(fed.admins["site-a"]))
    identity_key = a.data_dir / "secrets" / "identity_key"
    asset_id = at.asset(rita).action_id
    with quiet():
        private_blob = fed.admins["site-a"].api.services.action.get(asset_id).syft_blob_storage_entry_id
    secret = b"eve's own bytes"
    deposit = value_of(at.call(eve, "blob_storage.allocate", CreateBlobStorageEntry(file_size=len(secret), type_=str)))
    eve_blob = deposit.blob_storage_entry_id
    value_of(at.call(eve, "blob_storage.write_to_disk", uid=eve_blob, data=secret))
    csv = a.data_dir / "leak.csv"
    guesses = [at.upload(rita, fed.private_texts[0]), at.upload(rita, "a wrong guess")]
    code_id = at.own_code_id(rita, run.function)
    alias = ActionObject.from_obj("x")
    alias.syft_blob_storage_entry_id, alias.syft_action_saved_to_blob_store = private_blob, True
    before = len(fed.refusals("site-a"))

    # Execute: every attack of the action API, then the routes beside it
    answers = {
        "upload a Path": at.call(rita, "action.set", ActionObject.from_obj(identity_key)),
        "read the key": at.call(rita, "action.execute", Action(
            path="pathlib.Path", op="read_bytes", remote_self=LineageID(at.upload(rita, str(identity_key)).id),
            args=[], kwargs={})),
        "to_csv": at.call(rita, "action.execute", Action(
            path="pandas.DataFrame", op="to_csv", remote_self=LineageID(asset_id),
            args=[LineageID(at.upload(rita, str(csv)).id)], kwargs={})),
        **{f"oracle {i}": at.call(rita, "action.execute", Action(
            path="pandas.DataFrame", op="__eq__", remote_self=LineageID(asset_id), args=[LineageID(guess.id)],
            kwargs={})) for i, guess in enumerate(guesses)},
        "write eve's blob": at.call(rita, "blob_storage.write_to_disk", uid=eve_blob, data=b"overwritten"),
        "read eve's blob": at.call(rita, "blob_storage.read", uid=eve_blob),
        "read the private blob": at.call(rita, "blob_storage.read", uid=private_blob),
        "alias the private blob": at.call(rita, "action.set", alias),
        "a job": at.call(rita, "code.call", blocking=False, uid=code_id, data=at.asset(rita),
                         stage=at.upload(rita, "advertise_keys"), message=at.upload(rita, {"round": 0, "attempt": 5})),
        "the job queue": at.call(rita, "queue", uid=UID()),
        "jobs": at.call(rita, "job.get_all"),
        "forwarded": at.call(rita, "dataset.get_all", server_uid=fed.raw["site-b"].api.server_uid),
    }
    root_key = at.http("GET", a, "/metadata").json()["verify_key"]
    protocol = rita.api.communication_protocol
    root_api = _deserialize(at.http("GET", a, "/api", params={"verify_key": root_key,
                                                               "communication_protocol": protocol}).content,
                            from_bytes=True)
    routes = {f"{method} {route}": at.http(method, a, route, data=b"x").status_code for method, route in (
        ("POST", "/register"), ("POST", "/forgot_password"), ("POST", "/reset_password"),
        ("GET", f"/stream/{UID()}/blob/"), ("PUT", f"/stream/{UID()}/blob/"))}
    unknown = at.http("POST", a, "/login", json={"email": "nobody@uni.org", "password": RESEARCHER_PASSWORD})
    listing = SyftAPICall(server_uid=rita.api.server_uid, path="user.get_all", args=[], kwargs={})
    unsigned = at.post_call(a, listing)
    keyless = at.post_call(a, listing.sign(SyftSigningKey.generate()))
    wrong = at.http("POST", a, "/login", json={"email": EVE, "password": "Not-Her-Password-2026!"})

    # Assert: the gate refused each call, with the same answer whatever the private value
    reasons = {name: gate_refusal(answer, "site-a", _path_of(name)) for name, answer in answers.items()}
    assert reasons["upload a Path"] == "only a str or dict input may be uploaded, not PosixPath"
    for name in ("read the key", "to_csv", "oracle 0", "oracle 1", "the job queue", "jobs"):
        assert reasons[name] == NOT_ALLOWED, name
    assert refusal(answers["oracle 0"]) == refusal(answers["oracle 1"])  # no oracle: one answer for every guess
    assert reasons["write eve's blob"] == "only a blob you allocated may be written"
    for name in ("read eve's blob", "read the private blob"):
        assert reasons[name] == "only blobs of your own inputs and outputs, or of a mock twin, may be read", name
    assert reasons["alias the private blob"] == "the object's data must be in a blob you allocated"
    assert reasons["a job"] == "researchers make blocking calls only (no jobs)"
    assert reasons["forwarded"] == "calls for another server are not forwarded"
    assert not csv.exists()
    assert value_of(at.call(eve, "blob_storage.read", uid=eve_blob)).syft_object == secret  # eve's blob is intact
    assert re.fullmatch(r"site-a: refused: \S+ \(the site's API gate\): only calls signed by an account's key are "
                        r"served", refusal(unsigned)), refusal(unsigned)
    assert gate_refusal(keyless, "site-a", "user.get_all").startswith("this key has no account here")
    audited = fed.refusals("site-a")[before:]  # rita's refusals, under her id; a key without an account is not
    assert [e.caller for e in audited] == [fed.rita_ids["site-a"]] * len(answers)  # let to grow the log
    assert {e.caller_email for e in audited} == {RITA}
    # the root key's API (syft serves it to anyone) lists no researcher's function
    assert isinstance(root_api, SyftAPI)
    assert not [path for path in root_api.endpoints if path.startswith("code.call_")]
    assert not {run.function, eve_function} & {e.name for e in root_api.endpoints.values()}
    # eve's own API lists her function, not rita's
    with quiet():
        eve.refresh()
    eve_paths = set(eve.api.endpoints)
    assert f"code.call_{eve_function}" in eve_paths and f"code.call_{run.function}" not in eve_paths
    # the account and stream routes are not served; /login tells an unknown e-mail from a wrong password in nothing
    assert routes == dict.fromkeys(routes, 404)
    assert (unknown.status_code, unknown.content) == (wrong.status_code, wrong.content)
    assert refusal(_deserialize(unknown.content, from_bytes=True)) == "Invalid credentials."


def _path_of(name: str) -> str:
    return {"upload a Path": "action.set", "alias the private blob": "action.set", "write eve's blob":
            "blob_storage.write_to_disk", "read eve's blob": "blob_storage.read", "read the private blob":
            "blob_storage.read", "a job": "code.call", "the job queue": "queue", "jobs": "job.get_all",
            "forwarded": "dataset.get_all"}.get(name, "action.execute")


# ---- 2. identity --------------------------------------------------------------------------------------------------


def test_a_researcher_cannot_change_its_identity_and_a_renamed_one_keeps_its_spend(
        fed: Federation, run: ApprovedRun) -> None:
    from syft.server.credentials import SyftSigningKey
    from syft.service.user.user import UserUpdate

    # Prepare
    at, rita, a = fed.attacker, fed.raw["site-a"], fed.served["site-a"]
    me = value_of(at.call(rita, "user.get_current_user"))
    spent = fed.ledger("site-a").spent()
    changes = {"e-mail": UserUpdate(email="Rita@uni.org"), "key": UserUpdate(verify_key=SyftSigningKey.generate().verify_key),
               "weak password": UserUpdate(password="weakpass1")}

    # Execute: rita's own attempts, then the admin renames her and she submits a new plan
    reasons = {name: gate_refusal(at.call(rita, "user.update", uid=me.id, user_update=update), "site-a", "user.update")
               for name, update in changes.items()}
    weak_login = at.http("POST", a, "/login", json={"email": RITA, "password": "weakpass1"})
    try:
        with quiet():
            renamed = fed.admins["site-a"].api.services.user.update(uid=me.id, email=RENAMED)
        assert renamed.email == RENAMED
        plan = fed.plan()
        value_of(at.submit(rita, plan, fed.root / "rita-raw"))
        code, shown, err = fed.admin_cli("site-a", "show", fed.pending("site-a", plan.run_id), "--no-dry-run")
    finally:
        with quiet():
            fed.admins["site-a"].api.services.user.update(uid=me.id, email=RITA)

    # Assert: e-mail, key and a weak password are the admin's business; the spend follows the id, not the e-mail
    assert reasons["e-mail"] == ("a researcher may change only its password here, not ['email'] (e-mail, name, role "
                                 "and keys are fixed by the site's admin)")
    assert "not ['verify_key']" in reasons["key"]
    assert reasons["weak password"].startswith("new password is too weak")
    assert value_of(at.call(rita, "user.get_current_user")).email == RITA
    assert refusal(_deserialize_bytes(weak_login.content)) == "Invalid credentials."
    assert code == 0, err
    assert f"from {RENAMED} (id {fed.rita_ids['site-a']})" in shown
    assert spent > 0
    shown_spent = float(re.search(r"spent so far (\d+\.\d+)", shown).group(1))  # type: ignore[union-attr]
    assert shown_spent == pytest.approx(spent, abs=1e-3)


def _deserialize_bytes(content: bytes) -> Any:
    from syft.serde.deserialize import _deserialize

    return _deserialize(content, from_bytes=True)


# ---- 3. the roster ------------------------------------------------------------------------------------------------


def test_a_roster_of_the_researchers_own_sites_is_refused_and_an_unpinned_peer_stops_the_run(
        fed: Federation, run: ApprovedRun) -> None:
    # Prepare: site-a plus two "sites" whose keys rita holds, threshold 2: their shares would unmask site-a alone
    at, rita = fed.attacker, fed.raw["site-a"]
    fakes = {name: Ed25519PrivateKey.generate().public_key().public_bytes_raw().hex() for name in ("site-x", "site-y")}
    sybil = fed.plan(sites=[SiteHandle(name="site-a", client=None, identity_key=fed.key("site-a")),
                            *(SiteHandle(name=name, client=None, identity_key=key) for name, key in fakes.items())],
                     threshold=2)
    value_of(at.submit(rita, sybil, fed.root / "sybil"))
    request_id = fed.pending("site-a", sybil.run_id)
    code_id = at.own_code_id(rita, run.function)

    # Execute: the admin reviews and tries to approve; then unpins site-c mid-run, and rita calls the next round
    shown = fed.admin_cli("site-a", "show", request_id, "--no-dry-run")
    approved = fed.admin_cli("site-a", "approve", request_id)
    fed.peers("site-a", "remove", "site-c")
    try:
        unpinned = at.stage(rita, code_id, "advertise_keys", {"round": 1, "attempt": 7})
    finally:
        fed.peers("site-a", "add", "site-c", fed.key("site-c"))
    repinned_pins = fed.peers("site-a", "list").stdout

    # Assert
    problems = [f"roster entry {name} (key {key_fingerprint(key)}) is not pinned here: check its key with its admin, "
                f"then `fedsite admin peers add {name} KEY`" for name, key in fakes.items()]
    assert shown[0] == 0, shown[2]
    assert "PROBLEMS (approval refused):\n" + "\n".join(f"  - {p}" for p in problems) in shown[1]
    for name, key in fakes.items():
        assert re.search(rf"^ +{name} +key {key_fingerprint(key)}  NOT PINNED$", shown[1], re.MULTILINE), shown[1]
    assert approved[0] == 2 and f"cannot be approved: {problems[0]} (2 problem(s)" in approved[2], approved
    assert ApprovalRegistry(fed.site("site-a").path).find(code_hash(render_round_function(sybil)),
                                                         researcher=fed.rita_ids["site-a"]) is None
    assert unpinned == {"reply": "refused", "refused": f"site-a: roster entry site-c (key {key_fingerprint(fed.key('site-c'))}) is not "
                                   "pinned here: check its key with its admin, then `fedsite admin peers add site-c KEY`"}
    assert "pinned site-c" in repinned_pins


# ---- 4. the clean-up of a call's inputs ------------------------------------------------------------------------------


def test_others_objects_passed_as_call_inputs_are_refused_and_kept(fed: Federation, run: ApprovedRun) -> None:
    from syft.types.uid import LineageID

    # Prepare: eve's upload, and the private asset's id
    at, rita = fed.attacker, fed.raw["site-a"]
    eve_object = at.upload(fed.eve, {"round": 1, "attempt": 0})
    asset_id = at.asset(rita).action_id
    code_id = at.own_code_id(rita, run.function)
    own_stage, own_message = at.upload(rita, "advertise_keys"), at.upload(rita, {"round": 1, "attempt": 8})

    # Execute: rita's approved code with eve's object or the asset as one of its inputs, as a pointer or a bare id
    answers = {
        "eve's object as message": at.call(rita, "code.call", uid=code_id, data=at.asset(rita), stage=own_stage,
                                           message=eve_object),
        "eve's id as stage": at.call(rita, "code.call", uid=code_id, data=at.asset(rita), stage=eve_object.id,
                                     message=own_message),
        "the asset as stage": at.call(rita, "code.call", uid=code_id, data=at.asset(rita), stage=at.asset(rita),
                                      message=own_message),
        "the asset's id as message": at.call(rita, "code.call", uid=code_id, data=at.asset(rita), stage=own_stage,
                                             message=LineageID(asset_id)),
    }

    # Assert: refused before anything ran, and nothing was deleted
    for name, answer in answers.items():
        assert re.fullmatch(r"`(stage|message)` must be an object you uploaded",
                            gate_refusal(answer, "site-a", "code.call")), name
    admin = fed.admins["site-a"]
    with quiet():
        assert admin.api.services.action.exists(eve_object.id) is True
        assert admin.api.services.action.exists(asset_id) is True
        assert len(admin.datasets["imdb"].assets["reviews"].data) == REVIEWS_PER_SITE


# ---- 5. secure noise ------------------------------------------------------------------------------------------------


def test_the_approved_plan_has_secure_noise_and_a_plan_without_it_is_flagged(fed: Federation, run: ApprovedRun) -> None:
    # Prepare: rita asks site-b for a plan with torch's (non-cryptographic) noise
    plan = fed.plan(dp={"secure_mode": False})
    value_of(fed.attacker.submit(fed.raw["site-b"], plan, fed.root / "noise"))

    # Execute
    code, shown, err = fed.admin_cli("site-b", "show", fed.pending("site-b", plan.run_id), "--no-dry-run")

    # Assert
    for name in NAMES:
        approval = ApprovalRegistry(fed.site(name).path).find(run.digests[name], researcher=fed.rita_ids[name])
        assert approval is not None and FederatedPlan.parse(approval.plan).dp.secure_mode is True
    assert code == 0, err
    assert re.search(r"^WARNING: this plan turns off cryptographically secure noise \(dp\.secure_mode = false\)",
                     shown, re.MULTILINE), shown


# ---- 7. small channels: timing, concurrent attempts, other requests, the ledger's tail --------------------------------


def _prepare_round(fed: Federation, plan: FederatedPlan, round_index: int, attempt: int) -> dict[str, Any]:
    """rita's key advertisement and share exchange of one attempt at every site; each site's mask_input message."""
    session = FederatedRound(list(fed.rita.values()), plan, round_index, attempt)
    agg = session.aggregator
    for reply in session._stage("advertise_keys", NAMES, lambda _: {}).values():
        agg.receive_advertise_keys(AdvertiseKeys.from_wire(reply.message))
    keys = agg.close_advertise_keys().to_wire()
    for reply in session._stage("share_keys", NAMES, lambda _: {"round_keys": keys}).values():
        agg.receive_share_keys(ShareKeys.from_wire(reply.message))
    model = encode_vector(np.zeros(fed.vector_length, dtype=np.float32))
    return {name: {"round": round_index, "attempt": attempt, "incoming": inbox.to_wire(), "global_model": model}
            for name, inbox in agg.close_share_keys().items()}


def _events(fed: Federation, name: str, kind: type, round_index: int) -> list[Any]:
    return [e for e in AuditLog(fed.site(name).path).events() if isinstance(e, kind) and e.round == round_index]


def test_no_timing_one_attempt_per_round_other_requests_listed_and_a_cut_ledger_caught(
        fed: Federation, run: ApprovedRun) -> None:
    from syft.service.action.action_object import ActionObject
    from syft.service.action.action_permissions import ActionPermission
    from syft.service.action.action_service import ActionService
    from syft.service.request.request import ActionStoreChange, SubmitRequest
    from syft.store.linked_obj import LinkedObject

    # Prepare: the ledger as it is after round 0 (an "older copy"), two attempts at round 1 ready to train
    at, a = fed.attacker, fed.served["site-a"]
    ledger = fed.ledger("site-a")
    older = {path: path.read_bytes() for path in (ledger.path, ledger.journal.head_path)}
    spent_after_round_0 = ledger.spent()
    plan = FederatedPlan.parse(run.plan)
    messages = [_prepare_round(fed, plan, 1, attempt)["site-a"] for attempt in (0, 1)]
    clients = [at.login(a, RITA), at.login(a, RITA)]  # one connection per attempt, as two scripts would
    code_id = at.own_code_id(clients[0], run.function)
    for client in clients:
        at.asset(client)
    inputs = [(at.upload(c, "mask_input"), at.upload(c, m)) for c, m in zip(clients, messages, strict=True)]
    start = threading.Barrier(2)

    def attempt(index: int) -> Any:
        start.wait()
        return at.stage(clients[index], code_id, "mask_input", messages[index], inputs=inputs[index])

    # Execute (1): both attempts' mask_input at once
    with ThreadPoolExecutor(max_workers=2) as pool:
        replies = list(pool.map(attempt, (0, 1)))

    # Assert (1): round 0's masked replies carried no timing; exactly one attempt of round 1 trained and released
    for name, reply in run.round_0.replies["mask_input"].items():
        assert reply.epsilon_spent == round(fed.ledger(name).records()[0].epsilon_after, 2)  # two decimals only
    trained = [r for r in replies if isinstance(r, dict) and r.get("reply") == "message"]
    refused = [r for r in replies if isinstance(r, dict) and r.get("reply") == "refused"]
    assert len(trained) == 1 and len(refused) == 1, replies
    assert set(trained[0]) == {"reply", "message", "epsilon_spent"}  # nothing else, no timing
    assert re.fullmatch(r"site-a: (another attempt of round 1 is training here: only one attempt of a round trains "
                        r"and releases|round 1 already ran here: a replayed round is refused)", refused[0]["refused"])
    rounds = [r.round_index for r in fed.ledger("site-a").records() if r.run_id == run.plan.run_id]
    assert rounds == [0, 1]
    assert len(_events(fed, "site-a", PrivacySpent, 1)) == 1 and len(_events(fed, "site-a", OutputReleased, 1)) == 1

    # Execute (2): a request that is not a code request, created by the admin with syft's raw request.submit
    admin = fed.admins["site-a"]
    target = LinkedObject(server_uid=admin.api.server_uid, service_type=ActionService, object_type=ActionObject,
                          object_uid=at.upload(fed.eve, "eve's input").id)
    with quiet():
        other = admin.api.services.request.submit(SubmitRequest(changes=[
            ActionStoreChange(linked_obj=target, apply_permission_type=ActionPermission.READ)]))
    other_id = str(other.id.no_dash)
    listed = fed.admin_cli("site-a", "requests")
    shown = fed.admin_cli("site-a", "show", other_id)
    approved = fed.admin_cli("site-a", "approve", other_id)
    denied = fed.admin_cli("site-a", "deny", other_id, "--reason", "Fedsite approves code requests only")

    # Assert (2): listed as what it is; never reviewed or approved; denied like any request
    assert listed[0] == 0, listed[2]
    row = next(line for line in listed[1].splitlines() if line.startswith(other_id[:12]))
    assert "(not a code request: ActionStoreChange)" in row and row.split()[-1] == "pending", row
    assert shown[0] == 2 and "a Fedsite site reviews and approves only code requests" in shown[2], shown
    assert approved[0] == 2 and "a Fedsite site reviews and approves only code requests" in approved[2], approved
    assert denied[0] == 0, denied[2]

    # Execute (3): the ledger's last line cut off, then the journal and its head rolled back to the older copy;
    # rita asks for the next round each time
    full = {path: path.read_bytes() for path in older}
    spent_after_round_1 = fed.ledger("site-a").spent()
    try:
        cut = full[ledger.path][: full[ledger.path].rstrip(b"\n").rfind(b"\n") + 1]
        with open(ledger.path, "r+b") as journal:  # in place: the file keeps its mode
            journal.truncate(len(cut))
        after_cut = at.stage(fed.raw["site-a"], code_id, "advertise_keys", {"round": 2, "attempt": 0})
        verify_cut = fed.admin_cli("site-a", "audit", "--verify")
        for path, data in older.items():
            with open(path, "r+b") as handle:
                handle.truncate(0)
                handle.write(data)
        after_rollback = at.stage(fed.raw["site-a"], code_id, "advertise_keys", {"round": 2, "attempt": 1})
    finally:
        for path, data in full.items():
            with open(path, "r+b") as handle:
                handle.truncate(0)
                handle.write(data)

    after_restore = at.stage(fed.raw["site-a"], code_id, "advertise_keys", {"round": 2, "attempt": 2})

    # Assert (3): both caught before the next spend: the round is refused with the site's reason (the details go
    # to the admin's log), the admin's verification names the cut, nothing is refunded; the restored ledger lets
    # the same call through
    for answer in (after_cut, after_rollback):
        assert answer == {"reply": "refused", "refused": "site-a: refused: the site's records failed verification; its admin must "
                                     "restore them before any round runs here"}, answer
    assert verify_cut[0] == 2
    assert "has 1 entries but its head file records 2: its last entries were removed" in verify_cut[2], verify_cut
    assert "site-a: refused a round: a journal failed verification" in fed.served["site-a"].log.read_text()
    assert not _events(fed, "site-a", PrivacySpent, 2)
    assert [r.round_index for r in fed.ledger("site-a").records() if r.run_id == run.plan.run_id] == [0, 1]
    assert fed.ledger("site-a").spent() == spent_after_round_1 > spent_after_round_0
    assert isinstance(after_restore, dict) and set(after_restore) == {"reply", "message"} and after_restore["reply"] == "message", after_restore


# ---- 6. files ---------------------------------------------------------------------------------------------------------


def _modes(data_dir: Path) -> tuple[set[int], set[int], list[str]]:
    entries = [data_dir, *data_dir.rglob("*")]
    folders = {stat.S_IMODE(p.lstat().st_mode) for p in entries if p.is_dir()}
    loose = [f"{p.relative_to(data_dir)} {stat.S_IMODE(p.lstat().st_mode):04o}" for p in entries
             if (p.is_dir() and stat.S_IMODE(p.lstat().st_mode) != 0o700)
             or (p.is_file() and stat.S_IMODE(p.lstat().st_mode) != 0o600)]
    return folders, {stat.S_IMODE(p.lstat().st_mode) for p in entries if p.is_file()}, loose


def test_data_dirs_are_private_and_a_database_password_on_the_command_line_is_refused(
        fed: Federation, run: ApprovedRun, tmp_path: Path) -> None:
    # Execute
    modes = {name: _modes(fed.served[name].data_dir) for name in NAMES}
    refused = fedsite("serve", "--name", "site-p", "--data-dir", str(tmp_path / "site-p"), "--port", str(free_port()),
                      "--db-url", "postgresql://u:pw@h/db")

    # Assert
    assert refused.returncode == 2
    assert refused.stderr.startswith("fedsite: error: --db-url contains a password, which every user of this machine "
                                     "can read in `ps`")
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert not (tmp_path / "site-p").exists()
    assert {name: loose for name, (_, _, loose) in modes.items()} == dict.fromkeys(NAMES, [])
    assert all(folders == {0o700} and files == {0o600} for folders, files, _ in modes.values()), modes


# ---- after the attacks ------------------------------------------------------------------------------------------------


def test_after_the_attacks_every_journal_verifies_only_the_approved_spend_and_nothing_private_leaked(
        fed: Federation, run: ApprovedRun) -> None:
    # Execute: each admin verifies its site's journals with the CLI
    verified = _at_every_site(lambda name: fedsite("admin", "audit", "--verify", "--data-dir",
                                                   str(fed.served[name].data_dir)))

    # Assert: every chain intact; the ledgers hold rita's approved run alone, matching the audited spend
    for name in NAMES:
        assert verified[name].returncode == 0, verified[name].stderr
        assert "chain intact" in verified[name].stdout
        ledgers = sorted(p.name for p in (fed.site(name).path / "ledger" / "imdb").glob("*.jsonl"))
        assert ledgers == [f"{fed.rita_ids[name]}.jsonl"]
        records = fed.ledger(name).replay()
        assert {r.run_id for r in records} == {run.plan.run_id}
        # round 0 everywhere; round 1 at site-a only once the concurrency attack has run (the order is random)
        assert [r.round_index for r in records] in (([0], [0, 1]) if name == "site-a" else ([0],))
        audited = [(e.round, round(e.epsilon, 9)) for e in AuditLog(fed.site(name).path).events()
                   if isinstance(e, PrivacySpent)]
        assert audited == [(r.round_index, round(max(0.0, r.epsilon_after - r.epsilon_before), 9)) for r in records]
        assert records[-1].epsilon_after <= 8.0
    # nothing private reached the researchers, over every answer of every test that ran before this one (each
    # test also checks its own answers, so the order does not matter; rita's approved round gives one per stage)
    assert len(fed.attacker.received) >= len(run.round_0.replies) == 5
    assert _private_in(fed, fed.attacker.received) == []
