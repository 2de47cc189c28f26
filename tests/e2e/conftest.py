"""`fedsite serve` processes on loopback ports, driven as a data owner would drive them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import ADMIN_PASSWORD

READY_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def fedsite(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user would, in a fresh interpreter."""
    full_env = {**os.environ, "FEDSITE_ADMIN_PASSWORD": ADMIN_PASSWORD, **(env or {})}
    return subprocess.run([sys.executable, "-m", "fedsite", *args], env=full_env, capture_output=True, text=True,
                          timeout=timeout, check=False)


@dataclass
class ServedSite:
    name: str
    data_dir: Path
    port: int
    log: Path
    process: subprocess.Popen[bytes] | None = field(default=None)

    def start(self) -> None:
        env = {**os.environ, "FEDSITE_ADMIN_PASSWORD": ADMIN_PASSWORD}
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "fedsite", "serve", "--name", self.name, "--data-dir", str(self.data_dir),
                 "--port", str(self.port)], env=env, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.process.returncode}: {self.log.read_text()}")
            if port_open(self.port) and (self.data_dir / "serve.json").exists():
                return
            time.sleep(0.25)
        raise AssertionError(f"{self.name} not ready after {READY_TIMEOUT_S} s: {self.log.read_text()}")

    def kill9(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def terminate(self) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


@pytest.fixture()
def serve_site(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    started: list[ServedSite] = []

    def make(name: str) -> ServedSite:
        site = ServedSite(name=name, data_dir=tmp_path / name, port=free_port(), log=tmp_path / f"{name}.log")
        started.append(site)
        return site

    yield make
    for site in started:
        if site.process is not None and site.process.poll() is None:
            site.kill9()
