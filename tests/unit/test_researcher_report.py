"""The run report: frozen round records, append-only order, JSON round trip for resume, the PNG plot."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from researcher.report import TIME_KEYS, RoundRecord, RunReport, RunReportError

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
