"""Drift of incoming data: are newly imported images like the ones the model was trained on?

Each image is a vector from the served model's own backbone (``predict.embed_images``) and, apart, a vector
of its pixel statistics (what a classifier may be trained to ignore: colours, exposure). An incoming image's
*distance* is its mean Euclidean distance to its ``k`` nearest training images; the training images' own
distances (each to its k nearest *other* training images) say what "near" means for this project. An
incoming image is **beyond** when its distance exceeds the ``quantile`` (0.95) of the training images'
own: without drift about 5 % of a batch is beyond by chance, so the batch is flagged as drifted when the
share beyond is higher than chance can explain (one-sided binomial test, ``alpha`` 0.01) and at least twice
the chance rate. The most distant images are what to label next: the model has not seen their like.

Pure numpy; the loop runs it in the prediction job for tasks imported after the version in service was
trained (``workflows/suspects.py`` beside it writes the Label Studio side).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

QUANTILE = 0.95
ALPHA = 0.01
MAX_REFERENCE = 2000  # training images compared with (a sample beyond that)
MAX_INCOMING = 2000


@dataclass
class DriftReport:
    n_reference: int
    n_incoming: int
    k: int
    threshold: float  # the training images' own distance at QUANTILE
    share_beyond: float  # incoming images farther than threshold
    expected: float  # the share beyond by chance (1 - QUANTILE)
    p_value: float  # P(at least this many beyond | no drift)
    drifted: bool
    # per incoming image: its distance / threshold (> 1 = beyond), in the order given
    ratios: list[float] = field(default_factory=list)

    def to_json(self, top: int = 50, ids: list | None = None) -> dict:
        """The report without per-image ratios, plus the ``top`` farthest (ids when given, else indices)."""
        data = {k: v for k, v in asdict(self).items() if k != "ratios"}
        order = np.argsort(-np.asarray(self.ratios), kind="stable")[:top].tolist() if self.ratios else []
        data["farthest"] = [{"id": (ids[i] if ids is not None else i), "ratio": round(self.ratios[i], 3)} for i in order]
        return data


def pixel_statistics(image: np.ndarray) -> np.ndarray:
    """What an image looks like before any model: per-channel 16-bin histograms and an 8 x 8 grey thumbnail
    (112 numbers). Catches a shift a classifier is trained to ignore (colours, exposure, inverted images)."""
    import cv2

    small = cv2.resize(np.asarray(image), (32, 32), interpolation=cv2.INTER_AREA)
    if small.ndim == 2:
        small = np.repeat(small[:, :, None], 3, axis=2)
    hist = [np.histogram(small[:, :, c], bins=16, range=(0, 256))[0] / small[:, :, c].size for c in range(3)]
    grey = cv2.resize(small.mean(axis=2).astype(np.float32), (8, 8), interpolation=cv2.INTER_AREA) / 255.0
    return np.concatenate([np.concatenate(hist), grey.reshape(-1) / 8.0])


def knn_distance(reference: np.ndarray, queries: np.ndarray, k: int, exclude_self: bool = False) -> np.ndarray:
    """Mean Euclidean distance of each query to its k nearest reference vectors (itself left out when the
    queries are the reference)."""
    ref, q = np.asarray(reference, dtype=np.float64), np.asarray(queries, dtype=np.float64)
    ref_sq = (ref**2).sum(axis=1)
    out = np.empty(len(q))
    for start in range(0, len(q), 512):  # bounded memory: 512 x n_reference distances at a time
        part = q[start : start + 512]
        block = np.sqrt(np.maximum((part**2).sum(axis=1)[:, None] + ref_sq[None, :] - 2.0 * part @ ref.T, 0.0))
        if exclude_self:
            rows = np.arange(block.shape[0])
            block[rows, rows + start] = np.inf
        nearest = np.partition(block, k - 1, axis=1)[:, :k]
        out[start : start + 512] = nearest.mean(axis=1)
    return out


def binomial_tail(successes: int, n: int, p: float) -> float:
    """P(X >= successes) for X ~ Binomial(n, p)."""
    if successes <= 0:
        return 1.0
    total = 0.0
    for x in range(successes, n + 1):
        total += math.comb(n, x) * p**x * (1 - p) ** (n - x)
    return float(min(1.0, total))


def drift_report(reference: np.ndarray, incoming: np.ndarray, k: int = 5, quantile: float = QUANTILE,
                 alpha: float = ALPHA, seed: int = 0) -> DriftReport:
    """Compare incoming embeddings (n x d) with the training set's (m x d); see the module doc."""
    reference, incoming = np.asarray(reference), np.asarray(incoming)
    if len(reference) < 3:
        raise ValueError(f"need at least 3 training images to compare with, got {len(reference)}")
    rng = np.random.default_rng(seed)
    if len(reference) > MAX_REFERENCE:
        reference = reference[rng.choice(len(reference), MAX_REFERENCE, replace=False)]
    incoming = incoming[:MAX_INCOMING]
    k = max(1, min(k, len(reference) - 1))
    own = knn_distance(reference, reference, k, exclude_self=True)
    threshold = float(np.quantile(own, quantile))
    distances = knn_distance(reference, incoming, k) if len(incoming) else np.zeros(0)
    beyond = int((distances > threshold).sum())
    expected = 1.0 - quantile
    share = beyond / len(incoming) if len(incoming) else 0.0
    p_value = binomial_tail(beyond, len(incoming), expected) if len(incoming) else 1.0
    ratios = (distances / threshold if threshold > 0 else np.where(distances > 0, np.inf, 0.0)).tolist()
    return DriftReport(len(reference), len(incoming), k, threshold, share, expected, p_value,
                       drifted=bool(len(incoming) and p_value < alpha and share >= 2 * expected),
                       ratios=[float(r) for r in ratios])


def drift_views(model, reference: list, incoming: list, alpha: float = ALPHA) -> dict:
    """Drift of ``incoming`` image files against ``reference`` ones in two views: what the served ``model``
    sees (its backbone's embeddings) and the pixels (``pixel_statistics``), each at ``alpha`` / 2; drifted
    when either view is. ``farthest``: incoming indices by their larger ratio, farthest first."""
    import cv2

    from labelloop.core.predict import embed_images

    def pixels(paths: list) -> np.ndarray:
        rows = []
        for path in paths:
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:
                raise ValueError(f"cannot decode image {path}")
            rows.append(pixel_statistics(image))
        return np.stack(rows) if rows else np.zeros((0, 112))

    reports = {"model": drift_report(embed_images(model, list(reference)), embed_images(model, list(incoming)),
                                     alpha=alpha / 2),
               "pixels": drift_report(pixels(reference), pixels(incoming), alpha=alpha / 2)}
    ratios = np.max([r.ratios for r in reports.values()], axis=0) if incoming else np.zeros(0)
    order = np.argsort(-ratios, kind="stable").tolist()
    return {"drifted": any(r.drifted for r in reports.values()),
            "views": {name: r.to_json(top=0) for name, r in reports.items()},
            "farthest": [(i, float(ratios[i])) for i in order]}
