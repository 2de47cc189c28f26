"""Talking to a syft 0.9.5 datasite as a client, quietly, with one clear error per failure.

Used by the site's admin tools and by researchers alike (what both sides need lives in
``policies``). syft prints, logs and draws progress bars where a library should not, so every call
into it goes through ``quiet()``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any, TextIO


class SiteConnectionError(ConnectionError):
    """Logging in to a datasite failed; the message says why and what to check."""


def prepare_syft_environment() -> None:
    """Settings syft reads from the environment; set before syft is imported or a server built."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ["DEV_MODE"] = "False"  # syft's orchestra sets it process-wide; never let it be True
    os.environ["ENABLE_SIGNUP"] = "False"


_quiet_lock = threading.Lock()
_quiet_depth = 0
_saved_stdout: TextIO | None = None


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence syft's prints, progress bars and logs.

    ``sys.stdout`` is process-wide, and the federated loop calls sites from several threads: a plain
    ``redirect_stdout`` per thread restores the streams out of order and can leave stdout pointing
    at a discarded buffer. So the first ``quiet`` in swaps stdout and the last one out restores it.
    """
    global _quiet_depth, _saved_stdout
    prepare_syft_environment()
    logging.getLogger("syft").setLevel(logging.CRITICAL + 1)
    with _quiet_lock:
        if _quiet_depth == 0:
            _saved_stdout, sys.stdout = sys.stdout, io.StringIO()
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0 and _saved_stdout is not None:
                sys.stdout, _saved_stdout = _saved_stdout, None


def login(url_or_handle: Any, *, email: str, password: str, port: int | None = None) -> Any:
    """Log in to a site (a ServerHandle in-process, or an http URL with a port)."""
    with quiet():
        import syft as sy
        from syft.types.errors import SyftException

        try:
            if isinstance(url_or_handle, str):
                return sy.login(url=url_or_handle, port=port, email=email, password=password)
            return url_or_handle.login(email=email, password=password)
        except SyftException as exc:
            message = str(getattr(exc, "public_message", exc)).strip()
            if "Invalid credentials" in message or "Item not found" in message:
                raise SiteConnectionError(f"login refused for {email}: wrong email or password") from None
            raise SiteConnectionError(f"login to {url_or_handle} failed: {message}") from None
        except Exception as exc:  # noqa: BLE001 - connection failures of every kind become one line
            raise SiteConnectionError(
                f"cannot reach datasite at {url_or_handle}:{port} ({type(exc).__name__}): is `fedsite serve` running?"
            ) from None
