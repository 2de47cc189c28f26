"""Mask seeds of Bonawitz et al. 2017, §4 (shared by the sites, which add masks, and the aggregator,
which removes the ones that do not cancel).

* Self mask p_u = PRG(b_u): hides y_u even from an aggregator that learns every pairwise seed of u
  (it would learn them all if it could make u's peers believe u dropped; §4, "Double-masking").
* Pairwise mask p_{u,v} = Delta_{u,v} PRG(s_{u,v}) with s_{u,v} = KA.agree(s_u^SK, s_v^PK):
  p_{u,v} + p_{v,u} = 0, so the pairwise masks of sites that both survive cancel in the sum.

Both seeds go through HKDF with the session digest as salt and a label naming the purpose and the
sites, so no seed repeats across sessions, pairs or purposes.
"""

from __future__ import annotations

from policies.secagg.context import RoundContext
from policies.secagg.crypto import agree, derive, transcript


def self_mask_seed(context: RoundContext, owner: str, seed: bytes) -> bytes:
    """The PRG seed of p_owner = PRG(b_owner), from the 32-byte Shamir-shared seed b_owner."""
    return derive(seed, salt=context.digest, info=transcript("secagg/self-mask", site=owner))


def pairwise_mask_seed(
    context: RoundContext, own: str, peer: str, own_secret_key: bytes, peer_public_key: bytes
) -> bytes:
    """s_{u,v}: the same 32 bytes for (u, v) and (v, u), since X25519 is symmetric and the label
    lists the pair in roster order."""
    pair = list(context.roster.ordered((own, peer)))
    return agree(
        own_secret_key,
        peer_public_key,
        salt=context.digest,
        info=transcript("secagg/pairwise-mask", sites=pair),
    )
