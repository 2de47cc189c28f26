"""What the API gate knows of one researcher call: who made it, its arguments, and the site's records.

``datasites.gate`` builds a ``Call`` for every call it checks; the per-path checks in
``datasites.gate_rules`` read it, and look records up with the server's own rights through the helpers
here (never to make the call itself). ``_granted`` remembers, in memory only, which outputs each caller's
authorised calls produced: the only outputs that caller may read.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from datasites.guard import GuardedSite

ASSET = "reviews"  # the one asset name of a Fedsite dataset (datasites.admin.PRIVATE_ASSET)


class GateRefusal(Exception):
    """A researcher's API call that the site does not allow; the message is what the caller is told."""


@dataclass(frozen=True)
class Caller:
    """Who made a call, as the site knows it (never as the call claims)."""

    verify_key: Any  # syft's SyftVerifyKey that signed the call
    role: Any  # syft's ServiceRole for that key
    user_id: str | None  # the immutable id (syft user id hex), None when the key has no account here
    email: str  # the account's e-mail now, "unknown" without an account


@dataclass
class Call:
    """One call under the gate's check."""

    server: Any  # the syft Server
    site: GuardedSite
    caller: Caller
    path: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    @property
    def admin(self) -> Any:
        """A service context with the server's own rights, for lookups the check needs (never for the call)."""
        from syft.service.context import AuthedServiceContext
        from syft.service.user.user_roles import ServiceRole

        return AuthedServiceContext(server=self.server, credentials=self.server.verify_key, role=ServiceRole.ADMIN)

    def bind(self, *names: str, optional: Iterable[str] = ()) -> dict[str, Any]:
        """The arguments by name (positional ones in ``names`` order); refuses missing and unexpected ones."""
        if len(self.args) > len(names):
            raise GateRefusal(f"takes at most {len(names)} positional arguments ({', '.join(names)})")
        bound = dict(zip(names, self.args, strict=False))
        for key, value in self.kwargs.items():
            if key in bound:
                raise GateRefusal(f"argument {key!r} given twice")
            bound[key] = value
        allowed = set(names) | set(optional)
        unexpected = sorted(set(bound) - allowed)
        if unexpected:
            raise GateRefusal(f"unexpected arguments {unexpected} (allowed: {sorted(allowed)})")
        missing = [name for name in names if name not in bound]
        if missing:
            raise GateRefusal(f"missing arguments {missing}")
        return bound


Check = Callable[[Call], None]
After = Callable[[Call, Any], Any]


@dataclass(frozen=True)
class Allowed:
    """One allowlisted service path: why a researcher needs it, and how its arguments are checked."""

    reason: str  # one line, shown in docs/security.md and the gate's tests
    check: Check  # raises GateRefusal unless the arguments are the legitimate use
    after: After | None = None  # filters or records what syft answered (own records only; outputs)


# ---- what the gate remembers: the outputs of each caller's authorised calls -------------------------


@dataclass
class _Granted:
    results: dict[tuple[str, str], set[str]] = field(default_factory=dict)  # (server, caller) -> result ids
    blobs: dict[tuple[str, str], set[str]] = field(default_factory=dict)  # (server, caller) -> their blob ids
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, server: str, caller: str, uid: str, blobs: Iterable[str]) -> None:
        with self.lock:
            self.results.setdefault((server, caller), set()).add(uid)
            self.blobs.setdefault((server, caller), set()).update(blobs)

    def has(self, server: str, caller: str, uid: str) -> bool:
        with self.lock:
            return uid in self.results.get((server, caller), set())

    def has_blob(self, server: str, caller: str, uid: str) -> bool:
        with self.lock:
            return uid in self.blobs.get((server, caller), set())


_granted = _Granted()


def _key(call: Call) -> tuple[str, str]:
    return str(call.server.id.no_dash), str(call.caller.verify_key)


# ---- lookups with the server's rights ----------------------------------------------------------------


def _uid_hex(value: Any) -> str | None:
    """The hex of a UID (or LineageID) given as an argument; None for anything else."""
    from syft.types.uid import UID

    if isinstance(value, UID):
        return str(value.id.no_dash) if hasattr(value, "id") and isinstance(value.id, UID) else str(value.no_dash)
    return None


def _assets(call: Call) -> dict[str, tuple[str, Any]]:
    """This site's assets: action id hex -> (dataset name, asset)."""
    datasets = call.server.services.dataset.stash.get_all(credentials=call.server.verify_key).unwrap()
    found = {}
    for dataset in datasets:
        if getattr(dataset, "to_be_deleted", False):
            continue
        for asset in dataset.asset_list:
            found[str(asset.action_id.no_dash)] = (str(dataset.name), asset)
    return found


def _asset_id_of(call: Call, dataset: str) -> str | None:
    return next((uid for uid, (name, asset) in _assets(call).items() if name == dataset and asset.name == ASSET), None)


def _owns_action_object(call: Call, uid_hex: str) -> bool:
    from syft.service.action.action_permissions import ActionObjectPermission, ActionPermission
    from syft.types.uid import UID

    permission = ActionObjectPermission(uid=UID(uid_hex), credentials=call.caller.verify_key,
                                        permission=ActionPermission.OWNER)
    return bool(call.server.services.action.stash.has_permission(permission))


def _action_exists(call: Call, uid_hex: str) -> bool:
    from syft.types.uid import UID

    return bool(call.server.services.action.stash.exists(credentials=call.server.verify_key, uid=UID(uid_hex)))


def _blob_entry(call: Call, uid_hex: str) -> Any | None:
    from syft.types.errors import SyftException
    from syft.types.uid import UID

    try:
        return call.server.services.blob_storage.stash.get_by_uid(call.server.verify_key, uid=UID(uid_hex)).unwrap()
    except SyftException:
        return None


def _user_code(call: Call, uid_hex: str) -> Any:
    from syft.types.errors import SyftException
    from syft.types.uid import UID

    try:
        return call.server.services.user_code.stash.get_by_uid(call.server.verify_key, uid=UID(uid_hex)).unwrap()
    except SyftException:
        raise GateRefusal(f"no code {uid_hex[:12]} on this site") from None


def _code_exists(call: Call, uid_hex: str) -> bool:
    try:
        _user_code(call, uid_hex)
    except GateRefusal:
        return False
    return True


def _own_code(call: Call, value: Any) -> Any:
    uid = _uid_hex(value)
    if uid is None:
        raise GateRefusal(f"a code id must be a UID, got {type(value).__name__}")
    code = _user_code(call, uid)
    if code.user_verify_key != call.caller.verify_key:
        raise GateRefusal(f"code {uid[:12]} is not yours")
    return code
