"""Killing a `fedsite serve` process without warning (SIGKILL): a crash, for the tests that need one."""

from __future__ import annotations

import signal

from fedsite.processes import ServedSite


def kill9(site: ServedSite) -> None:
    """SIGKILL the site's process (no clean shutdown) and wait for it to go."""
    if site.process is not None and site.process.poll() is None:
        site.process.send_signal(signal.SIGKILL)
        site.process.wait(timeout=30)
