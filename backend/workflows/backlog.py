"""A project's unlabeled backlog at any size: read page by page, predicted in chunks that any worker can take.

A prediction job must not hold a project's whole export (100k tasks with every annotation and prediction),
nor predict it in one worker while others sit idle. So:

* **the read** (``read_for_prediction``) pages through Label Studio's task list and keeps, per task, only
  what the job uses — id, data, meta, created_at (``compact``) and, for labeled tasks, the truth of our
  control; the predictions this version already has are read only for the tasks that may hold one;
* **the work** is cut into chunks of ``CHUNK`` tasks (one bulk push each, so a chunk's predictions land
  whole or not at all) and handed to a ``ChunkRunner``: ``run_here`` predicts them one after another in
  this process; the Celery face (``labelloop.tasks.sharding``) lets every prediction worker take chunks;
* **a chunk** (``predict_chunk``) needs only its ``ChunkContext`` (project, version, weights on the shared
  model volume, the label config) and its tasks, so it runs the same wherever it runs;
* **the human labels** are scored the same way, in chunks of labeled tasks with their truth (``score_chunk``:
  the mislabel score of each, for the suspects tab), which the job then ranks and writes.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from labelloop.config import Settings
from labelloop.config import settings as current_settings
from labelloop.core.labelconfig import ControlSpec, parse_label_config
from labelloop.core.predict import load_model
from labelloop.core.truth import LabeledImage, truth_from_json, truth_to_json
from labelloop.labelstudio.client import LABELED, PREDICTION_CHUNK, TASK_PAGE, UNLABELED, StudioClient
from labelloop.labelstudio.media import MediaFetcher
from labelloop.labelstudio.results import first_label, labeled_image
from labelloop.workflows.suspects import score_labeled

log = logging.getLogger(__name__)

CHUNK = PREDICTION_CHUNK  # tasks per chunk: one bulk import request, so a chunk is pushed whole or not at all
PAGE = TASK_PAGE  # tasks per page read
COMPACT_KEYS = ("id", "data", "meta", "created_at")

Progress = Callable[[float, str], None]


def compact(task: dict[str, Any]) -> dict[str, Any]:
    """What a prediction job keeps of a task: id, data, meta and created_at (not its annotations or predictions)."""
    return {key: task[key] for key in COMPACT_KEYS if key in task}


@dataclass
class ProjectRead:
    """What a prediction job reads of a project (memory: the compact form of each task)."""

    unlabeled: list[dict[str, Any]] = field(default_factory=list)  # no human annotation (compact)
    labeled: list[tuple[dict[str, Any], LabeledImage]] = field(default_factory=list)  # our control's truth
    held: dict[int, dict[str, Any]] = field(default_factory=dict)  # unlabeled task -> this version's prediction
    labeled_ids: set[int] = field(default_factory=set)  # every task with a human annotation
    untruthed: list[dict[str, Any]] = field(default_factory=list)  # annotated, but no label of our control (compact)


def read_for_prediction(client: StudioClient, project_id: int | str, spec: ControlSpec, version: str) -> ProjectRead:
    """Three paged reads: every task's summary (unlabeled tasks kept compact), the labeled tasks in full (their
    truth kept), and — only when Label Studio counts predictions of this version — the unlabeled tasks that hold
    predictions (this version's kept: score and result)."""
    read = ProjectRead()
    predicted = 0
    for task in client.iter_tasks(project_id, page_size=PAGE):
        if int(task.get("total_annotations") or 0) > 0:  # Label Studio counts the annotations not cancelled
            read.labeled_ids.add(int(task["id"]))
        else:
            read.unlabeled.append(compact(task))
            predicted += int(task.get("total_predictions") or 0) > 0
    if read.labeled_ids and spec.kind.trained:
        for task in client.iter_tasks(project_id, full=True, filters=[LABELED], page_size=PAGE):
            truth = labeled_image(task, spec)
            if truth is not None:
                read.labeled.append((compact(task), truth))
            else:
                read.untruthed.append(compact(task))
    if predicted and client.model_version_counts(project_id).get(version, 0) > 0:
        # Label Studio's model-version filter misses tasks holding several versions; the prediction count
        # does not, so the candidates come from it and this version is picked out of each.
        holding = {"filter": "filter:tasks:total_predictions", "operator": "greater", "type": "Number", "value": 0}
        for task in client.iter_tasks(project_id, full=True, filters=[UNLABELED, holding], page_size=PAGE):
            mine = [p for p in task.get("predictions") or [] if p.get("model_version") == version]
            if mine:
                read.held[int(task["id"])] = {"score": mine[-1].get("score"), "result": mine[-1].get("result") or []}
    return read


PREDICT, SCORE = "predict", "score"  # what a chunk does: push predictions of unlabeled tasks / score human labels


@dataclass(frozen=True)
class ChunkContext:
    """Everything a chunk needs besides its tasks; JSON-able, so a worker on another machine gets it."""

    project: str
    version: str
    weights: str  # on the model volume every worker mounts (MODEL_DIR), or a base model's path
    label_config: str
    work: str = PREDICT  # PREDICT: predict_chunk; SCORE: score_chunk

    def to_json(self) -> dict[str, str]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ChunkContext:
        work = str(data.get("work") or PREDICT)
        if work not in (PREDICT, SCORE):
            raise ValueError(f"unknown chunk work {work!r}")
        return cls(str(data["project"]), str(data["version"]), str(data["weights"]), str(data["label_config"]), work)


def predict_chunk(context: ChunkContext, tasks: list[dict[str, Any]], env: Settings | None = None,
                  client: StudioClient | None = None, fetcher=None) -> dict[str, Any]:
    """Predict one chunk of unlabeled tasks with the context's version and push the predictions in one request.
    Returns ``{"pushed": {task id: [score, first label, result]}, "errors": n, "seconds": {"predict": s, "push":
    s}}`` (task ids as strings: JSON; ``predict`` includes fetching the images)."""
    from labelloop.workflows.pipeline import predict_tasks  # the one prediction path (pipeline imports us)

    env = env or current_settings()
    spec = parse_label_config(context.label_config)
    model = load_model(context.weights, context.version)  # cached per process: a worker loads it once
    own_client = client is None
    client = client or StudioClient.from_settings(env)
    own_fetcher = fetcher is None
    fetcher = fetcher or MediaFetcher.from_settings(env)
    try:
        # The scores this job pushes order the Data Manager (the loop's uncertainty picks): for classification,
        # averaged over four label-preserving views — measured (bench/active_learning.py, 3 seeds, two runs)
        # above random picks from 120 labels and within noise at 80, where single-view scores fell below.
        started = time.perf_counter()
        predictions = predict_tasks(tasks, spec, model, fetcher, tta=spec.kind.whole_image, env=env)
        payload = [{"task": t["id"], "result": p.result, "score": p.score, "model_version": context.version}
                   for t, p in zip(tasks, predictions) if p.error is None]
        predicted = time.perf_counter()
        if payload:
            client.import_predictions(context.project, payload)
        return {"pushed": {str(item["task"]): [item["score"], first_label(item["result"], spec), item["result"]]
                           for item in payload},
                "errors": len(tasks) - len(payload),
                "seconds": {"predict": round(predicted - started, 4), "push": round(time.perf_counter() - predicted, 4)}}
    finally:
        if own_fetcher:
            fetcher.close()
        if own_client:
            client.close()


def labeled_items(labeled: list[tuple[dict[str, Any], LabeledImage]]) -> list[dict[str, Any]]:
    """The labeled tasks as a SCORE job's chunk items: the compact task with its truth under ``"truth"``."""
    return [{**task, "truth": truth_to_json(truth)} for task, truth in labeled]


def score_chunk(context: ChunkContext, items: list[dict[str, Any]], env: Settings | None = None,
                client: StudioClient | None = None, fetcher=None) -> dict[str, Any]:
    """Score one chunk of human labels (``labeled_items``) with the context's version: ``suspects.mislabel_score``
    of each. Writes nothing (which tasks are suspects depends on every chunk's scores: the job ranks and writes).
    Returns ``{"scores": {task id: score}, "pushed": {}, "errors": n, "seconds": {"predict": s}}``."""
    from labelloop.workflows.pipeline import predict_tasks

    env = env or current_settings()
    spec = parse_label_config(context.label_config)
    model = load_model(context.weights, context.version)
    labeled = [({k: v for k, v in item.items() if k != "truth"}, truth_from_json(item["truth"])) for item in items]
    own_fetcher = fetcher is None
    fetcher = fetcher or MediaFetcher.from_settings(env)
    try:
        started = time.perf_counter()
        predictions = [p.prediction for p in predict_tasks([t for t, _ in labeled], spec, model, fetcher, env=env)]
        scores = score_labeled(labeled, predictions, spec)
        return {"scores": {str(task_id): score for task_id, score in scores.items()}, "pushed": {},
                "errors": len(items) - len(scores), "seconds": {"predict": round(time.perf_counter() - started, 4)}}
    finally:
        if own_fetcher:
            fetcher.close()


def run_chunk(context: ChunkContext, tasks: list[dict[str, Any]], env: Settings | None = None,
              client: StudioClient | None = None, fetcher=None) -> dict[str, Any]:
    """One chunk of whichever work its context names."""
    if context.work == SCORE:
        return score_chunk(context, tasks, env, client, fetcher)
    return predict_chunk(context, tasks, env, client, fetcher)


ChunkRunner = Callable[[ChunkContext, list[list[dict[str, Any]]], Progress], list[dict[str, Any]]]


def run_here(context: ChunkContext, chunks: list[list[dict[str, Any]]], progress: Progress,
             env: Settings | None = None) -> list[dict[str, Any]]:
    """Every chunk in this process, one after another (one client and fetcher for all)."""
    env = env or current_settings()
    total = sum(len(c) for c in chunks)
    done, out = 0, []
    with StudioClient.from_settings(env) as client, MediaFetcher.from_settings(env) as fetcher:
        for chunk in chunks:
            out.append(run_chunk(context, chunk, env, client, fetcher))
            done += len(chunk)
            progress(done / max(1, total), f"{done} of {total} tasks predicted")
    return out


def chunked(tasks: list[dict[str, Any]], size: int = CHUNK) -> list[list[dict[str, Any]]]:
    return [tasks[start : start + size] for start in range(0, len(tasks), size)]
