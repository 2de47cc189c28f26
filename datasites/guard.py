"""The execution guard a Fedsite datasite installs around syft's user-code execution at start-up.

syft 0.9.5's own approval and run limits are not enough (DESIGN.md, "Enforcement"): this wraps
``ActionService._user_code_execute``, the one place where approved code meets private data, both in
blocking calls and in forked job workers (they inherit the wrapped class). Before any code runs it
checks the site's own approval registry for the exact code hash, researcher and dataset, records the
refusal in the site's audit log, and refuses by raising; an authorised run gets an
``ExecutionContext`` that the site's runtime in ``policies`` reads.

Several sites can live in one process (tests, the in-process demo); the guard finds the site by
the executing server's id and refuses code on a server it does not know (fail closed).
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from policies.approvals import ApprovalRegistry, ExecutionContext, authorised
from policies.audit import AuditLog, ExecutionRefused
from policies.review import code_hash

logger = logging.getLogger("fedsite.guard")
_sites: dict[str, GuardedSite] = {}
_install_lock = threading.Lock()
_installed = False


@dataclass(frozen=True)
class GuardedSite:
    name: str
    data_dir: Path
    device: str = "cpu"  # where approved rounds train: the site's hardware, the owner's choice


def register_site(server_uid: str, *, name: str, data_dir: Path, device: str = "cpu") -> None:
    """Put the site served by ``server_uid`` under the guard and the API gate (installed once per process)."""
    from datasites.syft_patches import install

    install()  # the guard and the gate among them: no site is registered, so served, without both
    _sites[server_uid] = GuardedSite(name=name, data_dir=Path(data_dir), device=device)


def unregister_site(server_uid: str) -> None:
    _sites.pop(server_uid, None)


def site_for(server_uid: str) -> GuardedSite | None:
    """The registered site served by ``server_uid``, if any."""
    return _sites.get(server_uid)


def is_guard_installed() -> bool:
    from syft.service.action.action_service import ActionService

    return getattr(ActionService._user_code_execute, "__fedsite_guard__", False) is True


def install_guard() -> None:
    global _installed
    with _install_lock:
        if _installed:
            return
        from syft.service.action.action_service import ActionService

        original = ActionService._user_code_execute

        @functools.wraps(original)
        def guarded(self: Any, context: Any, code_item: Any, kwargs: dict[str, Any], result_id: Any = None) -> Any:
            execution = authorise(context, code_item, kwargs)
            try:
                with authorised(execution):
                    return original(self, context, code_item, kwargs, result_id)
            finally:  # reached only for an authorised call: a refused one raised above and deletes nothing
                discard_call_inputs(self, context, kwargs)

        guarded.__fedsite_guard__ = True  # type: ignore[attr-defined]
        ActionService._user_code_execute = guarded
        _installed = True


CALL_INPUTS = ("stage", "message")  # the researcher's per-call values of the canonical round function


def discard_call_inputs(action_service: Any, context: Any, kwargs: dict[str, Any]) -> None:
    """Delete the researcher's per-call inputs once an authorised call is over.

    syft keeps every uploaded argument, and puts those over 1 MB (a global model) in blob storage
    that it never cleans up (syft 0.9.5 keeps every blob); over many rounds that fills the site's
    disk. The inputs are not needed after the call: the site's own state lives in its data dir.

    The deletion runs with the server's rights, so it is confined to what the caller could delete
    itself: only objects the caller owns (syft's OWNER permission for the caller's key). A UID of
    someone else's object (another dataset's private asset, another researcher's input) passed as
    ``stage`` or ``message`` is left alone.
    """
    from syft.service.action.action_permissions import ActionObjectPermission, ActionPermission
    from syft.service.context import AuthedServiceContext
    from syft.service.user.user_roles import ServiceRole
    from syft.types.errors import SyftException
    from syft.types.uid import UID

    admin = AuthedServiceContext(server=context.server, credentials=context.server.verify_key, role=ServiceRole.ADMIN)
    for name in CALL_INPUTS:
        uid = kwargs.get(name)
        if not isinstance(uid, UID):
            continue
        owned = ActionObjectPermission(uid=uid, credentials=context.credentials, permission=ActionPermission.OWNER)
        if not action_service.stash.has_permission(owned):
            logger.warning("kept the %s input %s of a call: the caller does not own it", name, uid)
            continue
        try:
            action_service.delete(admin, uid)
        except SyftException as exc:
            logger.warning("could not delete the %s input %s of a call: %s", name, uid, exc)


def _refuse(message: str) -> Exception:
    from syft.types.errors import SyftException

    return SyftException(public_message=message)


def authorise(context: Any, code_item: Any, kwargs: dict[str, Any]) -> ExecutionContext:
    """The site's decision on one execution; raises (before any code runs) unless it is approved."""
    site = _sites.get(str(context.server.id.no_dash))
    if site is None:
        raise _refuse("refused: this server is not a registered Fedsite site (the guard fails closed)")
    user = context.server.services.user.get_current_user(context)
    researcher, email = str(user.id.no_dash), str(user.email)
    digest = code_hash(code_item.raw_code)
    approval = ApprovalRegistry(site.data_dir).find(digest, researcher=researcher)
    audit = AuditLog(site.data_dir)
    request_id = str(code_item.id.no_dash)
    if approval is None:
        reason = (f"{site.name}: refused: code {digest[:12]} has no Fedsite approval for {email} (id {researcher}) "
                  "(unapproved, changed after approval, or revoked); submit it for review")
        audit.record(ExecutionRefused(request_id=request_id, code_hash=digest, researcher=researcher,
                                      researcher_email=email, dataset="?", round=None, reason=reason))
        raise _refuse(reason)
    return ExecutionContext(site=site.name, data_dir=site.data_dir, approval=approval, researcher=researcher,
                            researcher_email=email, device=site.device)
