"""Datasite server processes (`fedsite serve`) started and stopped from Python: the demo's --http
mode and the end-to-end tests use the same code."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

READY_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class ServedSite:
    """One `fedsite serve` child process on a loopback port, its output in ``log``."""

    name: str
    data_dir: Path
    port: int
    log: Path
    admin_password: str
    device: str = "cpu"  # `fedsite serve --device`
    tls_cert: Path | None = None  # `fedsite serve --tls-cert` (with tls_key: the site serves HTTPS)
    tls_key: Path | None = None  # `fedsite serve --tls-key`
    verbose: bool = False  # `fedsite serve --verbose`: syft's own log lines reach ``log`` too
    process: subprocess.Popen[bytes] | None = field(default=None)

    @property
    def url(self) -> str:
        """The site's base URL without the port, as ``login`` takes it."""
        return f"{'https' if self.tls_cert is not None else 'http'}://127.0.0.1"

    def start(self) -> None:
        env = {**os.environ, "FEDSITE_ADMIN_PASSWORD": self.admin_password}
        tls = [] if self.tls_cert is None or self.tls_key is None else [
            "--tls-cert", str(self.tls_cert), "--tls-key", str(self.tls_key)]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "fedsite", "serve", "--name", self.name, "--data-dir", str(self.data_dir),
                 "--port", str(self.port), "--device", self.device, *tls,
                 *(["--verbose"] if self.verbose else [])], env=env, stdout=log,
                stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}: {self.log.read_text()}")
            if port_open(self.port) and (self.data_dir / "serve.json").exists():
                return
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} not ready after {timeout_s} s: {self.log.read_text()}")

    def terminate(self) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)
