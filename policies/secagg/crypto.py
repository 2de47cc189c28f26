"""Cryptographic primitives of the secure sum, all from ``cryptography`` (OpenSSL).

* Key agreement KA (Bonawitz et al. 2017, §3, "Key Agreement"): X25519, then HKDF-SHA256 over
  the full 32-byte shared secret, salted with the session digest and labelled with the purpose
  and the two sites, so a key derived for one purpose, pair or round is useless for any other.
* Mask generator PRG (§3, "Pseudorandom Generator"; §4, "Masking with One-Time Pads"): the
  AES-128-CTR keystream whose key and initial counter block are the two halves of a 32-byte HKDF
  output, i.e. the whole derived secret keys the generator (never a 32-bit seed). OpenSSL's AES-NI
  path writes it with ``update_into`` into a preallocated buffer at several GB/s per core.
* Authenticated encryption AE (§3) of shares in transit: ChaCha20-Poly1305 with a random 96-bit
  nonce (a re-run after a crash may encrypt again under the same key; random nonces never repeat).
* Signatures SIG (§3; the active-adversary variant of Figure 4): Ed25519 with each site's
  identity key, which the admins pin in the roster, over canonical JSON transcripts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from policies.durable import canonical_json
from policies.secagg.errors import SecAggProtocolError, SecAggSignatureError

KEY_BYTES = 32  # X25519 / Ed25519 public and private keys, seeds, derived secrets
SIGNATURE_BYTES = 64  # Ed25519
NONCE_BYTES = 12  # ChaCha20-Poly1305
TAG_BYTES = 16  # Poly1305
# Keystream chunk: large enough to amortise the OpenSSL call, small enough to stay in L2 cache while
# numpy adds it into the vector (measured on this machine: 4 MiB chunks are ~2x slower than 256 KiB).
MASK_CHUNK_BYTES = 256 * 1024
_ZEROS = memoryview(bytes(MASK_CHUNK_BYTES))
WORD_DTYPES = (np.dtype("<u4"), np.dtype("<u8"))  # little-endian words, the same on every host


def transcript(purpose: str, **values: object) -> bytes:
    """Unambiguous bytes to sign or to use as a label: canonical JSON of the purpose and values."""
    return canonical_json({"purpose": purpose, **values}).encode("utf-8")


def new_secret_key() -> bytes:
    """A fresh X25519 private key (raw 32 bytes) from the OS CSPRNG."""
    return X25519PrivateKey.generate().private_bytes_raw()


def public_key_of(secret_key: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(secret_key).public_key().public_bytes_raw()


def agree(secret_key: bytes, peer_public_key: bytes, *, salt: bytes, info: bytes) -> bytes:
    """KA.agree then HKDF-SHA256: a 32-byte secret shared by the two key owners only (§3)."""
    try:
        peer = X25519PublicKey.from_public_bytes(peer_public_key)
        shared = X25519PrivateKey.from_private_bytes(secret_key).exchange(peer)
    except ValueError as exc:  # wrong length, or a low-order point giving an all-zero secret
        raise SecAggProtocolError(f"key agreement failed ({exc}): the peer's public key is invalid") from exc
    return derive(shared, salt=salt, info=info)


def derive(key_material: bytes, *, salt: bytes, info: bytes) -> bytes:
    """HKDF-SHA256 (RFC 5869) to 32 bytes."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=info).derive(key_material)


def sign(identity_key: Ed25519PrivateKey, message: bytes) -> bytes:
    return identity_key.sign(message)


def identity_public_key(identity_key: Ed25519PrivateKey) -> bytes:
    return identity_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def verify_signature(public_key: bytes, signature: bytes, message: bytes, *, what: str) -> None:
    """Raise ``SecAggSignatureError`` unless ``signature`` is a valid Ed25519 signature of ``message``."""
    if len(signature) != SIGNATURE_BYTES or signature == bytes(SIGNATURE_BYTES):
        raise SecAggSignatureError(f"{what} is unsigned (no {SIGNATURE_BYTES}-byte Ed25519 signature)")
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError) as exc:
        raise SecAggSignatureError(
            f"{what} has a signature that does not verify against the site's pinned identity key: "
            "forged, altered, from another round, or the roster pins a different key"
        ) from exc


def seal(key: bytes, plaintext: bytes, *, associated_data: bytes) -> bytes:
    """AE.enc: nonce || ChaCha20-Poly1305(plaintext), bound to ``associated_data``."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated_data)


def open_sealed(key: bytes, sealed: bytes, *, associated_data: bytes, what: str) -> bytes:
    """AE.dec; a tampered, truncated or misaddressed ciphertext raises (never returns garbage)."""
    nonce, body = sealed[:NONCE_BYTES], sealed[NONCE_BYTES:]
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, body, associated_data)
    except InvalidTag as exc:
        raise SecAggProtocolError(
            f"{what} does not decrypt: altered in transit, addressed to another site, or from another round"
        ) from exc


class Keystream:
    """PRG(seed): the AES-128-CTR keystream keyed by a 32-byte seed, read in word blocks.

    The 16-byte AES key is ``seed[:16]`` and the 16-byte initial counter block ``seed[16:]``, so all
    256 bits of the derived secret select the stream. Each block is written with ``update_into``
    into one preallocated buffer; the returned array is a view of that buffer, valid until the
    next call.
    """

    def __init__(self, seed: bytes) -> None:
        if len(seed) != KEY_BYTES:
            raise SecAggProtocolError(f"a keystream seed must be {KEY_BYTES} bytes, got {len(seed)}")
        cipher = Cipher(algorithms.AES(seed[:16]), modes.CTR(seed[16:]))
        self._encryptor = cipher.encryptor()
        self._buffer = bytearray(MASK_CHUNK_BYTES + 15)  # update_into wants len(data) + block - 1

    def next_words(self, count: int, dtype: np.dtype) -> np.ndarray:
        """The next ``count`` keystream words; ``count * itemsize <= MASK_CHUNK_BYTES``."""
        nbytes = count * dtype.itemsize
        self._encryptor.update_into(_ZEROS[:nbytes], self._buffer)
        return np.frombuffer(self._buffer, dtype=dtype, count=count)


def apply_masks(words: np.ndarray, *, add: Sequence[bytes], subtract: Sequence[bytes]) -> None:
    """In place: words += sum(PRG(s) for s in add) - sum(PRG(s) for s in subtract)  (mod 2^k).

    ``words`` is a contiguous 1-D array of little-endian uint32 (k = 32) or uint64 (k = 64); numpy's
    unsigned arithmetic wraps, which is exactly reduction mod 2^k. The vector is walked once, in
    L2-sized blocks, applying every stream to a block before moving on.
    """
    if words.dtype not in WORD_DTYPES or words.ndim != 1 or not words.flags.c_contiguous:
        raise SecAggProtocolError(
            f"masks apply to a contiguous 1-D <u4 or <u8 array, got {words.dtype} {words.shape}"
        )
    adding = [Keystream(seed) for seed in add]
    subtracting = [Keystream(seed) for seed in subtract]
    per_block = MASK_CHUNK_BYTES // words.itemsize
    for start in range(0, words.size, per_block):
        block = words[start : start + per_block]  # (<= per_block,) view into words
        for stream in adding:
            np.add(block, stream.next_words(block.size, words.dtype), out=block)
        for stream in subtracting:
            np.subtract(block, stream.next_words(block.size, words.dtype), out=block)
