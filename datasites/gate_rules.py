"""The API gate's allowlist: every service path a researcher may call, why, and how its arguments are checked.

A path not in ``ALLOWLIST`` is refused (default deny, ``datasites.gate``). Each rule's check raises
``GateRefusal`` unless the arguments are the legitimate use of the path: approved code only, with the
asset it was approved for, and objects the caller created; a rule's ``after`` filters what syft answers
to the caller's own records. docs/security.md lists the same paths with the same reasons (tested).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from datasites.gate_call import (
    After,
    Allowed,
    Call,
    GateRefusal,
    _action_exists,
    _asset_id_of,
    _assets,
    _blob_entry,
    _code_exists,
    _granted,
    _key,
    _own_code,
    _owns_action_object,
    _uid_hex,
)
from policies.approvals import ApprovalRegistry
from policies.review import code_hash
from policies.submission import SubmissionError, canonical_plan, function_name

MAX_INPUT_BYTES = 256 * 2**20  # one call input (stage or message: the global model of a full MiniLM is ~121 MB)
MAX_REASON_CHARS = 2000
_FUNCTION_NAME = re.compile(r"fedsite_run_[0-9a-f]{8,32}")


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
