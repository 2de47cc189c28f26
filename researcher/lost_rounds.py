"""Lost rounds: a round that cannot finish once any site has released its masked input for it.

A site spends privacy on a round (its ledger, written before the masked update leaves) and then refuses
any second session of that round (``policies.site_runtime``: "round r already ran here"), so that no
round's data is used twice. A secure-sum session that fails after a release therefore can never be
finished by a retry. The researcher retries a round with a new session only while no site has
released it; after a release the round is *lost*: recorded (``researcher.report.LostRound``: which
sites spent and what they reported, at which stage it failed, why), never applied to the global model,
and the run goes on with the next round, which every site accepts (a later round is fresh there).
"""

from __future__ import annotations

import re

from researcher.report import LostRound

# How a site refuses a new session of a round it already ran, i.e. released (policies.site_runtime,
# SiteRun._check_fresh_round); "round r is older than round m, which already ran here" does not match.
_ALREADY_RAN = re.compile(r"^([a-z0-9][a-z0-9-]*): round (\d+) already ran here\b")


class RoundLostError(RuntimeError):
    """A round could not finish after some site had released its masked input: lost, never retried."""

    def __init__(self, record: LostRound) -> None:
        super().__init__(record.summary())
        self.record = record


def lost_by_refusal(refusal: str, round_index: int, attempt: int) -> LostRound | None:
    """The lost round a refusal reveals: a site ran ``round_index`` in an earlier session whose sum never came.

    That happens when the researcher's process died after a site released, or when a site spent but its
    reply never arrived; the site rightly refuses any new session of the round. None for any other
    refusal (it stops the run: a site's policy said no).
    """
    match = _ALREADY_RAN.match(refusal)
    if match is None or int(match.group(2)) != round_index:
        return None
    return LostRound(round_index=round_index, attempt=attempt, stage="advertise_keys", reason=refusal,
                     released=(match.group(1),))


__all__ = ["RoundLostError", "lost_by_refusal"]
