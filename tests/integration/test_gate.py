"""The API gate against syft itself: every path syft registers, and each way a researcher's raw calls attack a site.

Every call here is made by hand with syft's raw client API (``tests.raw_syft``), signed with the
researcher's own key, as a hostile researcher would; Fedsite's helpers are not used to attack.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from datasites.admin import add_researcher, upload_partition
from datasites.gate import ALLOWLIST, researcher_paths
from datasites.server import InProcessSite, launch_in_process, quiet
from policies.audit import AuditLog
from policies.budget import PrivacyBudget
from tests.canonical import approve_by_hand, submit_canonical
from tests.conftest import ADMIN_PASSWORD, RESEARCHER_PASSWORD
from tests.raw_syft import gate_refusal, raw_call, refusal, value_of

pytestmark = pytest.mark.integration

RITA, EVE = "rita@uni.org", "eve@uni.org"
NOT_ALLOWED = "not on the site's allowlist (default deny)"


@dataclass
class Site:
    running: InProcessSite
    rita: Any  # a researcher with an approved round function
    eve: Any  # another researcher on the same site
    function: str  # rita's approved function
    eve_function: str  # eve's submitted (unapproved) function

    @property
    def worker(self) -> Any:
        return self.running.worker

    def asset(self, client: Any, dataset: str = "imdb") -> Any:
        with quiet():
            return client.datasets[dataset].assets["reviews"]

    def twin(self, dataset: str = "imdb") -> Any:
        """The asset's TwinObject, as the site stores it (read with the server's rights)."""
        uid = self.asset(self.rita, dataset).action_id
        return self.worker.services.action.stash.get(credentials=self.worker.verify_key, uid=uid).unwrap()

    def refusals(self) -> list[dict[str, Any]]:
        return [e.to_record() for e in AuditLog(self.running.site.path).events() if e.kind == "api_call_refused"]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, imdb_train: pd.DataFrame) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("gate")
    running = launch_in_process(root / "site-a", admin_password=ADMIN_PASSWORD, name="site-a")
    admin = running.login(email=running.meta.admin_email, password=ADMIN_PASSWORD)
    budget = PrivacyBudget(epsilon=8.0, delta=1e-5)
    upload_partition(admin, running.site, dataset="imdb", reviews=imdb_train.iloc[:200], budget=budget)
    upload_partition(admin, running.site, dataset="extra", reviews=imdb_train.iloc[200:300], budget=budget)
    for name, email in (("Rita", RITA), ("Eve", EVE)):
        add_researcher(admin, name=name, email=email, password=RESEARCHER_PASSWORD)
    rita = running.login(email=RITA, password=RESEARCHER_PASSWORD)
    eve = running.login(email=EVE, password=RESEARCHER_PASSWORD)
    function = submit_canonical(running, rita, root / "rita")
    approve_by_hand(running, function, email=RITA)
    eve_function = submit_canonical(running, eve, root / "eve")
    with pytest.MonkeyPatch.context() as patch:
        from policies import site_runtime

        # the approved function's runtime answers a fixed reply: these tests are about who may call what
        patch.setattr(site_runtime, "run_stage", lambda data, *, stage, message, **kwargs: {"stage": stage})
        yield Site(running, rita, eve, function, eve_function)
    running.stop()


def _upload(client: Any, value: Any) -> Any:
    """An object the researcher uploads (syft's client: blob allocate + write + action.set)."""
    from syft.service.action.action_object import ActionObject

    with quiet():
        return ActionObject.from_obj(value).send(client)


def _call_approved(site: Site, client: Any, function: str, **overrides: Any) -> Any:
    """A raw code.call of ``function`` with uploaded inputs; ``overrides`` replace any argument."""
    (code,) = value_of(raw_call(client, "code.get_by_service_func_name", function))
    kwargs = {"uid": code.id, "data": site.asset(client), "stage": _upload(client, "advertise_keys"),
              "message": _upload(client, {"round": 0, "attempt": 0}), **overrides}
    return raw_call(client, "code.call", **kwargs)


# ---- default deny, against syft's own registry -----------------------------------------------------------------


def test_every_path_syft_registers_is_refused_unless_allowlisted(site: Site) -> None:
    from syft.service.service import ServiceConfigRegistry

    registry = sorted(ServiceConfigRegistry.__service_config_registry__)  # read at run time: nothing slips past
    before = len(site.refusals())

    reasons = {path: gate_refusal(raw_call(site.rita, path), "site-a", path)
               for path in registry if path not in ALLOWLIST}

    assert len(registry) == 225 and len(reasons) == 225 - len(ALLOWLIST)
    assert set(reasons.values()) == {NOT_ALLOWED}
    assert {"action.execute", "action.get_pointer", "action.exists", "user.view", "job.get",
            "worker_pool.launch", "api.call", "sync.sync_items", "settings.update", "request.submit",
            "blob_storage.mark_write_complete", "migration._get_object"} <= set(reasons)
    audited = site.refusals()[before:]
    assert [r["path"] for r in audited] == list(reasons)
    assert {r["caller_email"] for r in audited} == {RITA} and all(len(r["caller"]) == 32 for r in audited)


def test_the_allowlist_is_a_small_subset_of_what_syft_opens_to_researchers() -> None:
    opened = researcher_paths()

    assert len(opened) == 114
    assert set(ALLOWLIST) <= set(opened)
    assert sorted(p for p, verdict in opened.items() if verdict == "allowlisted") == sorted(ALLOWLIST)
    assert all(rule.reason.strip() for rule in ALLOWLIST.values())


def test_allowlisted_paths_with_no_arguments_answer_and_the_rest_need_theirs(site: Site) -> None:
    answered = {path: raw_call(site.rita, path) for path in
                ("metadata.get_metadata", "user.get_current_user", "dataset.get_all", "request.get_all")}

    assert value_of(answered["user.get_current_user"]).email == RITA
    assert {d.name for d in value_of(answered["dataset.get_all"])} == {"imdb", "extra"}
    for path in set(ALLOWLIST) - set(answered):
        assert gate_refusal(raw_call(site.rita, path), "site-a", path).startswith("missing arguments"), path


def test_calls_that_would_skip_syfts_role_checks_are_refused(site: Site) -> None:
    from syft.client.api import SignedSyftAPICall, SyftAPICall
    from syft.server.credentials import SyftSigningKey
    from syft.types.uid import UID

    # Prepare: the shortcuts in syft's dispatcher that run before its role check
    asking = SyftAPICall(server_uid=site.worker.id, path="user.get_current_user", args=[], kwargs={})
    forged = asking.sign(SyftSigningKey.generate())
    impostor = SignedSyftAPICall(credentials=site.rita.api.signing_key.verify_key,  # claims to be rita
                                 serialized_message=forged.serialized_message, signature=forged.signature)

    # Execute / Assert
    assert gate_refusal(raw_call(site.rita, "user.get_all", blocking=False), "site-a", "user.get_all") == \
        "researchers make blocking calls only (no jobs)"
    assert gate_refusal(raw_call(site.rita, "dataset.get_all", server_uid=UID()), "site-a", "dataset.get_all") == \
        "calls for another server are not forwarded"
    assert gate_refusal(raw_call(site.rita, "queue", uid=UID()), "site-a", "queue") == NOT_ALLOWED
    assert gate_refusal(raw_call(site.rita, "dataset.get_all", signer=SyftSigningKey.generate()), "site-a",
                        "dataset.get_all").startswith("this key has no account here")
    assert refusal(site.worker.handle_api_call(impostor).message.data) == \
        "site-a: refused: api_call (the site's API gate): only calls signed by an account's key are served"
    assert value_of(raw_call(site.rita, "metadata")).name == "site-a"  # public metadata still answers


# ---- attack 1: the generic action API ---------------------------------------------------------------------------


def test_action_execute_reaches_no_file_and_no_method_of_the_private_asset(site: Site, tmp_path: Path) -> None:
    from syft.service.action.action_object import Action, ActionObject
    from syft.types.uid import LineageID

    secret = tmp_path / "identity_key"
    secret.write_text("site secret")
    asset_id = site.asset(site.rita).action_id
    read_file = Action(path="pathlib.Path", op="read_bytes", remote_self=LineageID(asset_id), args=[], kwargs={})
    to_csv = Action(path="pandas.DataFrame", op="to_csv", remote_self=LineageID(asset_id),
                    args=[], kwargs={})

    path_upload = raw_call(site.rita, "action.set", ActionObject.from_obj(secret))
    executes = [raw_call(site.rita, "action.execute", action) for action in (read_file, to_csv)]

    assert gate_refusal(path_upload, "site-a", "action.set") == "only a str or dict input may be uploaded, not PosixPath"
    assert [gate_refusal(answer, "site-a", "action.execute") for answer in executes] == [NOT_ALLOWED] * 2
    assert not list(tmp_path.glob("*.csv")) and secret.read_text() == "site secret"


def test_uploads_cannot_alias_the_private_asset_or_its_blob(site: Site) -> None:
    from syft.service.action.action_object import ActionObject
    from syft.types.twin_object import TwinObject

    twin = site.twin()
    private_blob = twin.private_obj.syft_blob_storage_entry_id
    over_asset = ActionObject.from_obj("x", id=twin.id)  # the asset's own id: an overwrite
    pointing = ActionObject.from_obj("x")
    pointing.syft_blob_storage_entry_id, pointing.syft_action_saved_to_blob_store = private_blob, True
    mock_pointing = ActionObject.from_obj("x")
    mock_pointing.syft_blob_storage_entry_id, mock_pointing.syft_action_saved_to_blob_store = private_blob, True
    twin_upload = TwinObject(private_obj=ActionObject.from_obj("y"), mock_obj=mock_pointing)

    answers = {name: raw_call(site.rita, "action.set", obj) for name, obj in
               (("overwrite", over_asset), ("alias", pointing), ("twin", twin_upload))}

    assert gate_refusal(answers["overwrite"], "site-a", "action.set") == \
        "that object id is taken: an upload creates a new object"
    assert gate_refusal(answers["alias"], "site-a", "action.set") == "the object's data must be in a blob you allocated"
    assert gate_refusal(answers["twin"], "site-a", "action.set") == "action_object must be a plain ActionObject"
    assert site.twin().private_obj.syft_blob_storage_entry_id == private_blob


def test_blob_storage_is_confined_to_the_callers_own_blobs(site: Site) -> None:
    from syft.types.blob_storage import CreateBlobStorageEntry

    twin = site.twin()
    private_blob, mock_blob = twin.private_obj.syft_blob_storage_entry_id, twin.mock_obj.syft_blob_storage_entry_id
    mock_before = site.asset(site.rita).mock.copy()
    traversal = CreateBlobStorageEntry(file_size=10, type_=str, extensions=["/../../../../tmp/evil"])
    taken = CreateBlobStorageEntry(id=private_blob, file_size=10, type_=str)

    answers = {
        "extensions": raw_call(site.rita, "blob_storage.allocate", traversal),
        "taken": raw_call(site.rita, "blob_storage.allocate", taken),
        "write mock": raw_call(site.rita, "blob_storage.write_to_disk", uid=mock_blob, data=b"EVIL"),
        "write private": raw_call(site.rita, "blob_storage.write_to_disk", uid=private_blob, data=b"EVIL"),
        "read private": raw_call(site.rita, "blob_storage.read", uid=private_blob),
    }

    assert gate_refusal(answers["extensions"], "site-a", "blob_storage.allocate") == \
        "a call input is plain bytes: no file extensions or mimetype"
    assert gate_refusal(answers["taken"], "site-a", "blob_storage.allocate") == "that blob id is taken"
    for name in ("write mock", "write private"):
        assert gate_refusal(answers[name], "site-a", "blob_storage.write_to_disk") == \
            "only a blob you allocated may be written"
    assert gate_refusal(answers["read private"], "site-a", "blob_storage.read") == \
        "only blobs of your own inputs and outputs, or of a mock twin, may be read"
    assert site.asset(site.rita).mock.equals(mock_before)
    assert value_of(raw_call(site.rita, "blob_storage.read", uid=mock_blob)) is not None  # the mock is public


def test_objects_are_read_only_as_the_callers_own_outputs(site: Site) -> None:
    twin_id = site.asset(site.rita).action_id
    eve_upload = _upload(site.eve, "eve's input")
    rita_output = value_of(_call_approved(site, site.rita, site.function))

    answers = {
        "private": raw_call(site.rita, "action.get", twin_id),
        "eve's upload": raw_call(site.rita, "action.get", eve_upload.id),
        "own upload": raw_call(site.rita, "action.get", _upload(site.rita, "mine").id),
        "eve reads rita's output": raw_call(site.eve, "action.get", rita_output.id),
        "mock of an output": raw_call(site.eve, "action.get_mock", rita_output.id),
    }

    for name in ("private", "eve's upload", "own upload", "eve reads rita's output"):
        assert gate_refusal(answers[name], "site-a", "action.get").startswith(
            "only the output of your own authorised call may be read here"), name
    assert gate_refusal(answers["mock of an output"], "site-a", "action.get_mock") == \
        "only an asset of this site's datasets may be named here"
    assert value_of(raw_call(site.rita, "action.get", rita_output.id, resolve_nested=True)).syft_action_data == \
        {"stage": "advertise_keys"}


# ---- approved code, its asset and its inputs ---------------------------------------------------------------------


def test_code_runs_only_approved_for_its_caller_on_its_asset_with_the_callers_inputs(site: Site) -> None:
    (rita_code,) = value_of(raw_call(site.rita, "code.get_by_service_func_name", site.function))
    eve_upload = _upload(site.eve, {"round": 0, "attempt": 0})

    answers = {
        "eve calls rita's code": _call_approved(site, site.eve, site.eve_function, uid=rita_code.id),
        "unapproved": _call_approved(site, site.eve, site.eve_function),
        "other dataset": _call_approved(site, site.rita, site.function, data=site.asset(site.rita, "extra")),
        "eve's input": _call_approved(site, site.rita, site.function, message=eve_upload),
        "the asset as input": _call_approved(site, site.rita, site.function, stage=site.asset(site.rita)),
        "no inputs": raw_call(site.rita, "code.call", uid=rita_code.id, data=site.asset(site.rita)),
    }

    assert gate_refusal(answers["eve calls rita's code"], "site-a", "code.call") == \
        f"code {str(rita_code.id.no_dash)[:12]} is not yours"
    assert "has no Fedsite approval here for you" in gate_refusal(answers["unapproved"], "site-a", "code.call")
    assert gate_refusal(answers["other dataset"], "site-a", "code.call") == \
        "`data` must be the asset of dataset 'imdb' that the code was approved for"
    for name in ("eve's input", "the asset as input"):
        assert gate_refusal(answers[name], "site-a", "code.call").endswith("must be an object you uploaded"), name
    assert gate_refusal(answers["no inputs"], "site-a", "code.call") == "missing arguments ['stage', 'message']"
    assert site.worker.services.action.stash.exists(credentials=site.worker.verify_key, uid=eve_upload.id)


def test_submissions_other_than_the_canonical_function_are_refused(site: Site, tmp_path: Path) -> None:
    import syft as sy

    asset = site.asset(site.rita)

    class Anything(sy.CustomInputPolicy):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)

    def peek(data):  # type: ignore[no-untyped-def]
        return data

    answers = []
    with quiet():
        for policy in (sy.MixedInputPolicy(client=site.rita, data=asset), sy.ExactMatch(data=asset)):
            submission = sy.syft_function(input_policy=policy, output_policy=sy.SingleExecutionExactOutput())(peek)
            answers.append(raw_call(site.rita, "code.request_code_execution", submission))
    extra = submit_canonical_refusal(site, tmp_path)

    for answer in answers:
        assert gate_refusal(answer, "site-a", "code.request_code_execution").startswith(
            "only the canonical Fedsite round function may be submitted")
    assert extra == "`data` must be this site's asset of dataset 'imdb'"


def submit_canonical_refusal(site: Site, tmp_path: Path) -> str:
    """A canonical function for dataset imdb whose ``data`` is bound to the 'extra' asset instead."""
    from syft.types.errors import SyftException

    from researcher import federation

    original = federation.SiteHandle.asset

    def wrong_asset(handle: Any) -> Any:
        with quiet():
            return handle.client.datasets["extra"].assets["reviews"]

    federation.SiteHandle.asset = wrong_asset  # type: ignore[method-assign]
    try:
        submit_canonical(site.running, site.rita, tmp_path)
    except SyftException as exc:
        return str(exc).split("(the site's API gate): ", 1)[1]
    finally:
        federation.SiteHandle.asset = original  # type: ignore[method-assign]
    raise AssertionError("the mis-bound submission was accepted")


# ---- records and the account --------------------------------------------------------------------------------------


def test_records_and_links_are_the_callers_own(site: Site) -> None:
    from syft.service.code.user_code import UserCode
    from syft.service.code.user_code_service import UserCodeService
    from syft.service.user.user import User
    from syft.service.user.user_service import UserService
    from syft.store.linked_obj import LinkedObject

    (rita_code,) = value_of(raw_call(site.rita, "code.get_by_service_func_name", site.function))
    rita_user = value_of(raw_call(site.rita, "user.get_current_user"))
    user_link = LinkedObject(server_uid=site.worker.id, service_type=UserService, object_type=User,
                             object_uid=rita_user.id)
    code_link = LinkedObject(server_uid=site.worker.id, service_type=UserCodeService, object_type=UserCode,
                             object_uid=rita_code.id)

    assert gate_refusal(raw_call(site.eve, "notifications.resolve_object", user_link), "site-a",
                        "notifications.resolve_object") == "only the code of your own request and its status may be resolved"
    assert gate_refusal(raw_call(site.eve, "notifications.resolve_object", code_link), "site-a",
                        "notifications.resolve_object") == f"code {str(rita_code.id.no_dash)[:12]} is not yours"
    assert value_of(raw_call(site.rita, "notifications.resolve_object", code_link)).id == rita_code.id
    assert value_of(raw_call(site.eve, "code.get_by_service_func_name", site.function)) == []
    requests = value_of(raw_call(site.eve, "request.get_all"))
    assert requests and {r.requesting_user_email for r in requests} == {EVE}


def test_a_researcher_changes_only_its_password_and_only_to_a_strong_one(site: Site) -> None:
    from syft.server.credentials import SyftSigningKey
    from syft.service.user.user import UserUpdate

    me = value_of(raw_call(site.eve, "user.get_current_user"))
    changes = {
        "email": UserUpdate(email="Eve@uni.org"),
        "key": UserUpdate(verify_key=SyftSigningKey.generate().verify_key),
        "name": UserUpdate(name="Mallory"),
        "weak": UserUpdate(password="short"),
    }

    reasons = {name: gate_refusal(raw_call(site.eve, "user.update", uid=me.id, user_update=update), "site-a",
                                  "user.update") for name, update in changes.items()}
    other = raw_call(site.eve, "user.update", uid=value_of(raw_call(site.rita, "user.get_current_user")).id,
                     user_update=UserUpdate(password="Strong-Pass-2026!"))
    strong = raw_call(site.eve, "user.update", uid=me.id,
                      user_update=UserUpdate(password="Another-Strong-2026!"))

    assert reasons["email"] == "a researcher may change only its password here, not ['email'] (e-mail, name, role " \
                               "and keys are fixed by the site's admin)"
    assert "not ['verify_key']" in reasons["key"] and "not ['name']" in reasons["name"]
    assert reasons["weak"].startswith("new password is too weak")
    assert gate_refusal(other, "site-a", "user.update") == "a researcher may update only its own account"
    value_of(strong)
    assert site.running.login(email=EVE, password="Another-Strong-2026!") is not None
    assert value_of(raw_call(site.eve, "user.get_current_user")).email == EVE


# ---- the guard's clean-up -----------------------------------------------------------------------------------------


def test_the_guard_deletes_only_inputs_the_caller_owns(site: Site) -> None:
    from syft.service.context import AuthedServiceContext
    from syft.service.user.user_roles import ServiceRole

    from datasites.guard import discard_call_inputs

    eve_object, rita_object = _upload(site.eve, "eve's"), _upload(site.rita, "rita's")
    action = site.worker.services.action
    context = AuthedServiceContext(server=site.worker, credentials=site.rita.api.signing_key.verify_key,
                                   role=ServiceRole.DATA_SCIENTIST)

    discard_call_inputs(action, context, {"stage": eve_object.id, "message": rita_object.id})

    assert action.stash.exists(credentials=site.worker.verify_key, uid=eve_object.id)
    assert not action.stash.exists(credentials=site.worker.verify_key, uid=rita_object.id)
    assert action.stash.exists(credentials=site.worker.verify_key, uid=site.asset(site.rita).action_id)


def test_the_unauthenticated_api_route_lists_no_researchers_functions_for_an_owners_key(site: Site) -> None:
    # syft answers GET /api?verify_key=K without a signature; the root key is public in the site's metadata
    protocol = site.worker.current_protocol

    owners_api = site.worker.get_api(for_user=site.worker.verify_key, communication_protocol=protocol)
    ritas_api = site.worker.get_api(for_user=site.rita.api.signing_key.verify_key, communication_protocol=protocol)
    eves_api = site.worker.get_api(for_user=site.eve.api.signing_key.verify_key, communication_protocol=protocol)

    assert not [path for path in owners_api.endpoints if path.startswith("code.call_")]
    assert [p for p in ritas_api.endpoints if p.startswith("code.call_")] == [f"code.call_{site.function}"]
    assert [p for p in eves_api.endpoints if p.startswith("code.call_")] == [f"code.call_{site.eve_function}"]


def test_dataset_listings_do_not_carry_the_private_partitions_size(site: Site) -> None:
    admin = site.running.login(email=site.running.meta.admin_email, password=ADMIN_PASSWORD)
    with quiet():
        admin_sizes = {d.name: d.mb_size for d in admin.datasets.get_all()}

    seen = {d.name: d.mb_size for d in value_of(raw_call(site.rita, "dataset.get_all"))}

    assert all(size and size > 0 for size in admin_sizes.values())  # syft computed it from the private data
    assert seen == {"imdb": None, "extra": None}


def test_refusals_record_no_callers_text_and_keys_without_an_account_write_nothing(site: Site) -> None:
    from syft.server.credentials import SyftSigningKey

    before = len(site.refusals())
    escape_path = "\x1b[2J\x1b[H" + "x" * 5000

    by_rita = raw_call(site.rita, escape_path)
    strangers = [raw_call(site.rita, "dataset.get_all", signer=SyftSigningKey.generate()) for _ in range(5)]

    assert refusal(by_rita) == f"site-a: refused: <malformed path> (the site's API gate): {NOT_ALLOWED}"
    assert all(refusal(s).endswith("this key has no account here: log in with the account the site's admin created "
                                   "for you") for s in strangers)
    recorded = site.refusals()[before:]
    assert [(r["path"], r["caller_email"]) for r in recorded] == [("<malformed path>", RITA)]


def test_a_refusal_quotes_no_more_than_a_few_hundred_characters_of_the_callers_text(site: Site) -> None:
    before = len(site.refusals())

    answer = raw_call(site.rita, "user.get_current_user", **{"x" * 1_000_000: 1})

    reason = gate_refusal(answer, "site-a", "user.get_current_user")
    assert reason.startswith("unexpected arguments ['xxx") and reason.endswith("more characters)")
    assert len(reason) < 400
    (recorded,) = site.refusals()[before:]
    assert len(recorded["reason"]) < 500
