"""Every change Fedsite makes to syft 0.9.5, installed by one ``install()`` that first checks the syft version.

Fedsite patches syft where syft 0.9.5 is wrong for a datasite (a security gap, a lost error, a wasted
walk) or for a client (an https port dropped, a CA not applied). Each patch replaces a named attribute
of syft's, so it is only right for the syft it was written against: ``install()`` refuses any other
version, naming both, before anything is patched. docs/syft.md lists the syft facts behind each patch.

Both sides call ``install()``: a researcher's login applies ``CLIENT_PATCHES``; a site's start applies
these and the site's own (``datasites.syft_patches.SITE_PATCHES``: the execution guard, the API gate,
the result-walk speed fix, the hidden-error relay), which it passes in, since ``policies`` never imports
``datasites``. Every patch's ``apply`` is idempotent, so ``install()`` may be called at every entry.

It also silences syft's log records and prints once per process, unless ``verbose`` (``--verbose``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata

SYFT_VERSION = "0.9.5"  # the syft every patch below was written against (and read, line by line)
_SILENT = logging.CRITICAL + 1  # above every level syft logs at


class SyftVersionError(RuntimeError):
    """The installed syft is not the one Fedsite's patches were written for."""


@dataclass(frozen=True)
class Patch:
    """One change to syft: what it replaces, why, and the idempotent function that makes it."""

    target: str  # the syft attribute (or logger) that is replaced or wrapped
    reason: str  # one line: what syft 0.9.5 does wrong there
    apply: Callable[[], None]


def check_syft_version(installed: str | None = None) -> str:
    """The installed syft version (``installed`` stands in for it in tests); raises unless it is ``SYFT_VERSION``."""
    if installed is None:
        try:
            installed = metadata.version("syft")
        except metadata.PackageNotFoundError:
            raise SyftVersionError(f"syft is not installed: Fedsite needs syft=={SYFT_VERSION} "
                                   f"(pip install 'syft=={SYFT_VERSION}')") from None
    if installed != SYFT_VERSION:
        raise SyftVersionError(
            f"syft {installed} is installed, but Fedsite's patches to syft were written for syft {SYFT_VERSION} "
            f"and replace its internals by name: install syft=={SYFT_VERSION} (pip install 'syft=={SYFT_VERSION}')")
    return installed


def prepare_syft_environment() -> None:
    """Settings syft reads from the environment; set before syft is imported or a server built."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ["DEV_MODE"] = "False"  # syft's orchestra sets it process-wide; never let it be True
    os.environ["ENABLE_SIGNUP"] = "False"


def _https_ports() -> None:
    from policies.syft_client import _keep_explicit_https_ports

    _keep_explicit_https_ports()


def _pinned_api_calls() -> None:
    from policies.syft_client import _route_api_calls_through_the_session

    _route_api_calls_through_the_session()


def _silence_syft_logs() -> None:
    logging.getLogger("syft").setLevel(logging.NOTSET if _state.verbose else _SILENT)


CLIENT_PATCHES: tuple[Patch, ...] = (
    Patch("syft.types.server_url.ServerURL.from_url and .__copy__",
          "syft sends every https request to port 443, whatever port the URL names", _https_ports),
    Patch("syft.client.client.HTTPConnection.make_call",
          "syft posts API calls with requests.post outside the connection's session, so a pinned CA would not "
          "apply to them (only connections with a CAPinnedSession are rerouted)", _pinned_api_calls),
    Patch("logger 'syft' (level)",
          "syft logs at CRITICAL for routine events (the hash of the signing key at every start); silent unless "
          "--verbose", _silence_syft_logs),
)


@dataclass
class _State:
    checked: bool = False
    verbose: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


_state = _State()


def install(*, verbose: bool | None = None, patches: Sequence[Patch] = ()) -> None:
    """Check the syft version (once), then apply ``CLIENT_PATCHES`` and ``patches``; idempotent.

    ``verbose`` lets syft's log records and prints through (``--verbose``); None keeps the process's choice.
    Raises SyftVersionError, before anything is patched, when syft is not ``SYFT_VERSION``.
    """
    with _state.lock:
        if not _state.checked:
            check_syft_version()
            prepare_syft_environment()
            _state.checked = True
        if verbose is not None:
            _state.verbose = verbose
        for patch in (*CLIENT_PATCHES, *patches):
            patch.apply()


def is_verbose() -> bool:
    """Whether syft's own output is let through in this process (``--verbose``)."""
    return _state.verbose


__all__ = ["CLIENT_PATCHES", "SYFT_VERSION", "Patch", "SyftVersionError", "check_syft_version", "install",
           "is_verbose", "prepare_syft_environment"]
