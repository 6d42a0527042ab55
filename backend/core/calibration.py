"""Temperature scaling: class probabilities that mean what they say, comparable across versions.

A model trained on a few hundred labels is rarely calibrated: label smoothing makes it humble, a
long schedule makes it overconfident. One number per version, the temperature ``T``, is fitted on
the held-out tuning split so that ``softmax(log p / T)`` minimizes the negative log-likelihood of
the human labels there (Guo et al., 2017). It never changes which class is on top — only how sure
the model says it is — so a task score of 0.8 means "right about 80 % of the time" for every
version, and the Data Manager's least-confident-first order compares tasks scored by different
versions fairly.

Arrays in, arrays out: ``probs`` is (n, k) with rows summing to 1; ``labels`` are column indices.
"""

from __future__ import annotations

import numpy as np

# Fewer tuning images than this: too few to fit one number reliably; T stays 1.
MIN_IMAGES = 10
T_MIN, T_MAX = 0.05, 20.0
EPS = 1e-7


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log p / T)`` row by row; T = 1 returns the probabilities unchanged (renormalized)."""
    array = np.clip(np.asarray(probs, dtype=np.float64), EPS, None)
    logits = np.log(array) / float(temperature)
    logits -= logits.max(axis=-1, keepdims=True)
    out = np.exp(logits)
    return out / out.sum(axis=-1, keepdims=True)


def negative_log_likelihood(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean −log p(label): 0 for a model sure and right; log k for a uniform one over k classes."""
    array = np.asarray(probs, dtype=np.float64)
    picked = array[np.arange(len(array)), np.asarray(labels, dtype=int)]
    return float(-np.log(np.clip(picked, EPS, None)).mean())


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """Mean |confidence − accuracy| over equal-width confidence bins, weighted by bin size (0 = calibrated)."""
    array = np.asarray(probs, dtype=np.float64)
    confidence = array.max(axis=1)
    correct = array.argmax(axis=1) == np.asarray(labels, dtype=int)
    edges = np.linspace(0.0, 1.0, bins + 1)
    error = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            error += inside.mean() * abs(confidence[inside].mean() - correct[inside].mean())
    return float(error)


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The T in [T_MIN, T_MAX] minimizing the NLL of ``labels`` (golden-section search on log T).

    Returns 1.0 when there are fewer than MIN_IMAGES rows (too little to fit).
    """
    array = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=int)
    if len(array) < MIN_IMAGES:
        return 1.0

    def loss(log_t: float) -> float:
        return negative_log_likelihood(apply_temperature(array, float(np.exp(log_t))), labels)

    lo, hi = np.log(T_MIN), np.log(T_MAX)
    ratio = (np.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(60):  # NLL is unimodal in log T; 60 steps shrink the bracket below 1e-10
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = loss(b)
    return float(np.exp((lo + hi) / 2))


def calibration_report(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Fit T and say what it changed: NLL and ECE before/after, on the same rows."""
    array = np.asarray(probs, dtype=np.float64)
    temperature = fit_temperature(array, labels)
    after = apply_temperature(array, temperature)
    return {
        "temperature": round(temperature, 4),
        "images": int(len(array)),
        "nll_before": round(negative_log_likelihood(array, labels), 4),
        "nll_after": round(negative_log_likelihood(after, labels), 4),
        "ece_before": round(expected_calibration_error(array, labels), 4),
        "ece_after": round(expected_calibration_error(after, labels), 4),
    }
