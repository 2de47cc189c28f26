"""`fedsite admin identity | ledger | audit` on a data dir, and the admin commands' argument errors."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from datasites.sitedir import SiteDir
from fedsite import cli
from fedsite.cli import main
from policies import durable
from policies.accounting import PrivacyEvent, epsilon_of
from policies.audit import AuditLog, ExecutionAuthorised, PrivacySpent, RequestApproved, RequestDenied
from policies.budget import BudgetBook, PrivacyBudget
from policies.durable import JournalEntry, sha256_hex, site_journal
from policies.ledger import PrivacyLedger

pytestmark = pytest.mark.unit

ADMIN = "admin@site-a.fedsite.org"
RESEARCHER = "rita@uni.org"
RESEARCHER_ID = "7d0c5e2b9a4f4c1e8b3a6d9f0e2c4a17"  # rita's syft user id: the key of her ledgers and approvals
REQUEST = {"request_id": "0123456789abcdef0123456789abcdef", "code_hash": sha256_hex("def f(): ...\n"),
           "researcher": RESEARCHER_ID, "researcher_email": RESEARCHER, "dataset": "imdb"}
ROUND = {"noise_multiplier": 1.0, "sample_rate": 0.032, "steps": 2, "run_id": "run-00112233"}


@pytest.fixture()
def site(tmp_path: Path) -> SiteDir:
    site = SiteDir(tmp_path / "site-a")
    site.create(name="site-a", admin_email=ADMIN)
    BudgetBook(site.path).set("imdb", PrivacyBudget(epsilon=8.0, delta=1e-5), n_records=500)
    return site


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def spend_rounds(site: SiteDir, rounds: int) -> PrivacyLedger:
    ledger = PrivacyLedger(site.path, "imdb", RESEARCHER_ID, site="site-a")
    for index in range(rounds):
        ledger.spend(PrivacyEvent(**ROUND, round_index=index))
    return ledger


def record_review_events(site: SiteDir) -> AuditLog:
    log = AuditLog(site.path)
    log.record(RequestApproved(**REQUEST, plan_digest=sha256_hex("plan"), admin=ADMIN))
    log.record(ExecutionAuthorised(**REQUEST, round=0))
    log.record(PrivacySpent(request_id=REQUEST["request_id"], dataset="imdb", researcher=RESEARCHER_ID, epsilon=0.25,
                            delta=1e-6, round=0))
    log.record(RequestDenied(**REQUEST, admin=ADMIN, reason="reads the network"))
    return log


def edit_line(path: Path, number: int, old: str, new: str) -> None:
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    assert old in lines[number - 1]
    lines[number - 1] = lines[number - 1].replace(old, new)
    path.write_text("".join(lines), encoding="utf-8")


def assert_one_line_error(code: int, err: str, message: str) -> None:
    assert code == 2
    assert err.startswith("fedsite: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1, err


# --- identity and ledger ------------------------------------------------------------------------


def test_identity_prints_the_site_name_and_the_key_to_pin(site: SiteDir, capsys: pytest.CaptureFixture[str]) -> None:
    # Execute
    code, out, _ = run(capsys, "admin", "identity", "--data-dir", str(site.path))

    # Assert
    key = site.identity_public_hex()
    assert code == 0
    assert out.splitlines() == ["site site-a", f"identity key (Ed25519 public, hex): {key}",
                                f'roster entry: ["site-a", "{key}"]']


def record_approval(site: SiteDir) -> None:
    from policies.approvals import Approval, ApprovalRegistry

    ApprovalRegistry(site.path).record(Approval(
        request_id="ab" * 16, code_hash="c" * 64, researcher=RESEARCHER_ID, researcher_email=RESEARCHER,
        dataset="imdb", plan={"run_id": "run-0123456789ab"}, calibrated={}, admin=ADMIN,
        approved_at="2026-11-26T00:00:00+00:00"))


def test_ledger_shows_spent_epsilon_budget_and_records(site: SiteDir, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    spend_rounds(site, 2)
    record_approval(site)

    # Execute
    code, out, _ = run(capsys, "admin", "ledger", "--data-dir", str(site.path))

    # Assert
    spent = epsilon_of([(1.0, 0.032, 2), (1.0, 0.032, 2)], delta=1e-5, accountant="prv")
    assert code == 0
    assert out.splitlines()[-1].split() == ["imdb", RESEARCHER_ID, RESEARCHER, "2", f"{spent:.4f}", "8"]


def test_ledger_of_a_researcher_without_an_approval_shows_no_email(site: SiteDir,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    spend_rounds(site, 1)

    # Execute
    code, out, _ = run(capsys, "admin", "ledger", "--data-dir", str(site.path))

    # Assert
    spent = epsilon_of([(1.0, 0.032, 2)], delta=1e-5, accountant="prv")
    assert code == 0
    assert out.splitlines()[-1].split() == ["imdb", RESEARCHER_ID, "?", "1", f"{spent:.4f}", "8"]


def test_ledger_of_a_site_that_spent_nothing(site: SiteDir, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "admin", "ledger", "--data-dir", str(site.path))

    assert (code, out) == (0, "site site-a: no privacy spent yet\n")


# --- audit ----------------------------------------------------------------------------------------


def test_audit_lists_every_event_with_kind_round_and_key_fields(site: SiteDir,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    record_review_events(site)

    # Execute
    code, out, _ = run(capsys, "admin", "audit", "--data-dir", str(site.path))

    # Assert
    rows = out.splitlines()[1:]
    assert code == 0
    assert [row.split()[2:4] for row in rows] == [["request_approved", "-"], ["execution_authorised", "0"],
                                                  ["privacy_spent", "0"], ["request_denied", "-"]]
    assert f"request_id=0123456789ab researcher={RESEARCHER_ID} dataset=imdb admin={ADMIN}" in rows[0]
    assert "epsilon=0.25 delta=1e-06" in rows[2]
    assert rows[3].endswith("reason=reads the network")


def test_audit_verify_checks_the_log_the_approvals_and_replays_the_ledgers(
        site: SiteDir, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    log = record_review_events(site)
    spend_rounds(site, 1)

    # Execute
    code, out, _ = run(capsys, "admin", "audit", "--data-dir", str(site.path), "--verify")

    # Assert
    head = log.head()
    spent = epsilon_of([(1.0, 0.032, 2)], delta=1e-5, accountant="prv")
    assert code == 0
    assert f"4 entries, chain intact, head {head.last_hash}" in out
    assert "approvals journal" in out and "0 entries, chain intact" in out
    assert f"privacy ledger imdb / {RESEARCHER_ID}: 1 records replayed, spent epsilon {spent:.4f} of budget 8" in out
    assert out.splitlines()[-1] == f"write down this anchor: --anchor 4:{head.last_hash}"


def test_audit_verify_accepts_the_anchor_it_printed(site: SiteDir, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    log = record_review_events(site)
    head = log.head()
    _, first, _ = run(capsys, "admin", "audit", "--data-dir", str(site.path), "--verify")
    anchor = first.splitlines()[-1].removeprefix("write down this anchor: --anchor ")
    log.record(ExecutionAuthorised(**REQUEST, round=1))

    # Execute
    code, out, err = run(capsys, "admin", "audit", "--data-dir", str(site.path), "--verify", "--anchor", anchor)

    # Assert
    assert (code, err) == (0, "")
    assert anchor == f"4:{head.last_hash}"
    assert f"matches anchor (4, {head.last_hash})" in out
    assert "5 entries, chain intact" in out


def test_audit_verify_names_the_line_that_was_edited(site: SiteDir, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    log = record_review_events(site)
    edit_line(log.path, 4, "reads the network", "looked fine")

    # Execute
    code, out, err = run(capsys, "admin", "audit", "--data-dir", str(site.path), "--verify")

    # Assert
    assert_one_line_error(code, err, f"{log.path}: line 4 was modified after it was written, or written without "
                                     "this site's journal key (MAC mismatch)")
    assert out == ""


def test_audit_verify_detects_lines_removed_from_the_end(site: SiteDir, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    log = record_review_events(site)
    lines = log.path.read_text(encoding="utf-8").splitlines(keepends=True)
    log.path.write_text("".join(lines[:2]), encoding="utf-8")

    # Execute: no anchor needed, the head file remembers 4 entries
    code, _, err = run(capsys, "admin", "audit", "--data-dir", str(site.path), "--verify")

    # Assert
    assert_one_line_error(code, err, "has 2 entries but its head file records 4: its last entries were removed")


def test_audit_verify_detects_a_rollback_of_log_and_head_by_the_anchor(
        site: SiteDir, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: copies of log and head after 2 events, 2 more events, the copies restored, the site restarted
    log = AuditLog(site.path)
    log.record(RequestApproved(**REQUEST, plan_digest=sha256_hex("plan"), admin=ADMIN))
    log.record(ExecutionAuthorised(**REQUEST, round=0))
    head_path = log.path.with_name(log.path.name + ".head")
    saved = log.path.read_bytes(), head_path.read_bytes()
    log.record(ExecutionAuthorised(**REQUEST, round=1))
    log.record(ExecutionAuthorised(**REQUEST, round=2))
    anchor = f"{log.head().n_entries}:{log.head().last_hash}"
    log.path.write_bytes(saved[0])
    head_path.write_bytes(saved[1])
    monkeypatch.setattr(durable, "_seen_heads", {})

    # Execute
    code, _, err = run(capsys, "admin", "audit", "--data-dir", str(site.path), "--verify", "--anchor", anchor)

    # Assert
    assert_one_line_error(code, err, "has 2 entries but the anchor has 4: entries were removed from the end")


def test_audit_verify_detects_an_edited_ledger(site: SiteDir, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    ledger = spend_rounds(site, 2)
    edit_line(ledger.path, 2, '"steps":2', '"steps":1')

    # Execute
    code, _, err = run(capsys, "admin", "audit", "--data-dir", str(site.path), "--verify")

    # Assert
    assert_one_line_error(code, err, f"privacy ledger {ledger.path} failed verification: {ledger.path}: line 2 "
                                     "was modified after it was written")


def test_audit_verify_replays_a_rechained_ledger_with_a_forged_epsilon(
        site: SiteDir, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: someone holding the journal key rewrites the ledger with a lower epsilon_after and an intact chain
    spend_rounds(site, 1)
    journal = site_journal(site.path, f"ledger/imdb/{RESEARCHER_ID}.jsonl")
    record = dict(journal.entries()[0].record)
    journal.rewrite([{**record, "epsilon_after": 0.01}])

    # Execute
    code, _, err = run(capsys, "admin", "audit", "--data-dir", str(site.path), "--verify")

    # Assert
    assert_one_line_error(code, err, "record 0 stores epsilon_after=0.01 but its events compose to")


def test_audit_verify_refuses_a_ledger_rechained_without_the_key(
        site: SiteDir, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: a forger reuses the real genesis but seals a refund under a key of its own
    ledger = spend_rounds(site, 1)
    first = ledger.journal.entries()[0]
    forged = JournalEntry.seal(b"f" * 32, 0, first.prev, {**first.record, "epsilon_after": 0.01})
    ledger.path.write_text(forged.to_line() + "\n")

    # Execute
    code, _, err = run(capsys, "admin", "audit", "--data-dir", str(site.path), "--verify")

    # Assert
    assert_one_line_error(code, err, f"privacy ledger {ledger.path} failed verification: {ledger.path}: line 1 was "
                                     "modified after it was written, or written without this site's journal key "
                                     "(MAC mismatch)")


def test_audit_verify_detects_an_edited_approvals_journal(site: SiteDir, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    journal = site_journal(site.path, "approvals.jsonl")
    journal.append({"kind": "revocation", "code_hash": REQUEST["code_hash"], "reason": "leaks", "admin": ADMIN})
    edit_line(journal.path, 1, "leaks", "fine")

    # Execute
    code, _, err = run(capsys, "admin", "audit", "--data-dir", str(site.path), "--verify")

    # Assert
    assert_one_line_error(code, err, "approvals journal failed verification: ")
    assert "line 1 was modified after it was written" in err


# --- argument errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "message"), [
    (["--verify", "--anchor", "4"], "--anchor '4' is not N:HASH"),
    (["--verify", "--anchor", "x:" + "a" * 64], "is not N:HASH"),
    (["--verify", "--anchor", "4:" + "A" * 64], "is not N:HASH"),
    (["--anchor", "4:" + "a" * 64], "--anchor is checked only by --verify: pass both"),
])
def test_audit_refuses_a_bad_anchor(site: SiteDir, capsys: pytest.CaptureFixture[str], argv: list[str],
                                    message: str) -> None:
    code, _, err = run(capsys, "admin", "audit", "--data-dir", str(site.path), *argv)

    assert_one_line_error(code, err, message)


@pytest.mark.parametrize("command", ["identity", "ledger", "audit"])
def test_offline_commands_refuse_a_missing_data_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    command: str) -> None:
    code, _, err = run(capsys, "admin", command, "--data-dir", str(tmp_path / "nowhere"))

    assert_one_line_error(code, err, "does not exist: start the site once with")


@pytest.mark.parametrize(("argv", "message"), [
    (["show", "abc12"], "request id 'abc12' must be at least 6 hex digits"),
    (["approve", "run-0011aa"], "request id 'run-0011aa' must be at least 6 hex digits"),
    (["deny", "zzzzzzzz", "--reason", "no"], "request id 'zzzzzzzz' must be at least 6 hex digits"),
])
def test_a_malformed_request_id_is_refused_before_connecting(site: SiteDir, capsys: pytest.CaptureFixture[str],
                                                             argv: list[str], message: str) -> None:
    code, _, err = run(capsys, "admin", *argv, "--data-dir", str(site.path))

    assert_one_line_error(code, err, message)


def test_review_commands_need_the_site_running(site: SiteDir, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDSITE_ADMIN_PASSWORD", "Site-admin-Pw-2026!")

    code, _, err = run(capsys, "admin", "requests", "--data-dir", str(site.path))

    assert_one_line_error(code, err, "site 'site-a' is not running: start it with `fedsite serve --data-dir")


def test_deny_without_a_reason_is_a_usage_error(site: SiteDir, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["admin", "deny", "0123456789", "--data-dir", str(site.path)])

    assert exited.value.code == 2
    assert "the following arguments are required: --reason" in capsys.readouterr().err


def _fake_request(request_id: str, status: str) -> Any:
    return SimpleNamespace(id=SimpleNamespace(no_dash=request_id), code=SimpleNamespace(service_func_name="f"),
                           requesting_user_verify_key="rita-verify-key", status=f"RequestStatus.{status}")


def _fake_users() -> Any:
    """syft's user service as the review queue asks it: verify key -> the user (id and e-mail)."""
    rita = SimpleNamespace(id=SimpleNamespace(no_dash=RESEARCHER_ID), email=RESEARCHER)
    return SimpleNamespace(get_by_verify_key={"rita-verify-key": rita}.__getitem__)


def _serve_fake_requests(monkeypatch: pytest.MonkeyPatch, site: SiteDir, *requests: Any) -> None:
    client = SimpleNamespace(requests=list(requests), api=SimpleNamespace(services=SimpleNamespace(user=_fake_users())))
    monkeypatch.setattr(cli, "_admin_client", lambda args: (site, client))


def test_requests_lists_each_request_with_the_researcher_id(site: SiteDir, capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    _serve_fake_requests(monkeypatch, site, _fake_request("abcdef01" + "0" * 24, "PENDING"))

    # Execute
    code, out, _ = run(capsys, "admin", "requests", "--data-dir", str(site.path))

    # Assert
    assert code == 0
    assert out.splitlines()[-1].split() == ["abcdef010000", "f", RESEARCHER, RESEARCHER_ID[:12], "pending"]


def test_an_ambiguous_prefix_names_every_match(site: SiteDir, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    first, second = "abcdef01" + "0" * 24, "abcdef02" + "1" * 24
    _serve_fake_requests(monkeypatch, site, _fake_request(first, "PENDING"), _fake_request(second, "PENDING"))

    # Execute
    code, _, err = run(capsys, "admin", "approve", "ABCDEF", "--data-dir", str(site.path))

    # Assert
    assert_one_line_error(code, err, f"request id 'abcdef' is ambiguous, it matches 2 requests ({first}, {second})")


def test_a_decided_request_is_not_decided_again(site: SiteDir, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    _serve_fake_requests(monkeypatch, site, _fake_request("abcdef01" + "0" * 24, "APPROVED"))

    # Execute
    code, _, err = run(capsys, "admin", "deny", "abcdef01", "--reason", "changed my mind", "--data-dir",
                       str(site.path))

    # Assert
    assert_one_line_error(code, err, "request abcdef010000 is already approved: only pending requests")
    assert not AuditLog(site.path).path.exists()


def test_an_unknown_request_id_is_refused(site: SiteDir, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _serve_fake_requests(monkeypatch, site, _fake_request("abcdef01" + "0" * 24, "PENDING"))

    code, _, err = run(capsys, "admin", "show", "fedcba98", "--data-dir", str(site.path))

    assert_one_line_error(code, err, "no request 'fedcba98' on this site: list them with `fedsite admin requests`")



def test_revoke_stops_an_approved_request_and_is_audited(site: SiteDir, capsys: pytest.CaptureFixture[str]) -> None:
    from policies.approvals import Approval, ApprovalRegistry

    registry = ApprovalRegistry(site.path)
    registry.record(Approval(request_id="ab" * 16, code_hash="c" * 64, researcher=RESEARCHER_ID,
                             researcher_email=RESEARCHER, dataset="imdb", plan={"run_id": "run-0123456789ab"},
                             calibrated={}, admin="admin@x.org", approved_at="2026-11-26T00:00:00+00:00"))

    code, out, _ = run(capsys, "admin", "revoke", "ababab", "--reason", "plan changed", "--data-dir", str(site.path))

    assert code == 0
    assert f"revoked the approval of request abababababab (run run-0123456789ab) from {RESEARCHER_ID}" in out
    assert registry.find("c" * 64, researcher=RESEARCHER_ID) is None
    events = AuditLog(site.path).events()
    assert [e.kind for e in events] == ["request_denied"]
    assert (events[0].researcher, events[0].researcher_email) == (RESEARCHER_ID, RESEARCHER)  # type: ignore[attr-defined]
    code, _, err = run(capsys, "admin", "revoke", "ababab", "--reason", "again", "--data-dir", str(site.path))
    assert_one_line_error(code, err, "no live approval 'ababab' on this site: list them with `fedsite admin audit`")


class _FakeUserService:
    """syft's ``client.users``: create appends a data scientist with a fresh id, get_all lists them."""

    def __init__(self) -> None:
        self.users: list[Any] = [SimpleNamespace(email=ADMIN, id=SimpleNamespace(no_dash="0" * 32))]

    def get_all(self) -> list[Any]:
        return list(self.users)

    def create(self, *, name: str, email: str, password: str, password_verify: str, role: Any) -> None:
        self.users.append(SimpleNamespace(email=email, id=SimpleNamespace(no_dash=RESEARCHER_ID)))


def test_add_researcher_prints_the_immutable_id(site: SiteDir, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    users = _FakeUserService()
    monkeypatch.setattr(cli, "_admin_client", lambda args: (site, SimpleNamespace(users=users)))
    monkeypatch.setenv(cli.RESEARCHER_PASSWORD_ENV, "Researcher-Pw-2026!")

    # Execute
    code, out, _ = run(capsys, "admin", "add-researcher", "--name", "Rita", "--email", RESEARCHER,
                       "--data-dir", str(site.path))

    # Assert
    assert code == 0
    assert out.startswith(f"added researcher {RESEARCHER} to site site-a: id {RESEARCHER_ID} (its approvals")
    assert [user.email for user in users.users] == [ADMIN, RESEARCHER]


def test_add_researcher_refuses_an_email_that_differs_only_in_case(
        site: SiteDir, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    users = _FakeUserService()
    users.users.append(SimpleNamespace(email=RESEARCHER, id=SimpleNamespace(no_dash=RESEARCHER_ID)))
    monkeypatch.setattr(cli, "_admin_client", lambda args: (site, SimpleNamespace(users=users)))
    monkeypatch.setenv(cli.RESEARCHER_PASSWORD_ENV, "Researcher-Pw-2026!")

    # Execute
    code, _, err = run(capsys, "admin", "add-researcher", "--name", "Rita", "--email", "Rita@uni.org",
                       "--data-dir", str(site.path))

    # Assert
    assert_one_line_error(code, err, "a user Rita@uni.org already exists on this site: nothing changed")
    assert len(users.users) == 2
