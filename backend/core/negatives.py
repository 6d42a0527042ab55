"""Negative correction: rough, cheap labels held against the model's output to find what it misses.

A task may carry rough labels in its data (imported with it, from a catalogue, a sensor, a quick
image-level pass): ``contains`` — the labels present in the image (a list, or a comma-separated string) —
and/or ``counts`` — how many objects of each label (``{"car": 3}``). They are not good enough to train a
detector from, but good enough to check one: where the model shows fewer objects of a label than the
rough label says, it missed something; where it shows a label the image does not contain, it saw
something that is not there. Those tasks, worst first, are the review queue: the labeler draws the
missing boxes, and the fix trains the next version (the Human-powered Software 2.0 seed's "efficient
negative correction").

``miss_score`` = objects missing + objects not there, per the rough labels (0: the model agrees); the
model's own confidence breaks ties (a miss it was nearly sure about is worth less than one it never saw).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

CONTAINS_KEY = "contains"
COUNTS_KEY = "counts"
MAX_ROUGH_LABELS = 100
MAX_COUNT = 10_000


@dataclass(frozen=True)
class RoughLabels:
    contains: frozenset[str] | None = None  # the labels present (None: not given)
    counts: dict[str, int] | None = None  # objects per label (None: not given)

    @property
    def given(self) -> bool:
        return self.contains is not None or self.counts is not None


def rough_labels(data: Any, labels: Sequence[str]) -> RoughLabels:
    """The task's rough labels from its ``data`` (labels outside the config and bad values are ignored:
    task data comes from outside; at most MAX_ROUGH_LABELS entries are read)."""
    if not isinstance(data, dict):
        return RoughLabels()
    known = set(labels)
    contains = None
    raw = data.get(CONTAINS_KEY)
    if isinstance(raw, str) and len(raw) <= 10_000:
        raw = [part.strip() for part in raw.split(",")]
    if isinstance(raw, list):
        contains = frozenset(str(v) for v in raw[:MAX_ROUGH_LABELS] if isinstance(v, str) and v in known)
    counts = None
    raw_counts = data.get(COUNTS_KEY)
    if isinstance(raw_counts, dict):
        counts = {}
        for label, n in list(raw_counts.items())[:MAX_ROUGH_LABELS]:
            if label in known and isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= MAX_COUNT:
                counts[str(label)] = n
    return RoughLabels(contains, counts)


def miss_score(shown: Sequence[str], rough: RoughLabels, evidence: float = 0.0) -> tuple[float, dict[str, Any]]:
    """(score, what disagrees) for one task: ``shown`` = the labels of the regions the model offers (one per
    region; classification: the predicted class); ``evidence`` in [0, 1): the model's highest confidence
    among the regions it hid, subtracted a little so a near-miss ranks below a blind one."""
    if not rough.given:
        return 0.0, {}
    seen = Counter(shown)
    missing: dict[str, int] = {}
    extra: dict[str, int] = {}
    if rough.counts is not None:
        for label, n in rough.counts.items():
            if seen[label] < n:
                missing[label] = n - seen[label]
        for label, n in seen.items():
            expected = rough.counts.get(label)
            if expected is not None and n > expected:
                extra[label] = n - expected
    if rough.contains is not None:
        for label in rough.contains:
            if seen[label] == 0 and label not in missing:
                missing[label] = 1
        for label, n in seen.items():
            if label not in rough.contains and label not in extra and (rough.counts is None or label not in rough.counts):
                extra[label] = n
    wrong = sum(missing.values()) + sum(extra.values())
    if not wrong:
        return 0.0, {}
    return float(wrong) - 0.5 * min(max(evidence, 0.0), 0.999), {"missing": missing, "not_there": extra}
