"""`fedsite admin identity | ledger | audit` on a data dir, and the admin commands' argument errors."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from datasites.sitedir import SiteDir
from fedsite import cli
from fedsite.cli import main
from policies.accounting import PrivacyEvent, epsilon_of
from policies.audit import AuditLog, ExecutionAuthorised, PrivacySpent, RequestApproved, RequestDenied
from policies.budget import BudgetBook, PrivacyBudget
from policies.durable import HashChainedJournal, sha256_hex
from policies.ledger import PrivacyLedger

pytestmark = pytest.mark.unit

ADMIN = "admin@site-a.fedsite.org"
RESEARCHER = "rita@uni.org"
REQUEST = {"request_id": "0123456789abcdef0123456789abcdef", "code_hash": sha256_hex("def f(): ...\n"),
           "researcher": RESEARCHER, "dataset": "imdb"}
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
    ledger = PrivacyLedger(site.path, "imdb", RESEARCHER, site="site-a")
    for index in range(rounds):
        ledger.spend(PrivacyEvent(**ROUND, round_index=index))
    return ledger


def record_review_events(site: SiteDir) -> AuditLog:
    log = AuditLog(site.path)
    log.record(RequestApproved(**REQUEST, plan_digest=sha256_hex("plan"), admin=ADMIN))
    log.record(ExecutionAuthorised(**REQUEST, round=0))
    log.record(PrivacySpent(request_id=REQUEST["request_id"], dataset="imdb", researcher=RESEARCHER, epsilon=0.25,
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


def test_ledger_shows_spent_epsilon_budget_and_records(site: SiteDir, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    spend_rounds(site, 2)

    # Execute
    code, out, _ = run(capsys, "admin", "ledger", "--data-dir", str(site.path))

    # Assert
    spent = epsilon_of([(1.0, 0.032, 2), (1.0, 0.032, 2)], delta=1e-5, accountant="prv")
    assert code == 0
    assert out.splitlines()[-1].split() == ["imdb", RESEARCHER, "2", f"{spent:.4f}", "8"]


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
    assert f"request_id=0123456789ab researcher={RESEARCHER} dataset=imdb admin={ADMIN}" in rows[0]
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
    assert f"privacy ledger imdb / {RESEARCHER}: 1 records replayed, spent epsilon {spent:.4f} of budget 8" in out
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
    assert_one_line_error(code, err, f"{log.path}: line 4 was modified after it was written (hash mismatch)")
    assert out == ""


def test_audit_verify_detects_lines_removed_from_the_end(site: SiteDir, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    log = record_review_events(site)
    anchor = f"{log.head().n_entries}:{log.head().last_hash}"
    lines = log.path.read_text(encoding="utf-8").splitlines(keepends=True)
    log.path.write_text("".join(lines[:2]), encoding="utf-8")

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
    # Prepare: rewrite the ledger with a lower epsilon_after and a freshly computed, intact chain
    ledger = spend_rounds(site, 1)
    record = dict(HashChainedJournal(ledger.path).entries()[0].record)
    ledger.path.unlink()
    HashChainedJournal(ledger.path).append({**record, "epsilon_after": 0.01})

    # Execute
    code, _, err = run(capsys, "admin", "audit", "--data-dir", str(site.path), "--verify")

    # Assert
    assert_one_line_error(code, err, "record 0 stores epsilon_after=0.01 but its events compose to")


def test_audit_verify_detects_an_edited_approvals_journal(site: SiteDir, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    journal = HashChainedJournal(site.path / "approvals.jsonl")
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
                           requesting_user_email=RESEARCHER, status=f"RequestStatus.{status}")


def _serve_fake_requests(monkeypatch: pytest.MonkeyPatch, site: SiteDir, *requests: Any) -> None:
    monkeypatch.setattr(cli, "_admin_client", lambda args: (site, SimpleNamespace(requests=list(requests))))


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
    registry.record(Approval(request_id="ab" * 16, code_hash="c" * 64, researcher="rita@uni.org", dataset="imdb",
                             plan={"run_id": "run-0123456789ab"}, calibrated={}, admin="admin@x.org",
                             approved_at="2026-11-26T00:00:00+00:00"))

    code, out, _ = run(capsys, "admin", "revoke", "ababab", "--reason", "plan changed", "--data-dir", str(site.path))

    assert code == 0
    assert "revoked the approval of request abababababab (run run-0123456789ab)" in out
    assert registry.find("c" * 64, researcher="rita@uni.org") is None
    assert [e.kind for e in AuditLog(site.path).events()] == ["request_denied"]
    code, _, err = run(capsys, "admin", "revoke", "ababab", "--reason", "again", "--data-dir", str(site.path))
    assert_one_line_error(code, err, "0 live approvals match 'ababab'")
