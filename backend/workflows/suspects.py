"""Mislabel suspects where labelers work: each labeled task's human label scored by the version in service,
a "labelloop: mislabel suspects" Data Manager tab of the worst ones, and their scores in the task's meta.

The score is the engine's mislabel-by-loss (``core.scoring``), the same numbers the FiftyOne face writes as
``mislabel_score`` (in-sample: the version has seen most of these labels, so it agrees with them more than
a fold model would; the FiftyOne operator's out-of-sample mode is the stronger check). Refreshed by the
prediction job after every promotion, so the tab follows the model without an analyst in the loop: the scores
come from chunks any prediction worker takes (``backlog.score_chunk``), the ranking and the writes from the job.

Only the tab's tasks carry an entry (a task leaving the tab loses it): Label Studio writes a task's meta one
``PATCH`` at a time (~0.12 s each, serialized), so an entry on every labeled task rewritten after every promotion
cost 49 of a 61 s job at 400 labels and would cost hours at 100k. Bounded this way a promotion writes at most
``2 * SUSPECTS_SIZE`` tasks whatever the project's size (once more for each entry an earlier labelloop left on a
task outside the tab); every label's score is in FiftyOne (``mislabel_score``). Each write merges into the task's
meta as Label Studio holds it at that moment, so a user's edit made while the job ran is kept.
"""

from __future__ import annotations

import logging
from typing import Any

from labelloop.core import scoring
from labelloop.core.labelconfig import ControlSpec, threshold_for
from labelloop.core.predict import ImagePrediction
from labelloop.core.truth import LabeledImage

log = logging.getLogger(__name__)

SUSPECTS_TAB = "labelloop: mislabel suspects"
SUSPECTS_SIZE = 50  # a reviewer's sitting
META_KEY = "labelloop"  # the one key of a task's meta that labelloop writes; the user's keys stay as they are


def mislabel_score(truth: LabeledImage, pred: ImagePrediction, spec: ControlSpec,
                   threshold: float | None = None) -> tuple[float, list[dict]]:
    """(score, flags): how strongly ``pred`` (the version in service) disagrees with the human label.

    Classification: -log p(human label) (0 = the model agrees for sure; above -log 0.5 = it gives the
    label less than one chance in two). Detection / segmentation: the strongest of ``scoring.detection_flags``
    (wrong class, poor box, a human box the model does not see, an object the human may have missed)."""
    if spec.kind.whole_image:
        return scoring.classification_loss(pred.class_probs, truth.label or ""), []
    width, height = max(1, pred.width), max(1, pred.height)
    ground = [(r.label, (r.box[0], r.box[1], r.box[2] - r.box[0], r.box[3] - r.box[1])) for r in truth.regions]
    candidates = [(c.label, c.score, (c.bbox[0] / width, c.bbox[1] / height, c.bbox[2] / width, c.bbox[3] / height))
                  for c in pred.candidates if c.bbox is not None]
    flags = scoring.detection_flags(ground, candidates, threshold_for(spec) if threshold is None else threshold)
    return scoring.detection_mislabel_score(flags), flags


def rank_suspects(scores: dict[int, float], spec: ControlSpec, size: int = SUSPECTS_SIZE) -> list[int]:
    """Task ids whose score reaches ``scoring.suspect_cutoff``, worst first, at most ``size``."""
    cutoff = scoring.suspect_cutoff(spec.kind.whole_image, threshold_for(spec))
    ranked = sorted((t for t, s in scores.items() if s >= cutoff), key=lambda t: (-scores[t], t))
    return ranked[:size]


def entry_of(task: dict[str, Any]) -> dict[str, Any] | None:
    """labelloop's entry in a task's meta, if it has one."""
    meta = task.get("meta")
    entry = meta.get(META_KEY) if isinstance(meta, dict) else None
    return entry if isinstance(entry, dict) else None


def with_entry(meta: Any, entry: dict[str, Any] | None) -> dict[str, Any]:
    """``meta`` with labelloop's entry set (``None``: removed), every other key as it was."""
    kept = {key: value for key, value in (meta if isinstance(meta, dict) else {}).items() if key != META_KEY}
    return kept if entry is None else {**kept, META_KEY: entry}


def meta_updates(tasks: dict[int, dict[str, Any]], scores: dict[int, float], suspects: list[int], version: str,
                 keep: set[int] | frozenset[int] = frozenset()) -> dict[int, dict[str, Any] | None]:
    """Task id -> labelloop's new entry (``None``: remove it), for the tasks whose entry must change (``tasks``:
    id -> the task as read, for the meta it holds): each of the tab's ``suspects`` gets its score and the flag;
    every other task holding an entry loses it — unless it is in ``keep`` (labeled tasks this job could not
    score: a failure does not erase what an earlier version said)."""
    top = set(suspects)
    updates: dict[int, dict[str, Any] | None] = {}
    for task_id in suspects:
        entry = {"mislabel_score": round(float(scores[task_id]), 4), "mislabel_suspect": True, "version": version}
        if entry_of(tasks[task_id]) != entry:
            updates[task_id] = entry
    for task_id, task in tasks.items():
        if task_id not in top and task_id not in keep and entry_of(task) is not None:
            updates[task_id] = None
    return updates


def score_labeled(labeled: list[tuple[dict[str, Any], LabeledImage]], predictions: list[ImagePrediction | None],
                  spec: ControlSpec) -> dict[int, float]:
    """Task id -> ``mislabel_score`` of each human label against its prediction (tasks whose image could not be
    predicted are left out)."""
    scores: dict[int, float] = {}
    for (task, truth), pred in zip(labeled, predictions):
        if pred is None or pred.error is not None:
            continue
        scores[int(task["id"])], _ = mislabel_score(truth, pred, spec)
    return scores


def publish_suspects(client, project_id: int | str, spec: ControlSpec, version: str,
                     tasks: dict[int, dict[str, Any]], scores: dict[int, float],
                     keep: set[int] | frozenset[int] = frozenset(), say=None) -> dict[str, int]:
    """Rewrite the suspects tab and the meta entries ``meta_updates`` says (``tasks``: id -> every task as read,
    labeled or not, for the meta it holds; ``scores``: the labeled tasks' ``mislabel_score``). Each write merges
    into the task's meta as Label Studio holds it now (a task deleted meanwhile is skipped). Returns counts."""
    suspects = rank_suspects(scores, spec)
    written = 0
    updates = meta_updates(tasks, scores, suspects, version, keep)
    fresh = client.task_metas(project_id, updates) if updates else {}  # the user may have edited meta since the read
    for task_id, entry in updates.items():
        if task_id not in fresh:  # deleted meanwhile
            continue
        current = fresh[task_id]
        meta = with_entry(current, entry)
        if meta != (current if isinstance(current, dict) else {}):
            client.set_task_meta(task_id, meta)
            written += 1
    client.put_tab(project_id, SUSPECTS_TAB, suspects)
    if say:
        say(1.0, f"{len(suspects)} mislabel suspect(s) of {len(scores)} labeled tasks")
    return {"scored": len(scores), "suspects": len(suspects), "meta_written": written}
