"""`fedsite serve` processes on loopback ports, driven as a data owner would drive them."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedsite.processes import ServedSite, free_port, port_open
from tests.conftest import ADMIN_PASSWORD
from tests.e2e.kill import kill9

__all__ = ["ServedSite", "fedsite", "free_port", "port_open", "serve_site"]

def fedsite(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user would, in a fresh interpreter."""
    full_env = {**os.environ, "FEDSITE_ADMIN_PASSWORD": ADMIN_PASSWORD, **(env or {})}
    return subprocess.run([sys.executable, "-m", "fedsite", *args], env=full_env, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture()
def serve_site(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    started: list[ServedSite] = []

    def make(name: str) -> ServedSite:
        site = ServedSite(name=name, data_dir=tmp_path / name, port=free_port(), log=tmp_path / f"{name}.log",
                          admin_password=ADMIN_PASSWORD)
        started.append(site)
        return site

    yield make
    for site in started:
        if site.process is not None and site.process.poll() is None:
            kill9(site)
