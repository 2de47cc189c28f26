"""The privacy ledger: composes, refuses an overspend, survives a restart, detects tampering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from policies.accounting import PrivacyEvent, epsilon_of
from policies.budget import BudgetBook, PrivacyBudget
from policies.durable import JournalCorruptError, JournalEntry, site_journal
from policies.ledger import BudgetExceededError, LedgerReplayError, PrivacyLedger

pytestmark = pytest.mark.unit

ROUND = {"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 100}
ALICE = "5c1e0b7a9d2f4e3b8a6c0d1e2f3a4b5c"  # alice's syft user id


def _ledger(data_dir: Path, *, epsilon: float = 2.0, accountant: str = "rdp") -> PrivacyLedger:
    BudgetBook(data_dir).set("imdb", PrivacyBudget(epsilon=epsilon, delta=1e-5), n_records=10_000, replace=True)
    return PrivacyLedger(data_dir, "imdb", ALICE, site="site-a", accountant=accountant)


def _event(round_index: int) -> PrivacyEvent:
    return PrivacyEvent(**ROUND, run_id="run-1", round_index=round_index)


def test_spend_composes_with_the_accountant_and_writes_the_journal(tmp_path: Path) -> None:
    # Prepare
    ledger = _ledger(tmp_path)

    # Execute
    first = ledger.spend(_event(0))
    second = ledger.spend(_event(1))

    # Assert
    composed = epsilon_of([(1.0, 0.01, 200)], delta=1e-5, accountant="rdp")
    assert second.epsilon_before == first.epsilon_after
    assert second.epsilon_after == composed
    assert composed < 2 * first.epsilon_after  # composition, not the sum of epsilons
    assert ledger.spent() == composed
    assert ledger.remaining() == pytest.approx(2.0 - composed)
    path = tmp_path / "ledger" / "imdb" / f"{ALICE}.jsonl"
    lines = path.read_text().splitlines()
    assert [json.loads(line)["record"]["round_index"] for line in lines] == [0, 1]
    assert [json.loads(line)["record"]["researcher"] for line in lines] == [ALICE, ALICE]


def test_overspend_is_refused_naming_site_epsilon_and_budget(tmp_path: Path) -> None:
    # Prepare: one round costs epsilon ~1.21 (RDP); 2000 more steps go far past the budget of 1.5
    ledger = _ledger(tmp_path, epsilon=1.5)
    ledger.spend(_event(0))
    big = PrivacyEvent(noise_multiplier=1.0, sample_rate=0.01, steps=2000, run_id="run-1", round_index=1)
    would_reach = epsilon_of([(1.0, 0.01, 2100)], delta=1e-5, accountant="rdp")

    # Execute / Assert
    assert not ledger.can_spend(big)
    with pytest.raises(BudgetExceededError, match=rf"site 'site-a' .* would reach epsilon={would_reach:.4f} .* budget epsilon=1.5 \(already spent 1.2"):
        ledger.spend(big)
    assert len(ledger.records()) == 1


def test_ledger_replays_identically_after_a_restart(tmp_path: Path) -> None:
    # Prepare
    ledger = _ledger(tmp_path, accountant="prv")
    written = [ledger.spend(_event(index)) for index in range(3)]

    # Execute: a new process would construct the ledger from the data dir alone
    reopened = PrivacyLedger(tmp_path, "imdb", ALICE, site="site-a", accountant="prv")
    replayed = reopened.replay()

    # Assert
    assert replayed == written
    assert reopened.spent() == ledger.spent() == written[-1].epsilon_after
    assert reopened.history() == [(1.0, 0.01, 100)] * 3


def test_altered_epsilon_with_a_rebuilt_chain_is_caught_by_replay(tmp_path: Path) -> None:
    # Prepare: someone holding the journal key rewrites it with a smaller epsilon_after and a valid chain
    ledger = _ledger(tmp_path)
    ledger.spend(_event(0))
    record = dict(ledger.journal.entries()[0].record)
    record["epsilon_after"] = 0.001
    site_journal(tmp_path, f"ledger/imdb/{ALICE}.jsonl").rewrite([record])

    # Execute / Assert
    with pytest.raises(LedgerReplayError, match=r"record 0 stores epsilon_after=0.001 but its events compose to"):
        ledger.replay()


def test_edited_line_breaks_the_hash_chain(tmp_path: Path) -> None:
    # Prepare
    ledger = _ledger(tmp_path)
    ledger.spend(_event(0))
    ledger.path.write_text(ledger.path.read_text().replace('"steps":100', '"steps":1'))

    # Execute / Assert
    with pytest.raises(JournalCorruptError, match=r"line 1 was modified after it was written, or written without "
                                                  r"this site's journal key \(MAC mismatch\)"):
        ledger.spent()


def test_cutting_off_the_last_spend_is_refused_before_the_next_spend(tmp_path: Path) -> None:
    # Prepare: dropping the last line would refund its epsilon
    ledger = _ledger(tmp_path)
    ledger.spend(_event(0))
    ledger.spend(_event(1))
    lines = ledger.path.read_text().splitlines(keepends=True)
    ledger.path.write_text(lines[0])

    # Execute / Assert
    with pytest.raises(JournalCorruptError, match=r"has 1 entries but its head file records 2: its last entries were "
                                                  r"removed"):
        ledger.spend(_event(2))
    assert ledger.path.read_text() == lines[0]


def test_a_spend_forged_without_the_key_is_refused(tmp_path: Path) -> None:
    # Prepare: a forger copies the first line and reseals it as a refund under its own key
    ledger = _ledger(tmp_path)
    ledger.spend(_event(0))
    first = ledger.journal.entries()[0]
    record = {**first.record, "round_index": 1, "epsilon_before": 0.0, "epsilon_after": 0.0}
    forged = JournalEntry.seal(b"f" * 32, 1, first.digest, record)
    with open(ledger.path, "a") as handle:
        handle.write(forged.to_line() + "\n")

    # Execute / Assert
    with pytest.raises(JournalCorruptError, match=r"line 2 .*\(MAC mismatch\)"):
        ledger.records()


def test_two_researchers_ledgers_cannot_be_swapped(tmp_path: Path) -> None:
    # Prepare: bob's file replaced by alice's (both journals use the same key, not the same label)
    bob = "0123456789abcdef0123456789abcdef"
    _ledger(tmp_path).spend(_event(0))
    bob_path = tmp_path / "ledger" / "imdb" / f"{bob}.jsonl"
    alice_path = tmp_path / "ledger" / "imdb" / f"{ALICE}.jsonl"
    bob_path.write_bytes(alice_path.read_bytes())

    # Execute / Assert
    with pytest.raises(JournalCorruptError, match=rf"{bob}.jsonl: line 1 breaks the chain"):
        PrivacyLedger(tmp_path, "imdb", bob, site="site-a")


def test_ledger_opened_with_another_accountant_is_refused(tmp_path: Path) -> None:
    # Prepare
    _ledger(tmp_path, accountant="rdp").spend(_event(0))

    # Execute / Assert
    with pytest.raises(ValueError, match=r"composed with accountant \['rdp'\], opened with accountant='prv'"):
        PrivacyLedger(tmp_path, "imdb", ALICE, site="site-a", accountant="prv")


def test_lowered_budget_is_obeyed_at_the_next_spend(tmp_path: Path) -> None:
    # Prepare
    ledger = _ledger(tmp_path, epsilon=5.0)
    ledger.spend(_event(0))
    BudgetBook(tmp_path).set("imdb", PrivacyBudget(epsilon=0.5, delta=1e-5), n_records=10_000, replace=True)

    # Execute / Assert
    assert ledger.remaining() < 0
    with pytest.raises(BudgetExceededError, match=r"budget epsilon=0.5 \(already spent"):
        ledger.spend(_event(1))


@pytest.mark.parametrize(("parameter", "value"), [("dataset", "../etc"), ("dataset", "a/b"), ("dataset", "")])
def test_names_that_would_escape_the_ledger_directory_are_refused(tmp_path: Path, parameter: str, value: str) -> None:
    with pytest.raises(ValueError, match=rf"{parameter} must be 1-128 characters .* got {value!r}"):
        PrivacyLedger(tmp_path, value, ALICE, site="site-a")
    assert not (tmp_path / "ledger").exists()


@pytest.mark.parametrize("researcher", ["alice@lab.org", "a/b", "", "../" + ALICE[3:], ALICE.upper(), ALICE + "0"])
def test_a_researcher_is_keyed_only_by_its_immutable_id(tmp_path: Path, researcher: str) -> None:
    with pytest.raises(ValueError, match=rf"researcher: a researcher id is a syft user id of 32 lowercase hex "
                                         rf"digits, got {researcher!r}"):
        PrivacyLedger(tmp_path, "imdb", researcher, site="site-a")
    assert not (tmp_path / "ledger").exists()


def test_ledger_without_a_budget_names_the_dataset(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path, "imdb", ALICE, site="site-a")
    with pytest.raises(ValueError, match=r"no privacy budget for dataset 'imdb'"):
        ledger.can_spend(_event(0))
