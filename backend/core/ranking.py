"""How good is a ranking at finding what we look for (mislabels, model errors)? Pure functions."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def precision_at_k(scores: Sequence[float], relevant: Sequence[bool], k: int) -> float:
    """Share of the k highest-scored items that are relevant (e.g. truly mislabeled)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:k]
    return float(np.asarray(relevant, dtype=bool)[order].mean()) if k > 0 else 0.0


def auroc(scores: Sequence[float], relevant: Sequence[bool]) -> float:
    """Probability that a random relevant item outscores a random irrelevant one (ties count half)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(relevant, dtype=bool)
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))
