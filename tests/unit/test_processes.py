"""`fedsite serve` child processes as the demo's --http mode starts them (the command line only; nothing runs)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from fedsite.processes import ServedSite

pytestmark = pytest.mark.unit


def _argv_of(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **fields: Any) -> list[str]:
    started: list[list[str]] = []

    def popen(argv: list[str], **_: Any) -> Any:
        started.append(argv)
        return None

    monkeypatch.setattr(subprocess, "Popen", popen)
    ServedSite(name="site-a", data_dir=tmp_path / "site-a", port=8123, log=tmp_path / "site-a.log",
               admin_password="pw", **fields).start()
    (argv,) = started
    return argv[argv.index("serve"):]


def test_a_served_site_is_silent_unless_verbose(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    quiet = _argv_of(tmp_path, monkeypatch)
    verbose = _argv_of(tmp_path, monkeypatch, verbose=True)

    assert quiet == ["serve", "--name", "site-a", "--data-dir", str(tmp_path / "site-a"), "--port", "8123",
                     "--device", "cpu"]
    assert verbose == [*quiet, "--verbose"]
