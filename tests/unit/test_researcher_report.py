"""The run report: frozen round records, append-only order, JSON round trip for resume, the PNG plot."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from researcher.report import TIME_KEYS, LostRound, RoundRecord, RunReport, RunReportError

pytestmark = pytest.mark.unit

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _record(round_index: int, /, **overrides: Any) -> RoundRecord:
    fields: dict[str, Any] = {
        "round_index": round_index,
        "accuracy": 0.5 + 0.1 * round_index,
        "mean_loss": 0.69 - 0.05 * round_index,
        "epsilon_spent": {"site-a": 0.4 * (round_index + 1), "site-b": 0.5 * (round_index + 1)},
        "participants": ["site-a", "site-b"],
        "dropped": [],
        "seconds": dict.fromkeys(TIME_KEYS, 1.5),
    }
    fields.update(overrides)
    return RoundRecord(**fields)


def _report(rounds: int) -> RunReport:
    report = RunReport(run_id="run-1")
    for round_index in range(rounds):
        report.append_round(_record(round_index))
    return report


def test_records_are_frozen_values() -> None:
    # Prepare
    record = _record(0)

    # Execute / Assert
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.accuracy = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        record.epsilon_spent["site-a"] = 0.0  # type: ignore[index]
    assert record.participants == ("site-a", "site-b")


def test_json_round_trip_gives_the_same_report(tmp_path: Path) -> None:
    # Prepare
    report = _report(3)
    report.append_round(_record(3, participants=["site-a"], dropped=["site-b"], epsilon_spent={"site-a": 1.6},
                                drop_reasons={"site-b": "mask_input: ConnectionError: refused"}))
    path = tmp_path / "report.json"

    # Execute
    report.save_json(path)
    loaded = RunReport.load_json(path)

    # Assert
    assert loaded.run_id == "run-1"
    assert loaded.rounds == report.rounds
    assert loaded.rounds[3].dropped == ("site-b",)
    assert dict(loaded.rounds[3].drop_reasons) == {"site-b": "mask_input: ConnectionError: refused"}
    assert json.loads(path.read_text())["rounds"][3]["epsilon_spent"] == {"site-a": 1.6}


def test_a_resumed_report_continues_after_its_last_round(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "report.json"
    _report(2).save_json(path)

    # Execute
    resumed = RunReport.load_json(path)
    resumed.append_round(_record(2))

    # Assert
    assert [record.round_index for record in resumed.rounds] == [0, 1, 2]


def test_rounds_are_appended_once_and_in_order() -> None:
    # Prepare
    report = _report(2)

    # Execute / Assert
    with pytest.raises(RunReportError, match="round 1 comes after round 1: each round is recorded once"):
        report.append_round(_record(1))
    with pytest.raises(RunReportError, match="append_round takes a RoundRecord, got dict"):
        report.append_round(_record(2).to_dict())  # type: ignore[arg-type]
    assert len(report.rounds) == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"accuracy": 1.5}, r"accuracy must be a finite number in \[0.0, 1.0\], got 1.5"),
        ({"mean_loss": float("nan")}, "mean_loss must be a finite number"),
        ({"epsilon_spent": {"site-a": -0.1}}, r"epsilon_spent\['site-a'\] must be a finite number in \[0.0, inf\], got -0.1"),
        ({"seconds": {"training": True}}, r"seconds\['training'\] must be a finite number.*got True"),
        ({"participants": []}, "participants is empty"),
        ({"participants": "site-a"}, "participants must be a list of site names, got the string 'site-a'"),
        ({"dropped": ["site-b"]}, r"sites \['site-b'\] are both participants and dropped"),
        ({"round_index": -1}, "round_index must be an int >= 0, got -1"),
        ({"drop_reasons": {"site-a": "timeout"}}, r"drop_reasons names \['site-a'\], which did not drop out"),
        ({"participants": ["site-a"], "dropped": ["site-b"], "drop_reasons": {"site-b": ""}},
         r"drop_reasons\['site-b'\] must be a non-empty string, got ''"),
    ],
)
def test_invalid_records_are_refused_with_the_field_and_value(overrides: dict[str, Any], message: str) -> None:
    # Execute / Assert
    with pytest.raises(RunReportError, match=message):
        _record(0, **overrides)


def test_a_report_written_before_drop_reasons_were_kept_still_loads(tmp_path: Path) -> None:
    # Prepare: a round record as earlier versions wrote it, without the key
    path = tmp_path / "report.json"
    _report(1).save_json(path)
    raw = json.loads(path.read_text())
    del raw["rounds"][0]["drop_reasons"]
    path.write_text(json.dumps(raw))

    # Execute
    loaded = RunReport.load_json(path)

    # Assert
    assert dict(loaded.rounds[0].drop_reasons) == {}


def test_load_json_refuses_another_document(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"format": "something-else", "rounds": []}))

    # Execute / Assert
    with pytest.raises(RunReportError, match="is not a fedsite-run-report-v1 document"):
        RunReport.load_json(path)


def test_plot_png_writes_a_png(tmp_path: Path) -> None:
    # Prepare
    report = _report(4)
    path = tmp_path / "report.png"

    # Execute
    report.plot_png(path)

    # Assert
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # IHDR
    assert (width, height) == (1000, 400)
    assert [p.name for p in tmp_path.iterdir()] == ["report.png"]  # no temporary file left behind


def test_plot_png_of_an_empty_report_is_refused(tmp_path: Path) -> None:
    # Execute / Assert
    with pytest.raises(RunReportError, match="no rounds to plot"):
        RunReport(run_id="run-1").plot_png(tmp_path / "report.png")


def _lost(round_index: int, /, **overrides: Any) -> LostRound:
    fields: dict[str, Any] = {
        "round_index": round_index, "attempt": 0, "stage": "consistency_check",
        "reason": "only 1 of the sites ... signed; at least threshold=2 are needed",
        "released": ["site-a", "site-b"], "epsilon_spent": {"site-a": 0.9}, "unconfirmed": [],
        "drop_reasons": {"site-b": "consistency_check: ConnectionError: refused"}, "seconds": {"mask_input": 2.5},
    }
    fields.update(overrides)
    return LostRound(**fields)


def _report_with_a_lost_round() -> RunReport:
    report = _report(1)
    report.append_lost(_lost(1))
    report.append_round(_record(2))
    return report


def test_a_report_with_a_lost_round_round_trips_in_order(tmp_path: Path) -> None:
    # Prepare
    report = _report_with_a_lost_round()
    path = tmp_path / "report.json"

    # Execute
    report.save_json(path)
    loaded = RunReport.load_json(path)

    # Assert: the lost round comes back between the completed ones, with who spent, where and why
    assert loaded.rounds == report.rounds and loaded.lost_rounds == report.lost_rounds
    assert [r.round_index for r in loaded.rounds] == [0, 2] and loaded.last_round_index == 2
    lost = loaded.lost_rounds[0]
    assert (lost.round_index, lost.stage, lost.released) == (1, "consistency_check", ("site-a", "site-b"))
    assert json.loads(path.read_text())["lost_rounds"][0]["epsilon_spent"] == {"site-a": 0.9}
    assert lost.summary() == ("round 1 lost at consistency_check: only 1 of the sites ... signed; at least "
                              "threshold=2 are needed; spent by site-a (epsilon 0.90), site-b (not reported: "
                              "see its ledger)")


def test_a_lost_round_takes_its_place_in_the_one_order_of_rounds() -> None:
    report = _report(2)

    with pytest.raises(RunReportError, match="round 1 comes after round 1: each round is recorded once"):
        report.append_lost(_lost(1))
    report.append_lost(_lost(2))
    with pytest.raises(RunReportError, match="round 2 comes after round 2"):
        report.append_round(_record(2))
    with pytest.raises(RunReportError, match="append_lost takes a LostRound, got RoundRecord"):
        report.append_lost(_record(3))  # type: ignore[arg-type]
    assert report.last_round_index == 2 and len(report.rounds) == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"released": []}, "released is empty: a round no site released is retried, not lost"),
        ({"epsilon_spent": {"site-c": 1.0}}, r"epsilon_spent names \['site-c'\], which did not release"),
        ({"unconfirmed": ["site-b"]}, r"sites \['site-b'\] are both released and unconfirmed"),
        ({"stage": ""}, "stage must be a non-empty string"),
        ({"attempt": True}, "attempt must be an int >= 0, got True"),
        ({"drop_reasons": {"site-c": ""}}, "drop_reasons must be a mapping of site -> non-empty reason"),
    ],
)
def test_invalid_lost_rounds_are_refused_with_the_field_and_value(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(RunReportError, match=message):
        _lost(0, **overrides)


def test_a_lost_round_record_needs_exactly_its_keys(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    _report_with_a_lost_round().save_json(path)
    raw = json.loads(path.read_text())
    del raw["lost_rounds"][0]["stage"]
    path.write_text(json.dumps(raw))

    with pytest.raises(RunReportError, match="a lost round record needs exactly the keys"):
        RunReport.load_json(path)


def test_a_report_written_before_lost_rounds_were_kept_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    _report(2).save_json(path)
    raw = json.loads(path.read_text())
    del raw["lost_rounds"]
    path.write_text(json.dumps(raw))

    loaded = RunReport.load_json(path)

    assert loaded.lost_rounds == () and loaded.last_round_index == 1


@pytest.mark.parametrize("report", [_report_with_a_lost_round, lambda: _lost_only()], ids=["between", "only"])
def test_plot_png_marks_lost_rounds(tmp_path: Path, report: Any) -> None:
    path = tmp_path / "report.png"

    report().plot_png(path)

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) == (1000, 400)


def _lost_only() -> RunReport:
    report = RunReport(run_id="run-1")
    report.append_lost(_lost(0))
    return report
