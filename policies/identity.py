"""Identities a site relies on: its own Ed25519 identity key, and its researchers' immutable ids.

The site's private key stays in ``<data-dir>/secrets/identity_key`` (0600); the public half is what the
other sites' admins pin (``fedsite admin peers add``) and what rosters carry (Bonawitz et al. 2017,
§6.2 assume such a PKI).

A researcher is keyed by syft's user id, fixed when the admin creates the account (``fedsite admin
add-researcher`` prints it). Never by e-mail: syft 0.9.5 lets a user change its own e-mail, so a ledger
keyed by e-mail could be left behind by renaming the account (``Rita@uni.org`` after ``rita@uni.org``).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from policies.durable import private_dirs, read_json, write_json_atomic

IDENTITY_FILE = Path("secrets") / "identity_key"


def create_identity_key(data_dir: Path) -> None:
    path = Path(data_dir) / IDENTITY_FILE
    if path.exists():
        raise FileExistsError(f"{path} already holds this site's identity key: it is never replaced")
    private_dirs(path.parent)
    private = Ed25519PrivateKey.generate().private_bytes_raw().hex()
    write_json_atomic(path, {"ed25519_private": private}, mode=0o600)


def load_identity_key(data_dir: Path) -> Ed25519PrivateKey:
    raw = read_json(Path(data_dir) / IDENTITY_FILE)["ed25519_private"]
    return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(raw))


def identity_public_hex(data_dir: Path) -> str:
    return load_identity_key(data_dir).public_key().public_bytes_raw().hex()


_RESEARCHER_ID = re.compile(r"[0-9a-f]{32}")


def check_researcher_id(value: object) -> str:
    """A researcher id is syft's user id: 32 lowercase hex digits (``UID.no_dash``)."""
    if not isinstance(value, str) or not _RESEARCHER_ID.fullmatch(value):
        raise ValueError(f"a researcher id is a syft user id of 32 lowercase hex digits, got {value!r}")
    return value


def key_fingerprint(public_hex: str) -> str:
    """A short, comparable fingerprint of a pinned public key: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(bytes.fromhex(public_hex)).hexdigest()[:16]


# Ed25519 (RFC 8032, §5.1): the curve -x^2 + y^2 = 1 + d x^2 y^2 over GF(p).
_P = 2**255 - 19
_D = (-121665 * pow(121666, -1, _P)) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


def _decode_point(raw: bytes) -> tuple[int, int] | None:
    """The affine point of a 32-byte encoding (RFC 8032, §5.1.3), or None if it encodes none or not canonically."""
    y = int.from_bytes(raw, "little") & ((1 << 255) - 1)
    sign = raw[31] >> 7
    if y >= _P:
        return None
    u, v = (y * y - 1) % _P, (_D * y * y + 1) % _P
    x = (u * pow(v, 3, _P) * pow(u * pow(v, 7, _P), (_P - 5) // 8, _P)) % _P
    if (v * x * x - u) % _P != 0:
        x = (x * _SQRT_M1) % _P
        if (v * x * x - u) % _P != 0:
            return None
    if x == 0 and sign:
        return None
    return (_P - x if x & 1 != sign else x), y


def _double(point: tuple[int, int]) -> tuple[int, int]:
    x, y = point
    denominator = _D * x * x * y * y
    return ((2 * x * y * pow(1 + denominator, -1, _P)) % _P, ((y * y + x * x) * pow(1 - denominator, -1, _P)) % _P)


def check_ed25519_public_key(raw: bytes) -> bytes:
    """Refuse what is not a usable Ed25519 public key: not 32 bytes, not a canonical curve point, or a point of
    small order (the identity and its 7 torsion companions). ``cryptography`` loads all of these; under a
    small-order key a signature such as R = identity, S = 0 verifies for many messages, so anyone could sign
    as the roster entry that carries it."""
    if not isinstance(raw, bytes) or len(raw) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    point = _decode_point(raw)
    if point is None:
        raise ValueError("not an Ed25519 public key: no canonical curve point has this encoding")
    for _ in range(3):  # [8]P is the identity exactly when P has small order
        point = _double(point)
    if point == (0, 1):
        raise ValueError("a small-order Ed25519 point is not a usable public key")
    return raw
