"""An in-process datasite: upload, researcher access and its refusals, restart, bootstrap security."""

from __future__ import annotations

import contextlib
import io
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from datasites.admin import add_researcher, render_budgets, upload_partition
from datasites.errors import FedsiteError
from datasites.gate import is_gate_installed
from datasites.guard import is_guard_installed
from datasites.mock import PUBLIC_MOCK_ROWS
from datasites.server import InProcessSite, launch_in_process, login, quiet
from datasites.syft_speedups import attach_attributes, syft_walk
from policies.audit import AuditLog
from policies.budget import PrivacyBudget
from policies.fingerprint import partition_fingerprint
from tests.canonical import approve_by_hand, researcher_id, submit_canonical
from tests.conftest import ADMIN_PASSWORD, RESEARCHER_PASSWORD

pytestmark = pytest.mark.integration

RESEARCHER = "rita@uni.org"


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("site-a")


@pytest.fixture(scope="module")
def private(imdb_train: pd.DataFrame) -> pd.DataFrame:
    return imdb_train.sample(300, random_state=3).reset_index(drop=True)


@pytest.fixture(scope="module")
def site(site_dir: Path, private: pd.DataFrame) -> Iterator[InProcessSite]:
    running = launch_in_process(site_dir, admin_password=ADMIN_PASSWORD, name="site-a")
    admin = running.login(email=running.meta.admin_email, password=ADMIN_PASSWORD)
    upload_partition(admin, running.site, dataset="imdb", reviews=private,
                     budget=PrivacyBudget(epsilon=8.0, delta=1e-5))
    add_researcher(admin, name="Rita Researcher", email=RESEARCHER, password=RESEARCHER_PASSWORD)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def researcher(site: InProcessSite) -> Any:
    return site.login(email=RESEARCHER, password=RESEARCHER_PASSWORD)


def _asset(client: Any) -> Any:
    with quiet():
        return client.datasets["imdb"].assets["reviews"]


def test_researcher_sees_the_mock_twin_not_the_private_data(researcher: Any, private: pd.DataFrame) -> None:
    mock = _asset(researcher).mock

    assert list(mock.columns) == ["text", "label"]
    assert len(mock) == PUBLIC_MOCK_ROWS  # public defaults: the partition's size (300) does not show
    assert not set(mock["text"]) & set(private["text"])


def test_every_way_of_reading_the_private_asset_is_refused(researcher: Any, private: pd.DataFrame) -> None:
    from syft.types.errors import SyftException

    asset = _asset(researcher)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        data = asset.data
    assert data is None
    assert "You have no access to the private data" in printed.getvalue()
    with pytest.raises(SyftException, match=r"^site-a: refused: action.get_pointer \(the site's API gate\): not on"):
        asset.pointer.get()
    with pytest.raises(SyftException, match=r"^site-a: refused: action.get \(the site's API gate\): only the output "
                                            "of your own authorised call"):
        researcher.api.services.action.get(asset.action_id)
    with pytest.raises(AttributeError, match="you may not have permission"):
        researcher.api.services.user.get_all()  # nor list the site's users


def test_admin_reads_the_private_data_and_the_site_records_its_fingerprint(
    site: InProcessSite, private: pd.DataFrame
) -> None:
    admin = site.login(email=site.meta.admin_email, password=ADMIN_PASSWORD)

    with quiet():
        data = admin.datasets["imdb"].assets["reviews"].data

    assert data["text"].tolist() == private["text"].tolist()
    facts = site.site.dataset_facts("imdb")
    assert facts["n_records"] == 300
    assert facts["fingerprint"] == partition_fingerprint(private["text"], private["label"])


def test_unapproved_code_does_not_run_on_private_data(site: InProcessSite, researcher: Any, tmp_path: Path) -> None:
    import syft as sy
    from syft.types.errors import SyftException

    asset = _asset(researcher)

    @sy.syft_function_single_use(data=asset)
    def peek(data):  # type: ignore[no-untyped-def]
        return data["text"].tolist()

    with quiet(), pytest.raises(SyftException, match=r"^site-a: refused: code.request_code_execution \(the site's "
                                                     r"API gate\): only the canonical Fedsite round function"):
        researcher.code.request_code_execution(peek)
    name = submit_canonical(site, researcher, tmp_path)

    message = _call(researcher, name, asset)

    assert re.match(r"^site-a: refused: code.call \(the site's API gate\): code [0-9a-f]{12} has no Fedsite "
                    r"approval here for you", message), message


def _call(researcher: Any, name: str, asset: Any) -> str:
    with quiet():
        try:
            outcome: Any = getattr(researcher.code, name)(data=asset, stage="advertise_keys",
                                                          message={"round": 0, "attempt": 0})
        except Exception as exc:  # noqa: BLE001 - the researcher's view, raised or returned
            outcome = exc
    return str(outcome)


def test_syft_approval_alone_does_not_let_code_run(site: InProcessSite, researcher: Any, tmp_path: Path) -> None:
    from syft.service.context import AuthedServiceContext
    from syft.service.user.user_roles import ServiceRole
    from syft.types.errors import SyftException

    asset = _asset(researcher)
    name = submit_canonical(site, researcher, tmp_path)
    admin = site.login(email=site.meta.admin_email, password=ADMIN_PASSWORD)
    with quiet():
        request = next(r for r in admin.requests if r.code.service_func_name == name)
        request.approve()
        code = site.worker.services.user_code.stash.get_by_uid(site.worker.verify_key, uid=request.code.id).unwrap()

    message = _call(researcher, name, asset)
    # Behind the gate, the execution guard refuses too (a second line: the gate is bypassed here on purpose)
    context = AuthedServiceContext(server=site.worker, credentials=researcher.verify_key, role=ServiceRole.DATA_SCIENTIST)
    with pytest.raises(SyftException, match=r"^site-a: refused: code [0-9a-f]{12} has no Fedsite approval for "
                                            r"rita@uni.org \(id [0-9a-f]{32}\)"):
        site.worker.services.action._user_code_execute(context, code, {}).unwrap()

    assert is_guard_installed()
    assert "site-a: refused: code.call (the site's API gate)" in message and "has no Fedsite approval here" in message
    events = AuditLog(site.site.path).events()
    assert any(e.kind == "api_call_refused" and e.to_record()["path"] == "code.call" for e in events)
    assert any(e.kind == "execution_refused" and e.to_record()["researcher"] == researcher_id(site, RESEARCHER) for e in events)


def test_a_failing_approved_function_leaks_no_traceback_to_the_researcher(
    site: InProcessSite, researcher: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from policies import site_runtime

    asset = _asset(researcher)
    name = submit_canonical(site, researcher, tmp_path)
    approve_by_hand(site, name, email=RESEARCHER)

    def explode(data: Any, **kwargs: Any) -> Any:  # a bug in the runtime that reads private text
        raise ValueError("PRIVATE:" + data["text"].iloc[0][:40])

    monkeypatch.setattr(site_runtime, "run_stage", explode)  # the approved function imports it at call time

    message = _call(researcher, name, asset)

    assert "contact the Server Admin" in message
    assert "PRIVATE:" not in message and "Traceback" not in message
    assert site.worker.dev_mode is False


@pytest.mark.parametrize("failure", ["unexpected", "refusal"])
def test_an_unexpected_failure_in_a_syft_service_reaches_the_site_log_not_the_researcher(
    site: InProcessSite, researcher: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    failure: str,
) -> None:
    from syft.types.errors import SyftException

    # Prepare: the site's code service fails as syft would on a bug (or refuses, as the guard does)
    def broken_lookup(context: Any, *args: Any, **kwargs: Any) -> Any:
        if failure == "refusal":
            raise SyftException(public_message="refused: not today")
        raise AttributeError("'NoneType' object has no attribute 'PRIVATE_DETAIL'")

    # syft looks the method up on the service object at every call (code.get_by_service_func_name)
    monkeypatch.setattr(site.worker.services.user_code, "get_by_service_name", broken_lookup)

    # Execute: a researcher's call
    with caplog.at_level(logging.DEBUG), quiet():
        try:
            answer: Any = researcher.api.services.code.get_by_service_func_name("fedsite_run_0123456789ab")
        except Exception as exc:  # noqa: BLE001 - the researcher's view, raised or returned
            answer = exc

    # Assert: the researcher learns only the exception's type (or the refusal's own message); an unexpected
    # failure is in the site's log at ERROR, with the site's name and the whole traceback
    relayed = [r for r in caplog.records if r.name == "fedsite.site"]
    assert not [r for r in caplog.records if r.name.startswith("syft")]  # syft's own records stay silent
    if failure == "refusal":
        assert "refused: not today" in str(answer)
        assert relayed == []
        return
    assert "Something unexpected happened server side" in str(answer) and "PRIVATE_DETAIL" not in str(answer)
    (record,) = relayed
    assert record.levelno == logging.ERROR
    assert record.getMessage().startswith("site-a: a syft service call failed with AttributeError")
    assert record.exc_info is not None and "PRIVATE_DETAIL" in str(record.exc_info[1])
    assert "broken_lookup" in logging.Formatter().formatException(record.exc_info)


def test_guest_signup_is_off_and_default_credentials_do_not_exist(site: InProcessSite) -> None:
    from syft.types.errors import SyftException

    with pytest.raises(FedsiteError, match="login refused for info@openmined.org"):
        site.login(email="info@openmined.org", password="changethis")
    with quiet(), pytest.raises(SyftException, match="no permission to create an account"):
        site.handle.register(name="Eve", email="eve@evil.org", password="Eve-pass-2026!!", password_verify="Eve-pass-2026!!")
    assert site.worker.settings.signup_enabled is False


def test_wrong_password_is_one_clear_error(site: InProcessSite) -> None:
    with pytest.raises(FedsiteError, match=r"^login refused for rita@uni.org: wrong email or password$"):
        login(site.handle, email=RESEARCHER, password="Not-her-password-1")


def test_admin_rejects_bad_researchers_and_duplicate_datasets(site: InProcessSite, private: pd.DataFrame) -> None:
    admin = site.login(email=site.meta.admin_email, password=ADMIN_PASSWORD)

    with pytest.raises(FedsiteError, match=r"a user rita@uni.org already exists on this site"):
        add_researcher(admin, name="Rita", email=RESEARCHER, password=RESEARCHER_PASSWORD)
    with pytest.raises(FedsiteError, match=r"researcher password is too weak"):
        add_researcher(admin, name="Bob", email="bob@uni.org", password="bob")
    with pytest.raises(FedsiteError, match=r"dataset 'imdb' already exists on this site"):
        upload_partition(admin, site.site, dataset="imdb", reviews=private, budget=PrivacyBudget(epsilon=1, delta=1e-5))
    with pytest.raises(FedsiteError, match=r"delta=0.01 is not below 1/n_records"):
        upload_partition(admin, site.site, dataset="other", reviews=private, budget=PrivacyBudget(epsilon=1, delta=0.01))
    with quiet():
        assert [d.name for d in admin.datasets.get_all()] == ["imdb"]


def test_a_second_process_cannot_open_a_served_data_dir(site: InProcessSite, site_dir: Path) -> None:
    with pytest.raises(FedsiteError, match=r"already served by another process"):
        launch_in_process(site_dir, admin_password=ADMIN_PASSWORD)


def test_launching_a_site_installs_the_syft_speedups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import syft.service.service as service_module
    import syft.types.syft_object as syft_object_module

    original = syft_walk()
    assert original.__module__ == "syft.types.syft_object"
    monkeypatch.setattr(service_module, "attach_attribute_to_syft_object", original)  # undo earlier sites' install
    monkeypatch.setattr(syft_object_module, "attach_attribute_to_syft_object", original)

    running = launch_in_process(tmp_path, admin_password=ADMIN_PASSWORD, name="site-s")
    running.stop()

    assert service_module.attach_attribute_to_syft_object is attach_attributes
    assert is_gate_installed() and is_guard_installed()


def test_a_site_does_not_start_under_another_syft_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The patches (the gate among them) are installed on the way to every start, after the version check."""
    from policies import syft_patches

    monkeypatch.setattr(syft_patches, "_state", syft_patches._State())  # a process that has not checked yet
    monkeypatch.setattr(syft_patches.metadata, "version", lambda name: "0.9.6")

    with pytest.raises(syft_patches.SyftVersionError, match=r"^syft 0\.9\.6 is installed, but Fedsite's patches to "
                                                             r"syft were written for syft 0\.9\.5"):
        launch_in_process(tmp_path, admin_password=ADMIN_PASSWORD, name="site-v")


def test_restart_keeps_datasets_users_and_budget(tmp_path: Path, private: pd.DataFrame) -> None:
    first = launch_in_process(tmp_path, admin_password=ADMIN_PASSWORD, name="site-r")
    admin = first.login(email=first.meta.admin_email, password=ADMIN_PASSWORD)
    upload_partition(admin, first.site, dataset="imdb", reviews=private.head(50),
                     budget=PrivacyBudget(epsilon=3.0, delta=1e-5))
    add_researcher(admin, name="Rita", email=RESEARCHER, password=RESEARCHER_PASSWORD)
    first.stop()

    with pytest.raises(FedsiteError, match=r"admin password does not match the one site 'site-r' was created with"):
        launch_in_process(tmp_path, admin_password="Another-Admin-Pw-1")
    second = launch_in_process(tmp_path, admin_password=ADMIN_PASSWORD)
    try:
        researcher = second.login(email=RESEARCHER, password=RESEARCHER_PASSWORD)
        assert len(_asset(researcher).mock) == PUBLIC_MOCK_ROWS
        assert "imdb                           3      1e-05         50" in render_budgets(second.site)
    finally:
        second.stop()


def test_per_call_inputs_do_not_accumulate_in_blob_storage(
    site: InProcessSite, researcher: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from policies import site_runtime

    asset = _asset(researcher)
    name = submit_canonical(site, researcher, tmp_path)
    approve_by_hand(site, name, email=RESEARCHER)
    # the runtime answers the size of what it was sent (the approved function imports it at call time)
    monkeypatch.setattr(site_runtime, "run_stage", lambda data, *, message, **kwargs: {"size": len(message["blob"])})
    blob_dir = site.site.syft_dir / "blob"
    big = "x" * 3_000_000  # a global model's worth: syft stores it as a blob file

    def blob_bytes() -> int:
        return sum(p.stat().st_size for p in blob_dir.rglob("*") if p.is_file())

    before = blob_bytes()
    sizes = []
    for _ in range(3):
        with quiet():
            reply = getattr(researcher.code, name)(data=asset, stage="mask_input", message={"blob": big}).get()
        sizes.append(reply["size"])

    assert sizes == [3_000_000] * 3
    assert blob_bytes() - before < 1_000_000
