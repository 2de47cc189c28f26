"""Secure sum: SecAgg with dropout recovery against an active aggregator (Bonawitz et al., CCS 2017),
with optional SecAgg+ neighbourhoods (Bell et al., CCS 2020). Transport-agnostic: stages take and
return plain values; ``bench/secagg_local.py`` runs a whole session in one process and shows the
order of calls.
"""

from policies.secagg.aggregator import AggregatorStage, SecureSumAggregator, SecureSumResult
from policies.secagg.config import SecureSumConfig
from policies.secagg.context import RoundContext
from policies.secagg.encoding import FixedPointEncoding, max_quantisation_bits
from policies.secagg.errors import (
    EncodingOverflowError,
    SecAggConfigError,
    SecAggError,
    SecAggProtocolError,
    SecAggRevealError,
    SecAggSignatureError,
    SecAggStageError,
    SecAggThresholdError,
)
from policies.secagg.messages import (
    AdvertiseKeys,
    EncryptedShares,
    IncomingShares,
    MaskedInput,
    RevealedShare,
    RoundKeys,
    ShareKeys,
    SignedSurvivors,
    Survivors,
    SurvivorSignature,
    UnmaskShares,
)
from policies.secagg.roster import Roster, RosterEntry
from policies.secagg.site import (
    advertise_keys,
    check_incoming_shares,
    consistency_check,
    mask_input,
    share_keys,
    unmask,
)
from policies.secagg.state import ShareKind, SiteRoundState, SiteStage, load_round_state, save_round_state

__all__ = [
    "AdvertiseKeys",
    "AggregatorStage",
    "EncodingOverflowError",
    "EncryptedShares",
    "FixedPointEncoding",
    "IncomingShares",
    "MaskedInput",
    "RevealedShare",
    "Roster",
    "RosterEntry",
    "RoundContext",
    "RoundKeys",
    "SecAggConfigError",
    "SecAggError",
    "SecAggProtocolError",
    "SecAggRevealError",
    "SecAggSignatureError",
    "SecAggStageError",
    "SecAggThresholdError",
    "SecureSumAggregator",
    "SecureSumConfig",
    "SecureSumResult",
    "ShareKeys",
    "ShareKind",
    "SignedSurvivors",
    "SiteRoundState",
    "SiteStage",
    "SurvivorSignature",
    "Survivors",
    "UnmaskShares",
    "advertise_keys",
    "consistency_check",
    "load_round_state",
    "check_incoming_shares",
    "mask_input",
    "max_quantisation_bits",
    "save_round_state",
    "share_keys",
    "unmask",
]
