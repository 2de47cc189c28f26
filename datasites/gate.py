"""Default deny at the API entry: every call of a researcher passes one check before syft dispatches it.

syft 0.9.5 registers 225 service paths and opens 114 of them to the data-scientist role, among them
``action.execute`` (``getattr(obj, op)(*args)`` on any object the caller can name, with the site
process's rights: read or write any file, call methods of the private asset), blob storage, jobs,
worker pools, custom API endpoints, notifications and sync. Wrapping the one path that runs approved
code is not enough. So a Fedsite site wraps ``Server.handle_api_call_with_unsigned_result``, the one
method every API call enters (over HTTP, ``POST /api/v2/api_call``, and from an in-process client
alike; see docs/security.md), and for every caller below the data-owner role it:

1. refuses an unsigned call, a call with an invalid signature, one addressed to another server
   (syft would forward it), a non-blocking one (a job the researcher would then poll through the
   unchecked ``queue`` path), and ``queue`` itself;
2. refuses every path that is not on ``ALLOWLIST``;
3. runs the path's argument check: approved code only, with the asset it was approved for, and
   objects the caller created; a path that returns records (requests, code) is filtered to the
   caller's own.

A refusal raises syft's ``SyftException`` with a message that says what was refused and why, and is
recorded in the site's audit log (``api_call_refused``) with the caller's immutable id. Admins (data
owner and admin roles) pass through: they own the site. The researcher's own role check stays in
syft as a second line. Which calls a researcher's results came from is remembered in memory only: a
restarted site serves no output of a call made before the restart (the researcher repeats nothing:
the round's stage is refused or redone by its protocol).
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import time
from typing import Any

from datasites.gate_call import ASSET, After, Allowed, Call, Caller, Check, GateRefusal
from datasites.gate_rules import ALLOWLIST, MAX_INPUT_BYTES, MAX_REASON_CHARS, no_arguments
from datasites.guard import GuardedSite, site_for
from policies.audit import ApiCallRefused, AuditLog
from policies.review import printable

logger = logging.getLogger("fedsite.gate")
_PROTOCOL_KWARGS = frozenset({"communication_protocol"})  # syft's client adds it to every call
_install_lock = threading.Lock()
_installed = False


# ---- the gate ----------------------------------------------------------------------------------------


def _caller(server: Any, credentials: Any) -> Caller:
    from syft.types.errors import SyftException

    role = server.get_role_for_credentials(credentials=credentials)
    try:
        user = server.services.user.stash.get_by_verify_key(credentials=server.verify_key,
                                                            verify_key=credentials).unwrap()
    except SyftException:
        return Caller(credentials, role, None, "unknown")
    return Caller(credentials, role, str(user.id.no_dash), str(user.email))


def _is_owner(role: Any) -> bool:
    from syft.service.user.user_roles import ServiceRole

    return bool(role.value >= ServiceRole.DATA_OWNER.value)


class _UnknownCallers:
    """Refusals of keys without an account: counted, and logged at most once a minute per site."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.last_logged: dict[str, float] = {}
        self.lock = threading.Lock()

    def count(self, site: str, message: str) -> None:
        with self.lock:
            self.counts[site] = self.counts.get(site, 0) + 1
            now = time.monotonic()
            if now - self.last_logged.get(site, -60.0) < 60.0:
                return
            self.last_logged[site], total = now, self.counts[site]
        logger.warning("%s (a key without an account; %d such refusals so far)", message, total)


class _Refused(Exception):
    """Raised inside the gate; ``gated`` answers it with syft's SyftError (over HTTP an exception would be a
    500, which a researcher's client cannot tell from a dead site)."""


_PATH = re.compile(r"[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*){0,3}")
_unknown_refusals = _UnknownCallers()


def bounded(text: str, limit: int = 300) -> str:
    """A reason that may quote the caller's text (an argument's name, a value): escaped and cut, so that a
    call cannot write megabytes or terminal escapes into the audit log."""
    return printable(text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit} more characters)")


def _shown(path: object) -> str:
    """A path as it may be shown and recorded: a well-formed service path, or a placeholder (the path is the
    caller's text: it could carry terminal escapes or megabytes)."""
    return path if isinstance(path, str) and len(path) <= 80 and _PATH.fullmatch(path) else "<malformed path>"


def _refusal(server: Any, site: GuardedSite | None, caller: Caller | None, path: str, why: str) -> Exception:
    name = site.name if site is not None else "this server"
    message = f"{name}: refused: {_shown(path)} (the site's API gate): {bounded(why)}"
    if site is not None and caller is not None and caller.user_id is not None:
        # A researcher's refused call is on the record, under its immutable id. A key without an account
        # (anyone who reaches the port can make one) is not: it would let anyone grow the audit log at will.
        AuditLog(site.data_dir).record(ApiCallRefused(
            path=_shown(path), caller=caller.user_id, caller_email=caller.email, role=str(caller.role),
            reason=message))
        logger.warning("%s (caller %s)", message, caller.email)
    else:
        _unknown_refusals.count(name, message)
    return _Refused(message)


def check_call(server: Any, api_call: Any) -> tuple[Call | None, Allowed | None]:
    """The gate's decision: (None, None) for an owner's call (unchecked), the checked call and its rule
    for an allowed researcher call; raises _Refused for everything else (audited)."""
    from syft.client.api import SignedSyftAPICall

    site = site_for(str(server.id.no_dash))
    if not isinstance(api_call, SignedSyftAPICall) or not api_call.is_valid:
        raise _refusal(server, site, None, "api_call", "only calls signed by an account's key are served")
    caller = _caller(server, api_call.credentials)
    if _is_owner(caller.role):
        return None, None
    message = api_call.message
    path = str(message.path)
    if site is None:
        raise _refusal(server, None, caller, path, "this server is not a registered Fedsite site (the gate fails closed)")
    if message.server_uid != server.id:
        raise _refusal(server, site, caller, path, "calls for another server are not forwarded")
    if path == "metadata":
        return None, None  # syft answers its public metadata before any role check
    if caller.user_id is None:
        raise _refusal(server, site, caller, path, "this key has no account here: log in with the account the "
                       "site's admin created for you")
    if not message.blocking:
        raise _refusal(server, site, caller, path, "researchers make blocking calls only (no jobs)")
    rule = ALLOWLIST.get(path)
    if rule is None:
        raise _refusal(server, site, caller, path, "not on the site's allowlist (default deny)")
    kwargs = {k: v for k, v in (message.kwargs or {}).items() if k not in _PROTOCOL_KWARGS}
    call = Call(server, site, caller, path, tuple(message.args or ()), kwargs)
    try:
        rule.check(call)
    except GateRefusal as exc:
        raise _refusal(server, site, caller, path, str(exc)) from None
    except Exception:  # a check that fails refuses (fail closed); the traceback stays in the site's log
        logger.exception("the gate's check of %s failed; refusing the call", path)
        raise _refusal(server, site, caller, path, "the site could not check this call's arguments") from None
    return call, rule


def install_gate() -> None:
    """Wrap syft's API entry once per process (idempotent); servers not registered as sites fail closed."""
    global _installed
    with _install_lock:
        if _installed:
            return
        from syft.server.server import Server

        original = Server.handle_api_call_with_unsigned_result

        original_api = Server.get_api

        @functools.wraps(original)
        def gated(self: Any, api_call: Any, job_id: Any = None, check_call_location: bool = True) -> Any:
            from syft.service.response import SyftError

            try:
                call, rule = check_call(self, api_call)
            except _Refused as refused:
                return SyftError(message=str(refused))
            result = original(self, api_call, job_id=job_id, check_call_location=check_call_location)
            if call is not None and rule is not None and rule.after is not None:
                return rule.after(call, result)
            return result

        @functools.wraps(original_api)
        def api_without_others_code(self: Any, for_user: Any = None, communication_protocol: Any = None) -> Any:
            """syft serves ``GET /api?verify_key=K`` without authentication; for the root key (public in the
            site's metadata) it lists every researcher's functions (names = run ids, and code ids). A site
            serves an owner's API without them: its admins review requests, they do not call user code."""
            api = original_api(self, for_user=for_user, communication_protocol=communication_protocol)
            if site_for(str(self.id.no_dash)) is not None and for_user is not None and _is_owner(
                    self.get_role_for_credentials(credentials=for_user)):
                api.endpoints = {path: e for path, e in api.endpoints.items() if not path.startswith("code.call_")}
            return api

        gated.__fedsite_gate__ = True  # type: ignore[attr-defined]
        Server.handle_api_call_with_unsigned_result = gated
        Server.get_api = api_without_others_code
        _installed = True


def is_gate_installed() -> bool:
    from syft.server.server import Server

    return getattr(Server.handle_api_call_with_unsigned_result, "__fedsite_gate__", False) is True


def researcher_paths() -> dict[str, str]:
    """Every service path syft registers that its own roles open to a researcher (read at run time)."""
    from syft.service.service import ServiceConfigRegistry, UserServiceConfigRegistry
    from syft.service.user.user_roles import ServiceRole

    registry = ServiceConfigRegistry.__service_config_registry__
    opened = UserServiceConfigRegistry.from_role(ServiceRole.DATA_SCIENTIST)
    return {path: ("allowlisted" if path in ALLOWLIST else "refused") for path in sorted(registry) if path in opened}


__all__ = ["ALLOWLIST", "ASSET", "MAX_INPUT_BYTES", "MAX_REASON_CHARS", "After", "Allowed", "Call", "Caller", "Check",
           "GateRefusal", "bounded", "check_call", "install_gate", "is_gate_installed", "no_arguments",
           "researcher_paths"]
