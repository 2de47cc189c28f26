"""The mock twin of a site's partition: same schema, realistic-looking reviews, no private record.

Researchers see only the mock. It must let them dry-run their training code (same columns, dtypes,
label coding, review-like lengths and wording) while revealing nothing of the private text. So the
reviews are composed from phrase banks written here, never from the private data.
``check_no_private_overlap`` then verifies, before the mock is published, that no mock review equals
or nearly duplicates a private one (shared word 5-grams), and refuses to publish otherwise.

The mock's size and label balance are a ``MockShape``, from one of two sources, recorded with the
dataset so that the admin's review and the upload report say which:

* ``public-defaults`` (the default): 200 rows, half of them positive. Nothing about the partition.
* ``dp-counts`` (opt-in, with an epsilon the admin gives): the partition's positive and negative
  counts, each with discrete Laplace noise (``dp_mock_shape``). That is a differentially private
  release of the label counts, made once at upload; its epsilon adds to every researcher's training
  epsilon (see ``dp_mock_shape``).

Copying the exact size and label balance, as the mock once did, was a small channel from the private
data to every researcher, outside any privacy accounting.
"""

from __future__ import annotations

import math
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
import pandas as pd

from datasites.errors import FedsiteError

PUBLIC_MOCK_ROWS = 200  # the public default's size; half of the rows are positive
MIN_MOCK_ROWS = 64  # a DP-sized mock is never smaller: the review's dry run trains on 64 mock rows
MAX_MOCK_ROWS = 2000  # nor larger: the mock is for dry runs, and is generated and checked at upload
MAX_MOCK_EPSILON = 10.0  # beyond this the noisy counts are the exact counts in all but name
MOCK_SOURCES = ("public-defaults", "dp-counts")
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


def check_mock_epsilon(epsilon: object) -> float:
    """Refuse a mock epsilon that is not a number in (0, MAX_MOCK_EPSILON]; return it as a float."""
    if isinstance(epsilon, bool) or not isinstance(epsilon, int | float) or not math.isfinite(epsilon) \
            or not 0 < epsilon <= MAX_MOCK_EPSILON:
        raise FedsiteError(f"mock_epsilon must be a number in (0, {MAX_MOCK_EPSILON:g}], got {epsilon!r}: e.g. 0.1 "
                           "noises the label counts by about 10 records; leave it out for the public defaults")
    return float(epsilon)


@dataclass(frozen=True, kw_only=True)
class MockShape:
    """The mock twin's size and label balance, and where those two numbers came from."""

    rows: int  # mock rows; [1, MAX_MOCK_ROWS]
    positives: int  # mock rows labelled 1; [0, rows]
    source: str  # one of MOCK_SOURCES
    epsilon: float | None = None  # the dp-counts release's epsilon (pure DP); None for public-defaults

    def __post_init__(self) -> None:
        if self.source not in MOCK_SOURCES:
            raise FedsiteError(f"mock source must be one of {MOCK_SOURCES}, got {self.source!r}")
        for name, value, high in (("rows", self.rows, MAX_MOCK_ROWS), ("positives", self.positives, self.rows)):
            low = 1 if name == "rows" else 0
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise FedsiteError(f"mock {name} must be an int in [{low}, {high}], got {value!r}")
        if self.source == "dp-counts":
            check_mock_epsilon(self.epsilon)
        elif self.epsilon is not None:
            raise FedsiteError(f"a {self.source} mock spends no epsilon, got epsilon={self.epsilon!r}")

    def to_record(self) -> dict[str, Any]:
        """The dataset facts' ``mock`` entry (``SiteDir.record_dataset``)."""
        record: dict[str, Any] = {"source": self.source, "rows": self.rows, "positives": self.positives}
        if self.epsilon is not None:
            record["epsilon"] = self.epsilon
        return record

    def describe(self) -> str:
        """One line for the admin: the size, the balance and their source."""
        if self.source == "public-defaults":
            return (f"{self.rows} rows, {self.positives} positive, from public defaults (nothing taken from the "
                    "private partition)")
        return (f"{self.rows} rows, {self.positives} positive, from the private label counts with discrete Laplace "
                f"noise at epsilon={self.epsilon:g} (a one-off release at upload, added to every researcher's "
                "training epsilon)")


def describe_mock_record(record: Mapping[str, Any] | None) -> str:
    """The admin's line on a dataset's mock twin, from the ``mock`` entry recorded at upload (None: none was)."""
    if record is None:
        return ("source not recorded (uploaded before Fedsite recorded it): its size and label balance may be "
                "the private partition's exact ones; upload the dataset again to replace it")
    try:
        return MockShape(**record).describe()
    except (TypeError, FedsiteError) as exc:
        return f"unreadable record {dict(record)!r} ({exc})"


def public_mock_shape() -> MockShape:
    """The default: PUBLIC_MOCK_ROWS rows, half of them positive, whatever the partition."""
    return MockShape(rows=PUBLIC_MOCK_ROWS, positives=PUBLIC_MOCK_ROWS // 2, source="public-defaults")


def dp_mock_shape(labels: Sequence[int] | pd.Series, *, epsilon: float) -> MockShape:
    """The mock's size and balance from the private label counts, released with epsilon-DP.

    The positive and the negative counts each get independent discrete Laplace noise,
    P(y) proportional to exp(-epsilon |y|) (``discrete_laplace``). Adding or removing one record changes
    one of the two counts by one, so the pair is epsilon-DP (the geometric mechanism, Ghosh,
    Roughgarden & Sundararajan, STOC 2009; parallel composition over the two disjoint counts); under
    replace-one adjacency it is 2 epsilon-DP. Clamping the counts and the size to [MIN_MOCK_ROWS,
    MAX_MOCK_ROWS], and keeping at least one row of each label, is post-processing: it costs nothing.

    How it composes: every researcher sees the mock, so this epsilon (delta 0) adds to what each
    researcher's training spends, by basic composition: epsilon_mock + epsilon_ledger at the ledger's
    delta. It is spent once, at upload, and is not in the per-researcher ledgers; keep it small (0.1
    noises each count by about 10 records) or use the public defaults, which spend nothing.
    """
    epsilon = check_mock_epsilon(epsilon)
    values = [int(label) for label in labels]
    positives = sum(1 for label in values if label == 1)
    noisy_positives = max(0, positives + discrete_laplace(epsilon=epsilon))
    noisy_negatives = max(0, len(values) - positives + discrete_laplace(epsilon=epsilon))
    total = noisy_positives + noisy_negatives
    rows = min(max(total, MIN_MOCK_ROWS), MAX_MOCK_ROWS)
    share = Fraction(noisy_positives, total) if total else Fraction(1, 2)
    return MockShape(rows=rows, positives=min(max(round(share * rows), 1), rows - 1), source="dp-counts",
                     epsilon=epsilon)


def _bernoulli(p: Fraction) -> bool:
    """True with probability p in [0, 1], exactly, from the OS CSPRNG (``secrets``)."""
    return secrets.randbelow(p.denominator) < p.numerator


def _bernoulli_exp(gamma: Fraction) -> bool:
    """True with probability exp(-gamma), gamma >= 0, exactly.

    Canonne, Kamath & Steinke (NeurIPS 2020, "The discrete Gaussian for differential privacy"),
    Algorithm 1: for gamma in [0, 1], the first K with Bernoulli(gamma / K) = 0 is odd with probability
    exp(-gamma); a larger gamma is split into exp(-1) factors.
    """
    while gamma > 1:
        if not _bernoulli_exp(Fraction(1)):
            return False
        gamma -= 1
    k = 1
    while _bernoulli(gamma / k):
        k += 1
    return k % 2 == 1


def discrete_laplace(*, epsilon: float) -> int:
    """One integer y with P(y) proportional to exp(-epsilon |y|), exactly, from the OS CSPRNG.

    Canonne, Kamath & Steinke 2020, Algorithm 2, with epsilon = s / t as an exact fraction (a float is
    one): X = U + t V has P(X = x) proportional to exp(-x / t), and Y = floor(X / s) has P(Y = y)
    proportional to exp(-y s / t). Integer arithmetic only, so none of the floating-point attacks on
    the textbook Laplace sampler (Mironov, CCS 2012) apply. Its running time depends on the value drawn,
    which is harmless here: it runs once, at upload, where no researcher can time it.
    """
    exact = Fraction(check_mock_epsilon(epsilon))
    s, t = exact.numerator, exact.denominator
    while True:
        u = secrets.randbelow(t)
        if not _bernoulli_exp(Fraction(u, t)):
            continue
        v = 0
        while _bernoulli_exp(Fraction(1)):
            v += 1
        y = (u + t * v) // s
        negative = secrets.randbelow(2) == 1
        if negative and y == 0:
            continue
        return -y if negative else y


def make_mock_twin(private: pd.DataFrame, *, seed: int, shape: MockShape | None = None) -> pd.DataFrame:
    """A synthetic partition with the private one's schema, ``shape``'s size and labels (public defaults if None).

    ``seed`` fixes the generated reviews and the order of the labels; nothing in them comes from
    ``private``, which is read only to check that no mock review is (nearly) one of its texts.
    """
    shape = public_mock_shape() if shape is None else shape
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape.rows, dtype="int64")  # [rows]
    labels[: shape.positives] = 1
    rng.shuffle(labels)
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
