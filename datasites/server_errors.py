"""Unexpected failures inside a site's syft services, logged where the site's admin can read them.

When a syft 0.9.5 service raises anything but a ``SyftException``, a caller below the data-owner role
(a researcher) gets only "Something unexpected happened server side <class '...'>": right, since a
traceback can hold private values. syft keeps the traceback for a *debug* record of its server logger,
and its own set-up (the root logger at CRITICAL) and Fedsite's ``quiet`` silence that logger, so the
failure was lost at the site too: nobody could diagnose it. Every Fedsite datasite relays those
records, with the exception and its traceback, to the ``fedsite.site`` logger at ERROR (to the
``fedsite serve`` log; in tests, to pytest's captured log), and gives Fedsite's loggers a level of their
own so that syft's root level does not drop their warnings either. Refusals are ``SyftException``s
whose message already reaches the caller (the guard's, for one), so they are not relayed.
"""

from __future__ import annotations

import logging
import sys

from policies.syft_patches import is_verbose

logger = logging.getLogger("fedsite.site")

_SYFT_SERVER_LOGGER = "syft.server.server"
_HIDDEN = "Exception (hidden from DS)"  # how syft 0.9.5 begins that debug record


class _HiddenErrorRelay(logging.Filter):
    """On syft's server logger: relays the hidden-traceback records and drops the rest below CRITICAL.

    The logger's level has to be DEBUG for syft's record to be made at all; this filter keeps what that
    level would newly let through (every call's "API Call: ..." record, for one) as silent as before.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.CRITICAL:
            return is_verbose()  # what syft's root level let through before, shown only with --verbose
        if record.getMessage().startswith(_HIDDEN):
            # syft logs from inside its ``except`` block, so the exception is the one being handled here
            _relay(sys.exc_info()[1])
        return False


def _relay(exc: BaseException | None) -> None:
    from syft.types.errors import SyftException

    if exc is None or isinstance(exc, SyftException):
        return
    logger.error("%s: a syft service call failed with %s; the caller was told only that something unexpected "
                 "happened", _server_name(exc), type(exc).__name__, exc_info=(type(exc), exc, exc.__traceback__))


def _server_name(exc: BaseException) -> str:
    """The name of the syft server whose call raised ``exc``: the frame that caught it is its method's."""
    tb = exc.__traceback__
    server = tb.tb_frame.f_locals.get("self") if tb is not None else None
    return str(getattr(server, "name", None) or "a site in this process")


def relay_unexpected_server_errors() -> None:
    """Relay syft's hidden server-side tracebacks to ``fedsite.site`` (idempotent; process-wide)."""
    source = logging.getLogger(_SYFT_SERVER_LOGGER)
    if not any(isinstance(f, _HiddenErrorRelay) for f in source.filters):
        source.addFilter(_HiddenErrorRelay())
    # Its own level, so neither syft's root at CRITICAL nor ``quiet``'s "syft" level drops the debug record
    source.setLevel(logging.DEBUG)
    logging.getLogger("fedsite").setLevel(logging.INFO)


__all__ = ["relay_unexpected_server_errors"]
