"""What the secure-sum messages (``policies.secagg.messages``) share: sizes, signed transcripts, list checks."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from policies.secagg.crypto import NONCE_BYTES, TAG_BYTES, transcript
from policies.secagg.errors import SecAggProtocolError
from policies.secagg.shamir import SHARE_BYTES
from policies.secagg.wire import check_site_id, read_list

SHARE_PAIR_BYTES = 2 * SHARE_BYTES  # plaintext of e_{u,v}: share of s_u^SK || share of b_u
SEALED_SHARES_BYTES = NONCE_BYTES + SHARE_PAIR_BYTES + TAG_BYTES
_Item = TypeVar("_Item")


def advertise_transcript(
    digest: bytes, sender: str, cipher_public_key: bytes, mask_public_key: bytes
) -> bytes:
    """What sigma_u signs (Figure 4, Round 0): the two round public keys, bound to site and session."""
    return transcript(
        "secagg/advertise-keys",
        session=digest.hex(),
        site=sender,
        cipher_public_key=cipher_public_key.hex(),
        mask_public_key=mask_public_key.hex(),
    )


def survivors_transcript(digest: bytes, signer: str, survivors: tuple[str, ...]) -> bytes:
    """What sigma'_u signs (Figure 4, Round 3 ConsistencyCheck): the survivor list U3 of the session."""
    return transcript("secagg/survivors", session=digest.hex(), site=signer, survivors=list(survivors))


def _check_items(items: object, item_type: type, *, kind: str, key: str) -> None:
    if not isinstance(items, tuple) or not all(isinstance(item, item_type) for item in items):
        raise SecAggProtocolError(f"{kind}.{key}: expected a tuple of {item_type.__name__}")


def _read_items(
    raw: Mapping[str, Any], key: str, parse: Callable[[object], _Item], *, kind: str
) -> tuple[_Item, ...]:
    return tuple(parse(item) for item in read_list(raw, key, kind=kind))


def _check_site_list(value: object, *, kind: str, key: str) -> None:
    if not isinstance(value, tuple):
        raise SecAggProtocolError(f"{kind}.{key}: expected a tuple of site ids")
    for site in value:
        check_site_id(site, kind=kind, key=key)
