"""A project's unlabeled backlog at any size: read page by page, predicted in chunks that any worker can take.

A prediction job must not hold a project's whole export (100k tasks with every annotation and prediction),
nor its whole task list, nor predict it in one worker while others sit idle. So:

* **the read** (``BacklogScan``) pages through Label Studio's task list and hands the unlabeled tasks on as
  chunks while it reads (a chunk keeps, per task, only id, data, meta and created_at: ``compact``); what the job
  needs after the backlog is kept in a bounded form (scores in arrays, a few tasks for the drift check and the
  misses tab); the labeled tasks are read in full afterwards, their truth kept;
* **the work**: chunks of ``CHUNK`` tasks (one bulk push each, so a chunk's predictions land whole or not at
  all) go to a ``ChunkRunner`` as the read makes them: ``run_here`` predicts them one after another in this
  process; the Celery face (``labelloop.tasks.sharding``) lets every prediction worker take chunks, from the
  first one on, while the job's worker still reads;
* **a chunk** (``predict_chunk``) needs only its ``ChunkContext`` (project, version, weights on the shared
  model volume, the label config) and its tasks, so it runs the same wherever it runs;
* **the human labels** are scored the same way, in chunks of labeled tasks with their truth (``score_chunk``:
  the mislabel score of each, for the suspects tab), which the job then ranks and writes.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from labelloop.config import Settings
from labelloop.config import settings as current_settings
from labelloop.core.labelconfig import ControlSpec, parse_label_config
from labelloop.core.negatives import RoughLabels, rough_labels
from labelloop.core.predict import load_model
from labelloop.core.truth import LabeledImage, truth_from_json, truth_to_json
from labelloop.labelstudio.client import LABELED, PREDICTION_CHUNK, TASK_PAGE, UNLABELED, StudioClient
from labelloop.labelstudio.media import MediaFetcher
from labelloop.labelstudio.results import first_label, labeled_image
from labelloop.workflows.suspects import entry_of, score_labeled

log = logging.getLogger(__name__)

CHUNK = PREDICTION_CHUNK  # tasks per chunk: one bulk import request, so a chunk is pushed whole or not at all
PAGE = TASK_PAGE  # tasks per page read
COMPACT_KEYS = ("id", "data", "meta", "created_at")

Progress = Callable[[float, str], None]


def compact(task: dict[str, Any]) -> dict[str, Any]:
    """What a prediction job keeps of a task: id, data, meta and created_at (not its annotations or predictions)."""
    return {key: task[key] for key in COMPACT_KEYS if key in task}


class ScoreBook:
    """Every unlabeled task's (score, predicted label) by the job's version, in ~20 bytes a task (arrays, not a dict
    of tuples): what the "label next" tab picks from, for a backlog of any size."""

    def __init__(self) -> None:
        self.ids = array("q")
        self.scores = array("d")  # NaN: no score
        self.labels = array("H")  # index into ``names``
        self.names: list[str] = []
        self._index: dict[str, int] = {}

    def add(self, task_id: int, score: float | None, label: str) -> None:
        if label not in self._index:
            self._index[label] = len(self.names)
            self.names.append(label)
        self.ids.append(int(task_id))
        self.scores.append(float("nan") if score is None else float(score))
        self.labels.append(self._index[label])

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class BacklogScan:
    """A prediction job's read of a project, made while its backlog is predicted (memory: what is kept below, not
    the tasks): ``chunks()`` pages through the task list and yields the unlabeled tasks without this version's
    prediction in chunks of ``CHUNK`` (compact), keeping on the way only

    * the ids of the labeled tasks, and the few unlabeled tasks holding a labelloop meta entry (to take back);
    * the rough labels of the tasks that carry some (``core/negatives.py``, for the misses tab);
    * the newest ``incoming_keep`` unlabeled tasks ``incoming`` picks (the drift check's: imported after the version);

    then ``read_labeled()`` reads the labeled tasks in full, keeping their truth (the suspects' scoring needs it).
    Tasks that already hold this version's prediction (a second run) are read first: their score goes to the book."""

    client: StudioClient
    project_id: int | str
    spec: ControlSpec
    version: str
    incoming: Callable[[dict[str, Any]], bool] | None = None
    incoming_keep: int = 0
    book: ScoreBook = field(default_factory=ScoreBook)
    labeled_ids: set[int] = field(default_factory=set)
    unlabeled: int = 0  # unlabeled tasks seen
    held: int = 0  # of which already predicted by this version
    seen: int = 0  # tasks read so far
    queued: int = 0  # tasks put in chunks so far
    with_entry: dict[int, dict[str, Any]] = field(default_factory=dict)  # unlabeled tasks with a meta entry (compact)
    rough: dict[int, RoughLabels] = field(default_factory=dict)  # tasks with rough labels
    held_results: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # their results, when held
    newest: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # heap of (id, compact) incoming tasks
    labeled: list[tuple[dict[str, Any], LabeledImage]] = field(default_factory=list)  # our control's truth
    untruthed: list[dict[str, Any]] = field(default_factory=list)  # annotated, no label of our control (compact)

    def chunks(self, size: int = CHUNK) -> Iterator[list[dict[str, Any]]]:
        held = self._read_held()
        chunk: list[dict[str, Any]] = []
        for task in self.client.iter_tasks(self.project_id, page_size=PAGE):
            task_id = int(task["id"])
            self.seen += 1
            if int(task.get("total_annotations") or 0) > 0:  # Label Studio counts the annotations not cancelled
                self.labeled_ids.add(task_id)
                continue
            self.unlabeled += 1
            kept = compact(task)
            if entry_of(kept) is not None:
                self.with_entry[task_id] = kept
            rough = rough_labels(kept.get("data"), self.spec.labels)
            if rough.given:
                self.rough[task_id] = rough
            if self.incoming is not None and self.incoming_keep > 0 and self.incoming(kept):
                item = (task_id, kept)
                if len(self.newest) < self.incoming_keep:
                    heapq.heappush(self.newest, item)
                elif task_id > self.newest[0][0]:
                    heapq.heapreplace(self.newest, item)
            if task_id in held:
                continue
            chunk.append(kept)
            self.queued += 1
            if len(chunk) >= size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def stream(self, total: int = 0, size: int = CHUNK) -> ChunkStream:
        """``chunks()`` as a runner takes them, with an estimate of the backlog's size for progress (``total``: the
        project's task count)."""
        return ChunkStream(self, total, size)

    def _read_held(self) -> set[int]:
        """Only when Label Studio counts predictions of this version: the unlabeled tasks holding one (their score
        into the book; their result kept only for tasks with rough labels)."""
        held: set[int] = set()
        if self.client.model_version_counts(self.project_id).get(self.version, 0) <= 0:
            return held
        # Label Studio's model-version filter misses tasks holding several versions; the prediction count
        # does not, so the candidates come from it and this version is picked out of each.
        holding = {"filter": "filter:tasks:total_predictions", "operator": "greater", "type": "Number", "value": 0}
        for task in self.client.iter_tasks(self.project_id, full=True, filters=[UNLABELED, holding], page_size=PAGE):
            mine = [p for p in task.get("predictions") or [] if p.get("model_version") == self.version]
            if mine:
                task_id, result = int(task["id"]), mine[-1].get("result") or []
                held.add(task_id)
                self.book.add(task_id, mine[-1].get("score"), first_label(result, self.spec))
                if rough_labels(task.get("data"), self.spec.labels).given:
                    self.held_results[task_id] = result
        self.held = len(held)
        return held

    def read_labeled(self) -> None:
        if not self.labeled_ids or not self.spec.kind.trained:
            return
        for task in self.client.iter_tasks(self.project_id, full=True, filters=[LABELED], page_size=PAGE):
            truth = labeled_image(task, self.spec)
            if truth is not None:
                self.labeled.append((compact(task), truth))
            else:
                self.untruthed.append(compact(task))

    def incoming_tasks(self) -> list[dict[str, Any]]:
        return [task for _, task in sorted(self.newest, key=lambda item: item[0])]


class ChunkStream:
    """A scan's chunks, and how many tasks the backlog will hold as far as the read knows (the tasks not read yet
    counted as backlog: the estimate only shrinks, so progress only grows)."""

    def __init__(self, scan: BacklogScan, total: int, size: int) -> None:
        self.scan, self.total, self.size = scan, total, size

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        return self.scan.chunks(self.size)

    def expected_tasks(self) -> int:
        return self.scan.queued + max(0, self.total - self.scan.seen)


def read_for_prediction(client: StudioClient, project_id: int | str, spec: ControlSpec, version: str) -> BacklogScan:
    """The whole scan without predicting (its chunks read and dropped): what a job keeps, for tests and the bench."""
    scan = BacklogScan(client, project_id, spec, version)
    for _ in scan.chunks():
        pass
    scan.read_labeled()
    return scan


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
    Returns ``{"pushed": {task id: [score, first label] (+ [result] for a task with rough labels)}, "errors": n,
    "seconds": {"predict": s, "push": s}}`` (task ids as strings: JSON; ``predict`` includes fetching the images)."""
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
        # the result goes back only where the misses tab needs it (tasks with rough labels): results of a whole
        # backlog would hold the job's memory and Redis in proportion to the project
        rough = {t["id"] for t in tasks if rough_labels(t.get("data"), spec.labels).given}
        return {"pushed": {str(item["task"]): [item["score"], first_label(item["result"], spec)]
                           + ([item["result"]] if item["task"] in rough else []) for item in payload},
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


ChunkRunner = Callable[[ChunkContext, Iterable[list[dict[str, Any]]], Progress], Iterable[dict[str, Any]]]


def run_here(context: ChunkContext, chunks: Iterable[list[dict[str, Any]]], progress: Progress,
             env: Settings | None = None) -> Iterator[dict[str, Any]]:
    """Every chunk in this process, one after another, as they come (one client and fetcher for all); yields
    what each returned, so neither the chunks nor their outputs are held together. Progress is over the tasks
    the chunks hold (a ``ChunkStream``: as far as its read knows)."""
    env = env or current_settings()
    done = 0
    with StudioClient.from_settings(env) as client, MediaFetcher.from_settings(env) as fetcher:
        for chunk in chunks:
            out = run_chunk(context, chunk, env, client, fetcher)
            done += len(chunk)
            total = max(done, expected_tasks(chunks) or done)
            progress(done / max(1, total), f"{done} of {total} tasks done")
            yield out


def expected_tasks(chunks: Iterable[list[dict[str, Any]]]) -> int | None:
    """How many tasks ``chunks`` will hold, for progress: a list's, or a ``ChunkStream``'s estimate (None: unknown)."""
    if isinstance(chunks, list):
        return sum(len(chunk) for chunk in chunks)
    estimate = getattr(chunks, "expected_tasks", None)
    return int(estimate()) if estimate is not None else None


def chunked(tasks: list[dict[str, Any]], size: int = CHUNK) -> list[list[dict[str, Any]]]:
    return [tasks[start : start + size] for start in range(0, len(tasks), size)]
