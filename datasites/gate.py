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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from datasites.guard import GuardedSite, site_for
from policies.approvals import ApprovalRegistry
from policies.audit import ApiCallRefused, AuditLog
from policies.review import code_hash, printable
from policies.submission import SubmissionError, canonical_plan, function_name

logger = logging.getLogger("fedsite.gate")
ASSET = "reviews"  # the one asset name of a Fedsite dataset (datasites.admin.PRIVATE_ASSET)
MAX_INPUT_BYTES = 256 * 2**20  # one call input (stage or message: the global model of a full MiniLM is ~121 MB)
MAX_REASON_CHARS = 2000
_FUNCTION_NAME = re.compile(r"fedsite_run_[0-9a-f]{8,32}")
_PROTOCOL_KWARGS = frozenset({"communication_protocol"})  # syft's client adds it to every call
_install_lock = threading.Lock()
_installed = False


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


# ---- argument checks ---------------------------------------------------------------------------------


def no_arguments(call: Call) -> None:
    call.bind()


def _an_asset(call: Call) -> None:
    uid = _uid_hex(call.bind("uid")["uid"])
    if uid is None or uid not in _assets(call):
        raise GateRefusal("only an asset of this site's datasets may be named here")


def _own_result(call: Call) -> None:
    bound = call.bind("uid", optional=("resolve_nested",))
    uid = _uid_hex(bound["uid"])
    if not isinstance(bound.get("resolve_nested", True), bool):
        raise GateRefusal("resolve_nested must be a bool")
    if uid is None or not _granted.has(*_key(call), uid):
        raise GateRefusal("only the output of your own authorised call may be read here "
                          "(private data, other users' objects and your uploads are not readable)")


def _own_password_only(call: Call) -> None:
    """``user.update`` of the caller itself, changing nothing but the password, which must be strong."""
    from syft.service.user.user import UserUpdate
    from syft.types.syft_object import Empty

    from datasites.errors import FedsiteError
    from datasites.secrets import check_password_strength

    bound = call.bind("uid", "user_update")
    if _uid_hex(bound["uid"]) != call.caller.user_id:
        raise GateRefusal("a researcher may update only its own account")
    update = bound["user_update"]
    if type(update) is not UserUpdate:
        raise GateRefusal("user_update must be syft's UserUpdate")
    changed = {name for name in UserUpdate.model_fields if getattr(update, name, Empty) not in (Empty, None)}
    if changed != {"password"}:  # syft's update takes the password alone (it has no field password_verify)
        raise GateRefusal(f"a researcher may change only its password here, not {sorted(changed - {'password'})}"
                          " (e-mail, name, role and keys are fixed by the site's admin)")
    try:
        check_password_strength(str(update.password), what="new password")
    except FedsiteError as exc:
        raise GateRefusal(str(exc)) from None


def _allocate(call: Call) -> None:
    """Blob space for one input of a call: a new id (or the caller's own again), no file-name parts, bounded."""
    from syft.types.blob_storage import CreateBlobStorageEntry

    entry = call.bind("obj")["obj"]
    if type(entry) is not CreateBlobStorageEntry:
        raise GateRefusal("obj must be syft's CreateBlobStorageEntry")
    if entry.extensions or entry.mimetype != "bytes":
        raise GateRefusal("a call input is plain bytes: no file extensions or mimetype")  # they become the file name
    if entry.type_ not in (str, dict):
        raise GateRefusal(f"only a str or dict input may be stored, not {getattr(entry.type_, '__name__', entry.type_)}")
    if isinstance(entry.file_size, bool) or not isinstance(entry.file_size, int) or not 0 < entry.file_size <= MAX_INPUT_BYTES:
        raise GateRefusal(f"file_size must be an int in 1..{MAX_INPUT_BYTES}")
    existing = _blob_entry(call, str(entry.id.no_dash))
    if existing is not None and existing.uploaded_by != call.caller.verify_key:
        raise GateRefusal("that blob id is taken")


def _write(call: Call) -> None:
    bound = call.bind("uid", "data")
    uid, data = _uid_hex(bound["uid"]), bound["data"]
    entry = _blob_entry(call, uid) if uid else None
    if entry is None or entry.uploaded_by != call.caller.verify_key:
        raise GateRefusal("only a blob you allocated may be written")
    if not isinstance(data, bytes) or len(data) > entry.file_size:
        raise GateRefusal(f"data must be at most the {entry.file_size} bytes allocated")


def _read(call: Call) -> None:
    uid = _uid_hex(call.bind("uid")["uid"])
    entry = _blob_entry(call, uid) if uid else None
    if entry is None:
        raise GateRefusal("no such blob")
    if entry.uploaded_by == call.caller.verify_key or _granted.has_blob(*_key(call), str(uid)):
        return
    if uid in {blob for asset in _assets(call) for blob in _blob_ids(call, asset, mock_only=True)}:
        return
    raise GateRefusal("only blobs of your own inputs and outputs, or of a mock twin, may be read")


def _blob_ids(call: Call, uid_hex: str, *, mock_only: bool = False) -> list[str]:
    """The blob ids behind a stored object: of its mock only (an asset), or of all its parts (an output)."""
    from syft.types.errors import SyftException
    from syft.types.uid import UID

    try:
        obj = call.server.services.action.stash.get(credentials=call.server.verify_key, uid=UID(uid_hex)).unwrap()
    except SyftException:
        return []
    parts = [getattr(obj, "mock_obj", None)] if mock_only else [obj, getattr(obj, "private_obj", None),
                                                                getattr(obj, "mock_obj", None)]
    blobs = [getattr(part, "syft_blob_storage_entry_id", None) for part in parts]
    return [str(blob.no_dash) for blob in blobs if blob is not None]


def _set(call: Call) -> None:
    """Upload of one plain input of a call: a new object, a str or dict, stored in the caller's own blob."""
    from syft.service.action.action_object import ActionObject
    from syft.types.twin_object import TwinObject

    bound = call.bind("action_object", optional=("add_storage_permission",))
    obj = bound["action_object"]
    if bound.get("add_storage_permission", True) is not True:
        raise GateRefusal("add_storage_permission, if given, is True (syft's default)")
    if not isinstance(obj, ActionObject) or isinstance(obj, TwinObject):
        raise GateRefusal("action_object must be a plain ActionObject")
    if obj.syft_action_data_type not in (str, dict):
        raise GateRefusal(f"only a str or dict input may be uploaded, not {getattr(obj.syft_action_data_type, '__name__', '?')}")
    uid = str(obj.id.id.no_dash) if hasattr(obj.id, "id") else str(obj.id.no_dash)
    if _action_exists(call, uid):
        raise GateRefusal("that object id is taken: an upload creates a new object")
    if obj.syft_action_saved_to_blob_store:
        blob = obj.syft_blob_storage_entry_id
        entry = _blob_entry(call, str(blob.no_dash)) if blob is not None else None
        if entry is None or entry.uploaded_by != call.caller.verify_key:
            raise GateRefusal("the object's data must be in a blob you allocated")
    elif not isinstance(obj.syft_action_data_cache, str | dict):
        raise GateRefusal("only a str or dict input may be uploaded")


def _submit(call: Call) -> None:
    """A code request: the canonical Fedsite round function with syft's canonical policies, nothing else."""
    from syft.service.code.user_code import SubmitUserCode
    from syft.service.policy.policy import MixedInputPolicy, OutputPolicyExecuteCount

    bound = call.bind("code", optional=("reason",))
    code = bound["code"]
    if type(code) is not SubmitUserCode:
        raise GateRefusal("code must be syft's SubmitUserCode")
    reason = bound.get("reason", "")
    if reason is not None and (not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS):
        raise GateRefusal(f"reason must be a str of at most {MAX_REASON_CHARS} characters")
    try:
        plan = canonical_plan(str(code.code))
    except SubmissionError as exc:
        raise GateRefusal(f"only the canonical Fedsite round function may be submitted: {exc}") from None
    if code.func_name != function_name(str(plan["run_id"])):
        raise GateRefusal("the function's name must be the plan's (fedsite_<run id>)")
    if list(code.input_kwargs) != ["data", "stage", "message"]:
        raise GateRefusal("the function must take exactly data, stage and message")
    if code.input_policy_type is not MixedInputPolicy or code.output_policy_type is not OutputPolicyExecuteCount:
        raise GateRefusal("the policies must be syft's MixedInputPolicy and OutputPolicyExecuteCount (no custom policy code)")
    if code.worker_pool_name is not None:
        raise GateRefusal("no worker pool: the site runs approved code in its own process")
    if code.id is not None and _code_exists(call, str(code.id.no_dash)):
        raise GateRefusal("that code id is taken: a submission creates new code")
    _check_input_binding(call, code.input_policy_init_kwargs, plan)


def _check_input_binding(call: Call, init_kwargs: Any, plan: Mapping[str, Any]) -> None:
    """``data`` bound to this site's asset of the planned dataset; ``stage`` and ``message`` to plain values."""
    from syft.service.policy.policy import Matches, UserOwned

    if not isinstance(init_kwargs, dict) or len(init_kwargs) != 1:
        raise GateRefusal("the input policy must bind this one site")
    ((identity, bound),) = init_kwargs.items()
    if getattr(identity, "server_id", None) != call.server.id:
        raise GateRefusal("the input policy must bind this site")
    if not isinstance(bound, dict) or set(bound) != {"data", "stage", "message"}:
        raise GateRefusal("the function must take exactly data, stage and message")
    asset_id = _asset_id_of(call, str(plan.get("dataset")))
    data = bound["data"]
    if asset_id is None or type(data) is not Matches or _uid_hex(data.val) != asset_id:
        raise GateRefusal(f"`data` must be this site's asset of dataset {plan.get('dataset')!r}")
    for name, kind in (("stage", str), ("message", dict)):
        if type(bound[name]) is not UserOwned or bound[name].type is not kind:
            raise GateRefusal(f"`{name}` must be a value of type {kind.__name__} that you pass")


def _func_name(call: Call) -> None:
    name = call.bind("service_func_name")["service_func_name"]
    if not isinstance(name, str) or not _FUNCTION_NAME.fullmatch(name):
        raise GateRefusal("only a Fedsite round function name (fedsite_run_<hex>) may be looked up")


def _call(call: Call) -> None:
    """Run approved code: the caller's own, approved here for the caller, on the approved dataset's asset."""
    bound = call.bind("uid", "data", "stage", "message")
    code = _own_code(call, bound["uid"])
    approval = ApprovalRegistry(call.site.data_dir).find(code_hash(code.raw_code), researcher=str(call.caller.user_id))
    if approval is None:
        raise GateRefusal(f"code {code_hash(code.raw_code)[:12]} has no Fedsite approval here for you "
                          "(unapproved, changed after approval, or revoked): submit it for review")
    data_id = _uid_hex(getattr(bound["data"], "action_id", None)) or _uid_hex(getattr(bound["data"], "id", None))
    if data_id is None or data_id != _asset_id_of(call, approval.dataset):
        raise GateRefusal(f"`data` must be the asset of dataset {approval.dataset!r} that the code was approved for")
    for name in ("stage", "message"):
        uid = _uid_hex(getattr(bound[name], "id", None))
        if uid is None or not _owns_action_object(call, uid):
            raise GateRefusal(f"`{name}` must be an object you uploaded")


def _resolve_link(call: Call) -> None:
    """``request.code`` and its status (with the denial reason): records of the caller's own requests only.

    syft resolves a link to any record of any service the caller can read; users' records are readable by
    all, with their private signing keys, so every other kind of link is refused.
    """
    from syft.service.code.status_service import UserCodeStatusService
    from syft.service.code.user_code import UserCode, UserCodeStatusCollection
    from syft.service.code.user_code_service import UserCodeService
    from syft.store.linked_obj import LinkedObject
    from syft.types.errors import SyftException

    link = call.bind("linked_obj")["linked_obj"]
    if type(link) is not LinkedObject or link.server_uid != call.server.id:
        raise GateRefusal("linked_obj must be a LinkedObject of this site")
    if link.object_type is UserCode and link.service_type is UserCodeService:
        _own_code(call, link.object_uid)
        return
    if link.object_type is UserCodeStatusCollection and link.service_type is UserCodeStatusService:
        try:
            status = call.server.services.user_code_status.stash.get_by_uid(call.server.verify_key,
                                                                             uid=link.object_uid).unwrap()
        except SyftException:
            raise GateRefusal("no such code status") from None
        if status.user_verify_key == call.caller.verify_key:
            return
    raise GateRefusal("only the code of your own request and its status may be resolved")


# ---- what syft answers -------------------------------------------------------------------------------


def _value(result: Any) -> Any:
    return getattr(result, "value", None)


def _record_result(call: Call, result: Any) -> Any:
    obj = _value(result)
    uid = _uid_hex(getattr(obj, "id", None))
    if uid is not None:  # its blobs are looked up once, here, not at every read
        _granted.add(*_key(call), uid, _blob_ids(call, uid))
    return result


def _only_own(attribute: str) -> After:
    def keep(call: Call, result: Any) -> Any:
        value = _value(result)
        if isinstance(value, list):
            result.value = [item for item in value if getattr(item, attribute, None) == call.caller.verify_key]
        return result

    return keep


def _without_private_sizes(call: Call, result: Any) -> Any:
    """syft's client stores each dataset's size in MB, computed from the private data at upload: a researcher
    would learn the partition's size from it, which the mock twin keeps to public defaults."""
    for dataset in _value(result) or ():
        if hasattr(dataset, "mb_size"):
            dataset.mb_size = None
    return result


ALLOWLIST: dict[str, Allowed] = {
    "metadata.get_metadata": Allowed("the client reads the site's public metadata at login and before each upload",
                                     no_arguments),
    "user.get_current_user": Allowed("the client reads its own account at login", no_arguments),
    "user.update": Allowed("change its own password (as strong as at creation); nothing else of its account",
                           _own_password_only),
    "dataset.get_all": Allowed("list the site's datasets with their assets' descriptions and mock twins", no_arguments,
                               _without_private_sizes),
    "action.get_mock": Allowed("`asset.mock`: the mock twin of an asset of this site", _an_asset),
    "blob_storage.allocate": Allowed("space for one input of a call (str or dict), never a file name", _allocate),
    "blob_storage.write_to_disk": Allowed("write the bytes of an input into space the caller allocated", _write),
    "blob_storage.read": Allowed("read the data of the caller's own inputs and outputs, or of a mock twin", _read),
    "action.set": Allowed("upload one plain input (str or dict) of a call as a new object", _set),
    "code.request_code_execution": Allowed("submit the canonical Fedsite round function, with syft's canonical "
                                           "policies bound to this site's asset, for the admin's review", _submit),
    "code.get_by_service_func_name": Allowed("look up its own request of a run (submitting twice is a no-op)",
                                             _func_name, _only_own("user_verify_key")),
    "request.get_all": Allowed("read its own requests and their status and reasons", no_arguments,
                               _only_own("requesting_user_verify_key")),
    "notifications.resolve_object": Allowed("`request.code` and its status with the denial reason, of its own "
                                            "requests only", _resolve_link),
    "code.call": Allowed("run Fedsite-approved code with the asset it was approved for and its own inputs",
                         _call, _record_result),
    "action.get": Allowed("read the output of its own authorised call", _own_result),
    "action.has_storage_permission": Allowed("the client asks where the output of its own call is stored", _own_result),
}


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
