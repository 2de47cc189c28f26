"""A site's Ed25519 identity key: it signs the site's secure-sum round keys and survivor lists.

The private half stays in ``<data-dir>/secrets/identity_key`` (0600); the public half is what the
other sites' admins pin in the federation roster (Bonawitz et al. 2017, §6.2 assume such a PKI).
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from policies.durable import read_json, write_json_atomic

IDENTITY_FILE = Path("secrets") / "identity_key"


def create_identity_key(data_dir: Path) -> None:
    path = Path(data_dir) / IDENTITY_FILE
    if path.exists():
        raise FileExistsError(f"{path} already holds this site's identity key: it is never replaced")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    private = Ed25519PrivateKey.generate().private_bytes_raw().hex()
    write_json_atomic(path, {"ed25519_private": private}, mode=0o600)


def load_identity_key(data_dir: Path) -> Ed25519PrivateKey:
    raw = read_json(Path(data_dir) / IDENTITY_FILE)["ed25519_private"]
    return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(raw))


def identity_public_hex(data_dir: Path) -> str:
    return load_identity_key(data_dir).public_key().public_bytes_raw().hex()
