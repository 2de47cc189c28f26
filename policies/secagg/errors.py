"""Errors of the secure-sum protocol.

Every error says what was wrong and how to fix it. Validation errors are raised before any state
is changed, so a caller may drop the bad message and carry on with a good one.
"""

from __future__ import annotations


class SecAggError(Exception):
    """Base class of every secure-sum error."""


class SecAggConfigError(SecAggError, ValueError):
    """A secure-sum parameter, the roster or a key is unusable."""


class EncodingOverflowError(SecAggConfigError):
    """The modulus has no headroom for the sum of this many sites' quantised inputs."""


class SecAggProtocolError(SecAggError, ValueError):
    """A message is malformed, from another round, out of order or inconsistent with the round."""


class SecAggSignatureError(SecAggProtocolError):
    """A signature is missing or does not verify against the site's pinned identity key."""


class SecAggRevealError(SecAggProtocolError):
    """Revealing a share would let the aggregator unmask a single site's input."""


class SecAggStageError(SecAggError, RuntimeError):
    """A stage was called out of order (the protocol's state machine forbids the transition)."""


class SecAggThresholdError(SecAggError):
    """Fewer than ``threshold`` sites (or shares) remain: the round must be abandoned."""
