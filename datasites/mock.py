"""The mock twin of a site's partition: same schema, realistic-looking reviews, no private record.

Researchers see only the mock. It must let them dry-run their training code (same columns, dtypes,
label coding, review-like lengths and wording) while revealing nothing of the private text. So the
reviews are composed from phrase banks written here, never from the private data; the only things
taken from the partition are its size (capped) and its label balance. ``check_no_private_overlap``
then verifies, before the mock is published, that no mock review equals or nearly duplicates a
private one (shared word 5-grams), and refuses to publish otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np
import pandas as pd

from datasites.errors import FedsiteError

MAX_MOCK_ROWS = 2000
SHINGLE = 5  # words per shingle for the near-duplicate check
MAX_SHARED_FRACTION = 0.2  # a mock review sharing more of its 5-grams with one private text is a near-duplicate

_TITLE_ADJ = ["Silent", "Crimson", "Last", "Broken", "Midnight", "Golden", "Forgotten", "Wild", "Hidden", "Distant",
              "Burning", "Quiet", "Lonely", "Electric", "Frozen", "Velvet", "Savage", "Glass", "Hollow", "Northern"]
_TITLE_NOUN = ["Harbor", "Summer", "Witness", "Garden", "Frontier", "Promise", "Station", "Kingdom", "Mirror",
               "Highway", "Orchard", "Letter", "Tide", "Circus", "Signal", "Empire", "Voyage", "Lantern", "Verdict"]
_GENRES = ["thriller", "romantic comedy", "western", "horror film", "war drama", "science fiction film",
           "family drama", "heist movie", "musical", "courtroom drama", "mystery", "coming-of-age story"]
_DECADES = ["the seventies", "the eighties", "the nineties", "the early two-thousands", "the fifties"]
_ASPECTS = ["the acting", "the script", "the direction", "the soundtrack", "the cinematography", "the pacing",
            "the ending", "the dialogue", "the lead performance", "the supporting cast", "the editing", "the plot"]
_POS_ADJ = ["superb", "moving", "sharp", "beautifully judged", "genuinely funny", "gripping", "heartfelt",
            "clever", "memorable", "confident", "luminous", "tight"]
_NEG_ADJ = ["clumsy", "tedious", "flat", "painfully slow", "confused", "wooden", "predictable", "forgettable",
            "overwrought", "lazy", "muddled", "shrill"]
_OPENERS = [
    "I watched {title} {when} and {reaction}.",
    "{title} is a {genre} from {decade}, and {reaction}.",
    "I went into {title} with {expect} expectations.",
    "A friend recommended {title}, a {genre} I had never heard of.",
    "Having seen most {genre}s of {decade}, I finally got around to {title}.",
]
_WHEN = ["last night", "on a rainy Sunday", "at a festival screening", "on late-night television", "twice this week"]
_EXPECT = ["low", "high", "modest", "no particular", "very high"]
_POS_REACTION = ["I was pleasantly surprised", "it stayed with me for days", "I loved almost every minute",
                 "it deserves a much bigger audience"]
_NEG_REACTION = ["I regretted it within twenty minutes", "it tested my patience", "I kept checking the clock",
                 "I cannot recommend it"]
_POS_BODY = [
    "{aspect_c} is {adj}, and {aspect} is just as {adj2}.",
    "The story takes its time, but {aspect} makes every scene count.",
    "What works best is {aspect}, which is {adj} from start to finish.",
    "There is a scene near the middle that is {adj}; I will not spoil it.",
    "Even {aspect} is {adj}, which you rarely see in a {genre}.",
    "The cast clearly believed in the material, and it shows.",
]
_NEG_BODY = [
    "{aspect_c} is {adj}, and {aspect} is no better.",
    "The story goes nowhere, and {aspect} only makes it worse.",
    "I wanted to like it, but {aspect} is {adj} from start to finish.",
    "There is a scene near the middle that is so {adj} it becomes unintentionally funny.",
    "Even {aspect} is {adj}, which is hard to forgive in a {genre}.",
    "The cast seems to be reading their lines for the first time.",
]
_POS_CLOSE = ["Highly recommended.", "I would give it {score} out of 10.", "See it if you get the chance.",
              "A small gem.", "{score}/10, and I will watch it again."]
_NEG_CLOSE = ["Skip it.", "I would give it {score} out of 10.", "Watch something else instead.",
              "A waste of a good cast.", "{score}/10, and that is generous."]


def _pick(rng: np.random.Generator, bank: list[str]) -> str:
    return bank[int(rng.integers(len(bank)))]


def _sentence(template: str, rng: np.random.Generator, positive: bool) -> str:
    adjectives = _POS_ADJ if positive else _NEG_ADJ
    aspect = _pick(rng, _ASPECTS)
    return template.format(
        title=f"\"{_pick(rng, ['The ', ''])}{_pick(rng, _TITLE_ADJ)} {_pick(rng, _TITLE_NOUN)}\"",
        when=_pick(rng, _WHEN),
        genre=_pick(rng, _GENRES),
        decade=_pick(rng, _DECADES),
        expect=_pick(rng, _EXPECT),
        reaction=_pick(rng, _POS_REACTION if positive else _NEG_REACTION),
        aspect=aspect,
        aspect_c=aspect[0].upper() + aspect[1:],
        adj=_pick(rng, adjectives),
        adj2=_pick(rng, adjectives),
        score=int(rng.integers(7, 11) if positive else rng.integers(1, 5)),
    )


def _review(rng: np.random.Generator, positive: bool) -> str:
    body_bank = _POS_BODY if positive else _NEG_BODY
    n_body = int(rng.integers(2, 9))
    parts = [_sentence(_pick(rng, _OPENERS), rng, positive)]
    parts += [_sentence(_pick(rng, body_bank), rng, positive) for _ in range(n_body)]
    parts.append(_sentence(_pick(rng, _POS_CLOSE if positive else _NEG_CLOSE), rng, positive))
    return " ".join(parts)


def make_mock_twin(private: pd.DataFrame, *, seed: int, max_rows: int = MAX_MOCK_ROWS) -> pd.DataFrame:
    """A synthetic partition with the private one's schema and label balance (size capped at max_rows)."""
    if max_rows < 1:
        raise FedsiteError(f"max_rows must be >= 1, got {max_rows}")
    n = min(len(private), max_rows)
    rng = np.random.default_rng(seed)
    positive_fraction = float(private["label"].mean()) if len(private) else 0.5
    labels = (rng.random(n) < positive_fraction).astype("int64")
    texts = [_review(rng, bool(label)) for label in labels]
    mock = pd.DataFrame({"text": texts, "label": labels})
    check_no_private_overlap(mock["text"], private["text"])
    return mock


_WORD = re.compile(r"[a-z0-9']+")


def _shingles(text: str) -> set[tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    return set(zip(*(words[i:] for i in range(SHINGLE)), strict=False))


def check_no_private_overlap(mock_texts: Iterable[str], private_texts: Iterable[str]) -> None:
    """Refuse a mock with a private text in it, verbatim or as a near-duplicate.

    A mock review counts as a near-duplicate when more than MAX_SHARED_FRACTION of its word
    5-grams occur in a single private review; short common phrases ("one of the best") are
    shorter than five words and do not trigger it.
    """
    mock_list = list(mock_texts)
    by_shingle: dict[tuple[str, ...], list[int]] = {}
    sizes = []
    for row, text in enumerate(mock_list):
        shingles = _shingles(text)
        sizes.append(len(shingles))
        for shingle in shingles:
            by_shingle.setdefault(shingle, []).append(row)
    verbatim = {text: row for row, text in enumerate(mock_list)}
    for private in private_texts:
        if private in verbatim:
            raise FedsiteError(
                f"mock row {verbatim[private]} is a private review verbatim: refusing to publish the mock twin"
            )
        hits: dict[int, int] = {}
        for shingle in _shingles(private) & by_shingle.keys():
            for row in by_shingle[shingle]:
                hits[row] = hits.get(row, 0) + 1
        for row, count in hits.items():
            if count > MAX_SHARED_FRACTION * sizes[row]:
                raise FedsiteError(f"mock row {row} nearly duplicates a private review: refusing to publish the mock twin")
