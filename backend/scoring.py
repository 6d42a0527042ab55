"""Scores computed from model outputs: pure functions of numbers, shared by every face.

Conventions (what a number means):

* **region score** — the model's confidence for that region (box / polygon / chosen class), in [0, 1].
* **task score** — the model's estimate of the probability that its whole pre-label for the task
  is right and needs no correction, in [0, 1]. **Low = least confident = review first.**

  - classification: the probability of the predicted class (softmax, over the classes the label
    config offers).
  - detection / segmentation: every candidate region the model produced above a low floor
    (``CANDIDATE_FLOOR``, far below the display threshold) is a keep/drop decision. A region kept
    (confidence p >= threshold) is right with probability p; a region dropped is right with
    probability 1 - p. The task score is the product over candidates, so one doubtful region —
    shown *or hidden* — pulls the score down. This is why the score does not vanish, or turn
    optimistic, when boxes fall under the threshold (upstream averages only the shown boxes).
    An image with no candidate at all scores 1.0 (confidently empty).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# Regions under this confidence are treated as confidently absent and do not enter the task score.
CANDIDATE_FLOOR = 0.05


def decision_correctness(confidence: float, threshold: float) -> float:
    """Probability that keeping (p >= threshold) or dropping (p < threshold) a region is right."""
    return confidence if confidence >= threshold else 1.0 - confidence


def detection_task_score(confidences: Sequence[float], threshold: float, floor: float = CANDIDATE_FLOOR) -> float:
    """Task score for detection/segmentation from all candidate confidences (see module doc)."""
    score = 1.0
    for p in confidences:
        if p >= floor:
            score *= decision_correctness(float(p), threshold)
    return float(score)


def normalize(probs: Sequence[float] | np.ndarray) -> np.ndarray:
    """Probabilities restricted to a subset of classes, renormalized to sum to 1."""
    array = np.clip(np.asarray(probs, dtype=np.float64), 0.0, None)
    total = array.sum()
    if total <= 0:
        return np.full(len(array), 1.0 / max(1, len(array)))
    return array / total


def classification_task_score(probs: Sequence[float] | np.ndarray) -> float:
    """Task score for classification: probability of the predicted (top-1) class."""
    array = normalize(probs)
    return float(array.max()) if len(array) else 0.0


# -- uncertainty measures (higher = more uncertain), used for sampling --------------------------

def least_confidence(probs: Sequence[float] | np.ndarray) -> float:
    """1 - p(top class): 0 when certain, approaches 1 - 1/K when uniform over K classes."""
    return 1.0 - classification_task_score(probs)


def margin_uncertainty(probs: Sequence[float] | np.ndarray) -> float:
    """1 - (p1 - p2), the gap between the two most likely classes: 1 when they tie."""
    array = np.sort(normalize(probs))[::-1]
    if len(array) < 2:
        return 0.0
    return float(1.0 - (array[0] - array[1]))


def entropy_uncertainty(probs: Sequence[float] | np.ndarray) -> float:
    """Shannon entropy divided by log K, in [0, 1]: 1 when uniform over the K classes."""
    array = normalize(probs)
    if len(array) < 2:
        return 0.0
    nonzero = array[array > 0]
    return float(-(nonzero * np.log(nonzero)).sum() / math.log(len(array)))
