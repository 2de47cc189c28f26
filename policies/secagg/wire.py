"""Strict readers for wire dictionaries (every message from another party is untrusted).

Messages cross syft as plain values: ``str``, ``int``, ``list``, ``dict`` and, for the one large
vector, ``bytes``. Small binary fields travel as standard base64 with padding. The readers here
check exact keys, exact types (``bool`` is refused where an ``int`` is expected, because
``isinstance(True, int)`` holds) and exact lengths, and name the field and the fix in the error.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from typing import Any

from policies.secagg.errors import SecAggProtocolError

# Site ids are short, lower-case and printable so they can appear in error messages and file names.
SITE_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
# Session ids name one run of the protocol (e.g. "run-7f3a/round-12"); they are bound into every
# signature and key derivation, so a message from another session cannot be replayed into this one.
SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,199}")


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def fields(obj: object, *, kind: str, keys: tuple[str, ...]) -> Mapping[str, Any]:
    """Check that ``obj`` is a dict with exactly ``keys`` (and ``type == kind`` when listed)."""
    if not isinstance(obj, dict):
        raise SecAggProtocolError(f"{kind}: expected a dict, got {type(obj).__name__}; send msg.to_wire()")
    missing = sorted(set(keys) - set(obj))
    extra = sorted(set(obj) - set(keys))
    if missing or extra:
        raise SecAggProtocolError(
            f"{kind}: missing fields {missing} and unexpected fields {extra}; send exactly {sorted(keys)}"
        )
    if "type" in keys and obj["type"] != kind:
        raise SecAggProtocolError(
            f"{kind}: type is {obj['type']!r}, expected {kind!r}: wrong message for this stage"
        )
    return obj


def read_str(obj: Mapping[str, Any], key: str, *, kind: str, pattern: re.Pattern[str] | None = None) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise SecAggProtocolError(f"{kind}.{key}: expected a str, got {type(value).__name__}")
    if pattern is not None and not pattern.fullmatch(value):
        raise SecAggProtocolError(f"{kind}.{key}: {value!r} does not match {pattern.pattern}")
    return value


def read_int(obj: Mapping[str, Any], key: str, *, kind: str) -> int:
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise SecAggProtocolError(f"{kind}.{key}: expected an int, got {type(value).__name__} {value!r}")
    return value


def read_list(obj: Mapping[str, Any], key: str, *, kind: str) -> list[Any]:
    value = obj[key]
    if not isinstance(value, list):
        raise SecAggProtocolError(f"{kind}.{key}: expected a list, got {type(value).__name__}")
    return value


def read_b64(obj: Mapping[str, Any], key: str, *, kind: str, length: int) -> bytes:
    """Decode a canonical base64 field of exactly ``length`` bytes."""
    text = read_str(obj, key, kind=kind)
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise SecAggProtocolError(
            f"{kind}.{key}: not valid base64 ({exc}); encode bytes with base64"
        ) from exc
    if b64encode(data) != text:
        raise SecAggProtocolError(
            f"{kind}.{key}: non-canonical base64; encode with padding and no whitespace"
        )
    check_bytes(data, kind=kind, key=key, length=length)
    return data


def check_bytes(value: object, *, kind: str, key: str, length: int) -> bytes:
    """Refuse anything but ``bytes`` of exactly ``length`` (a truncated or padded field)."""
    if not isinstance(value, bytes):
        raise SecAggProtocolError(f"{kind}.{key}: expected bytes, got {type(value).__name__}")
    if len(value) != length:
        raise SecAggProtocolError(
            f"{kind}.{key}: expected {length} bytes, got {len(value)} (truncated or padded); resend the message"
        )
    return value


def check_site_id(value: object, *, kind: str, key: str) -> str:
    if not isinstance(value, str) or not SITE_ID_PATTERN.fullmatch(value):
        raise SecAggProtocolError(
            f"{kind}.{key}: {value!r} is not a site id (lower-case letters, digits, '.', '_', '-'; at most 63)"
        )
    return value


def check_session_id(value: object, *, kind: str, key: str = "session_id") -> str:
    if not isinstance(value, str) or not SESSION_ID_PATTERN.fullmatch(value):
        raise SecAggProtocolError(
            f"{kind}.{key}: {value!r} is not a session id (letters, digits, '._:/-'; at most 200 characters)"
        )
    return value
