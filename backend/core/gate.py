"""Promotion gate: is a new version worse than the one in service by more than the tuning split can tell?

Both versions are scored on the same tuning split of ``n`` images. A metric measured on ``n`` images
has a standard error of about ``sqrt(m (1 - m) / n)`` (``m`` the metric, read as a rate); on the
40–80 tuning images of a young project that is 2–4 points, i.e. one or two images. A newer version
has seen more labels, so within that noise it is the better bet: the gate keeps it out only when it
is worse by more than one standard error (at least one image, at most 5 points).

Measured on the demo's loop (bench/active_learning.py, 3 seeds): with the strict ``new >= old`` rule
the version trained on all 400 labels was kept out in favour of an older one whenever it scored one
tuning image lower, so the served model ended below a random-picking loop with the same labels.
"""

from __future__ import annotations

import math

MAX_TOLERANCE = 0.05  # never let a larger drop through, whatever the split size


def tolerance(metric: float, n: int) -> float:
    """The drop of ``metric`` (0..1) on ``n`` tuning images that is within measurement noise."""
    if n <= 0:
        return 0.0
    m = min(max(metric, 0.0), 1.0)
    return min(MAX_TOLERANCE, max(1.0 / n, math.sqrt(m * (1.0 - m) / n)))


def should_promote(new: float, old: float, n: int) -> bool:
    """True unless ``new`` is below ``old`` by more than the noise of an ``n``-image tuning split."""
    return new >= old - tolerance(old, n) - 1e-12
