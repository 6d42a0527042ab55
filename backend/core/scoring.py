"""Scores computed from model outputs: pure functions of numbers, shared by every face.

Conventions (what a number means):

* **region score** — the model's confidence for that region (box / polygon / chosen class), in [0, 1].
* **task score** — the model's estimate of the probability that its whole pre-label for the task
  is right and needs no correction, in [0, 1]. **Low = least confident = review first.**

  - classification: the probability of the predicted class (softmax, over the classes the label
    config offers). Multi-label ``Choices``: every class is a choose/leave decision scored like a
    detection's keep/drop (``multilabel_task_score``).
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


def multilabel_choices(probs: Sequence[float] | np.ndarray, threshold: float) -> list[int]:
    """Multi-label ``Choices`` (``choice="multiple"``): the indices of every class whose probability is at
    least ``threshold``, and at least the most likely one, most likely first."""
    array = np.asarray(probs, dtype=np.float64)
    if not len(array):
        return []
    order = [int(i) for i in np.argsort(-array, kind="stable")]
    return [i for i in order if array[i] >= threshold] or order[:1]


def multilabel_task_score(probs: Sequence[float] | np.ndarray, threshold: float) -> float:
    """Task score of a multi-label choice: every class is a choose/leave decision, right with probability p
    when chosen and 1 - p when left out (``decision_correctness``, as for detection's keep/drop), and the
    score is the product. The top class chosen under the threshold (at least one is chosen) counts as
    chosen: right with probability p."""
    array = np.asarray(probs, dtype=np.float64)
    chosen = set(multilabel_choices(array, threshold))
    score = 1.0
    for i, p in enumerate(array):
        score *= decision_correctness(float(p), min(threshold, float(p)) if i in chosen else threshold)
    return float(score)


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


# -- mislabel scores (higher = more likely that the human label is wrong) ---------------------------

def classification_loss(probs: dict[str, float], label: str, eps: float = 1e-6) -> float:
    """Cross-entropy of the human label under the model: -log p(label), p renormalized over the
    config's classes. 0 when the model is sure the label is right; large when it is sure it is not."""
    labels = list(probs)
    if label not in probs:
        return float(-math.log(eps))
    p = normalize([probs[k] for k in labels])[labels.index(label)]
    return float(-math.log(max(eps, p)))


def suspect_cutoff(whole_image: bool, threshold: float) -> float:
    """The mislabel score from which a human label is a suspect: classification, the model gives the human
    label less than one chance in two (-log 0.5); detection, a flag as strong as the display threshold."""
    return float(math.log(2.0)) if whole_image else float(threshold)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two boxes given as (x, y, w, h)."""
    ax2, ay2, bx2, by2 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw = max(0.0, min(ax2, bx2) - max(a[0], b[0]))
    ih = max(0.0, min(ay2, by2) - max(a[1], b[1]))
    inter = iw * ih
    union = a[2] * a[3] + b[2] * b[3] - inter
    return float(inter / union) if union > 0 else 0.0


MATCH_IOU = 0.5  # a prediction and a human box describe the same object
NEAR_IOU = 0.1  # ... or at least the same place, badly outlined


def detection_flags(ground_truth: Sequence[tuple[str, Sequence[float]]],
                    candidates: Sequence[tuple[str, float, Sequence[float]]],
                    threshold: float) -> list[dict]:
    """Per-object flags on one image: where the human boxes and the model disagree.

    ``ground_truth``: (label, box) per human object; ``candidates``: (label, confidence, box) per model
    region above the candidate floor. Boxes are (x, y, w, h) in any common unit. Flags:

    * ``wrong_class`` — a confident region overlaps a human box (IoU >= 0.5) with another class;
      score = its confidence.
    * ``poor_localization`` — the best same-class region overlaps only 0.1 <= IoU < 0.5;
      score = confidence x (1 - IoU).
    * ``possible_spurious`` — no region overlaps the human box at all (IoU < 0.1); score = 1 - the
      highest confidence of any region touching it (an unseen object is likelier a bad label when the
      model sees everything else).
    * ``possible_missing`` — a confident region (>= threshold) overlaps no human box; score = its
      confidence (the human may have forgotten an object).
    """
    flags: list[dict] = []
    used: set[int] = set()
    for g, (label, box) in enumerate(ground_truth):
        overlaps = [(box_iou(box, c[2]), i) for i, c in enumerate(candidates)]
        best_iou, best = max(overlaps, default=(0.0, None))
        same = [(iou, i) for iou, i in overlaps if candidates[i][0] == label]
        best_same_iou, best_same = max(same, default=(0.0, None))
        if best_same is not None and best_same_iou >= MATCH_IOU:
            used.add(best_same)
            continue  # the model agrees
        if best is not None and best_iou >= MATCH_IOU and candidates[best][1] >= threshold:
            used.add(best)
            flags.append({"kind": "wrong_class", "object": g, "score": float(candidates[best][1]),
                          "predicted": candidates[best][0], "iou": best_iou})
        elif best_same is not None and best_same_iou >= NEAR_IOU and candidates[best_same][1] >= threshold:
            used.add(best_same)
            flags.append({"kind": "poor_localization", "object": g, "iou": best_same_iou,
                          "score": float(candidates[best_same][1] * (1.0 - best_same_iou))})
        elif best_iou < NEAR_IOU:
            touching = [candidates[i][1] for iou, i in overlaps if iou > 0]
            flags.append({"kind": "possible_spurious", "object": g, "score": float(1.0 - max(touching, default=0.0))})
    for i, (label, confidence, box) in enumerate(candidates):
        if i in used or confidence < threshold:
            continue
        if all(box_iou(box, gt_box) < NEAR_IOU for _, gt_box in ground_truth):
            flags.append({"kind": "possible_missing", "object": None, "score": float(confidence),
                          "predicted": label, "box": list(box)})
    return flags


def detection_mislabel_score(flags: Sequence[dict]) -> float:
    """Image-level mislabel score: the strongest flag (0 when the model agrees with every box)."""
    return float(max((f["score"] for f in flags), default=0.0))


# -- detection uncertainty (higher = more uncertain), hidden regions included -----------------------

def decision_uncertainty(confidence: float, threshold: float) -> float:
    """1 when a region sits on the display threshold, 0 at confidence 0 or 1."""
    span = threshold if confidence < threshold else 1.0 - threshold
    return float(max(0.0, 1.0 - abs(confidence - threshold) / span)) if span > 0 else 0.0


def detection_uncertainty(candidates: Sequence[tuple[float, dict[str, float]]], threshold: float,
                          method: str = "least_confidence") -> float:
    """Image uncertainty from every candidate region (confidence, per-class scores).

    * ``least_confidence``: 1 - the task score (probability the pre-label needs a correction);
    * ``margin`` / ``entropy``: the most uncertain region, where a region's uncertainty is the larger
      of its keep/drop doubt and its class doubt (margin or entropy of its class scores) weighted by
      its confidence — a faint region with a flat class distribution is noise, not doubt.
    """
    if method == "least_confidence":
        return 1.0 - detection_task_score([c for c, _ in candidates], threshold)
    class_doubt = {"margin": margin_uncertainty, "entropy": entropy_uncertainty}[method]
    worst = 0.0
    for confidence, probs in candidates:
        doubt = decision_uncertainty(confidence, threshold)
        if probs:
            doubt = max(doubt, confidence * class_doubt(list(probs.values())))
        worst = max(worst, doubt)
    return float(worst)


# -- diversity --------------------------------------------------------------------------------------

def diverse_top_k(scores: Sequence[float], embeddings: np.ndarray, k: int, pool_factor: int = 4,
                  avoid: np.ndarray | None = None) -> list[int]:
    """k indices: among the ``pool_factor * k`` highest scores, k-center greedy on the embeddings.

    Starts from the highest score, then repeatedly takes the candidate farthest from everything
    chosen (and from ``avoid``, e.g. already-labeled samples), so a budget of k does not go to k
    near-duplicates. Returns indices in pick order.
    """
    values = np.asarray(scores, dtype=np.float64)
    k = min(k, len(values))
    if k <= 0:
        return []
    pool = np.argsort(-values, kind="stable")[: max(k, pool_factor * k)]
    vectors = np.asarray(embeddings, dtype=np.float64)[pool]
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    if avoid is not None and len(avoid):
        others = np.asarray(avoid, dtype=np.float64)
        others = others / np.maximum(np.linalg.norm(others, axis=1, keepdims=True), 1e-12)
        nearest = np.min(np.linalg.norm(vectors[:, None, :] - others[None, :, :], axis=2), axis=1)
        first = int(np.argmax(nearest * (1 + values[pool])))
    else:
        nearest = np.full(len(pool), np.inf)
        first = 0
    chosen = [first]
    nearest = np.minimum(nearest, np.linalg.norm(vectors - vectors[first], axis=1))
    while len(chosen) < k:
        nearest[chosen] = -1.0
        pick = int(np.argmax(nearest))
        chosen.append(pick)
        nearest = np.minimum(nearest, np.linalg.norm(vectors - vectors[pick], axis=1))
    return [int(pool[i]) for i in chosen]

