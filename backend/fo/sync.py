"""A Label Studio project as a FiftyOne dataset: one sample per task, keyed by the task id.

Fields written by labelloop (everything else on a sample — the analyst's fields, tags, saved views —
is never touched, and samples of tasks deleted in Label Studio are tagged ``ls:deleted``, not removed):

=======================  =====================================================================
``ls_task_id``           Label Studio task id (unique index)
``ls_project``           Label Studio project id
``ls_annotation``        "<annotation id>@<updated_at>" of the latest human annotation, or None
``ls_updated_at``        the task's ``updated_at`` when last synced (a later one: re-read its annotation)
``tuning_split``         "train" or "val" (the held-out tuning split training uses)
``ground_truth``         the latest human annotation (Classification or Detections)
``ground_truth_polygons`` segmentation projects: the human polygons (Polylines)
``predictions``          regions the version in service shows (confidence, per-class scores)
``candidates``           detection: every region above the candidate floor, shown or hidden
``class_probs``          classification: probability per class
``ls_score``             task score (see scoring.py; low = least confident)
``prediction_version``   the version that made ``predictions``
=======================  =====================================================================

Predictions are made by the engine (core/predict.py), the same code that answers Label Studio.

A sample's ``filepath`` is the dataset's own copy of the image (``<home>/fiftyone-media/<project>/``,
named by its content, hard-linked from the media cache where possible): the media cache evicts its
least recently used files, and a persistent dataset must not lose its images with them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labelloop.config import Settings
from labelloop.config import settings as current_settings
from labelloop.core.datasets import link_or_copy, split_of
from labelloop.core.labelconfig import ControlSpec, LabelConfigError, parse_label_config, threshold_for
from labelloop.core.predict import ImagePrediction, LoadedModel, load_model, predict_images
from labelloop.core.registry import Registry
from labelloop.errors import LabelloopError
from labelloop.fo.env import import_fiftyone, root_dataset
from labelloop.fo.writes import WRITE_BATCH, stored_classification, write_columns, write_values
from labelloop.labelstudio.client import LABELED, StudioClient
from labelloop.labelstudio.media import MediaFetcher
from labelloop.labelstudio.results import annotation_key, labeled_image
from labelloop.workflows import file_chunks
from labelloop.workflows.pipeline import image_url_of, resolve_model

log = logging.getLogger(__name__)
Progress = Callable[[float, str], None]
DELETED_TAG = "ls:deleted"
IMAGE_CHANGED_TAG = "ls:image-changed"  # the task now shows another image (its data edited, or an id reused)
PREDICTION_FIELDS = ("predictions", "candidates", "class_probs", "ls_score", "prediction_version")


def dataset_name_for(project_id: int | str) -> str:
    return f"labelloop-project-{project_id}"


def media_dir_for(project_id: int | str, env: Settings | None = None) -> Path:
    """The folder holding a project's FiftyOne images (the samples' ``filepath``), under the home."""
    env = env or current_settings()
    return env.home / "fiftyone-media" / str(int(project_id))  # int: a project id never makes a path


def own_copy(source: Path, folder: Path) -> Path:
    """``source`` hard-linked (or copied) into ``folder`` as ``<sha256 of its bytes><ext>``.

    The name comes from the content, so an image already there is reused, and the file appears
    whole or not at all (written beside, then renamed), whatever runs at the same time.
    """
    digest = hashlib.sha256()
    with open(source, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    target = folder / f"{digest.hexdigest()}{source.suffix.lower()}"
    if not target.exists():
        tmp = folder / f".{target.name}.{uuid.uuid4().hex}.tmp"
        try:
            link_or_copy(source, tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target


# -- Label Studio / engine objects → FiftyOne labels ------------------------------------------------

def ground_truth_labels(task: dict[str, Any], spec: ControlSpec) -> dict[str, Any]:
    """FiftyOne fields holding the latest human annotation of ``task`` (None values when unlabeled)."""
    fo = import_fiftyone()
    truth = labeled_image(task, spec)
    if spec.kind.whole_image:
        return {"ground_truth": fo.Classification(label=truth.label) if truth else None}
    if truth is None:  # boxes and outlines: None only without a human annotation (an empty one is a negative)
        return {"ground_truth": None} | ({"ground_truth_polygons": None} if spec.kind.polygons else {})
    regions = truth.regions
    detections = [fo.Detection(label=r.label, bounding_box=[r.box[0], r.box[1], r.box[2] - r.box[0], r.box[3] - r.box[1]])
                  for r in regions]
    out = {"ground_truth": fo.Detections(detections=detections)}
    if spec.kind.polygons:
        out["ground_truth_polygons"] = fo.Polylines(polylines=[
            fo.Polyline(label=r.label, points=[list(r.polygon)], closed=True, filled=True) for r in regions])
    return out


def prediction_labels(pred: ImagePrediction, spec: ControlSpec, version: str, stored: bool = False) -> dict[str, Any]:
    """FiftyOne fields for one engine prediction; ``stored``: a classification in its database form
    (``writes.stored_classification``), for ``write_columns``."""
    fo = import_fiftyone()
    fields: dict[str, Any] = {"ls_score": pred.score, "prediction_version": version}
    if spec.kind.whole_image:
        region = pred.regions[0] if pred.regions else None
        make = stored_classification if stored else fo.Classification
        fields["predictions"] = make(label=region.label, confidence=region.score) if region else None
        fields["class_probs"] = dict(pred.class_probs)
        return fields

    def detection(region) -> Any:
        x, y, w, h = region.bbox
        return fo.Detection(label=region.label, confidence=region.score,
                            bounding_box=[x / pred.width, y / pred.height, w / pred.width, h / pred.height],
                            class_probs=dict(region.class_probs))

    fields["predictions"] = fo.Detections(detections=[detection(r) for r in pred.regions])
    fields["candidates"] = fo.Detections(detections=[detection(r) for r in pred.candidates])
    return fields


# -- sync ------------------------------------------------------------------------------------------------

@dataclass
class SyncReport:
    dataset: str
    added: int = 0
    updated_ground_truth: int = 0
    predicted: int = 0
    marked_deleted: int = 0
    images_changed: int = 0
    missing_images: int = 0
    version: str | None = None
    errors: list[str] = field(default_factory=list)


def load_or_create(name: str):
    fo = import_fiftyone()
    if fo.dataset_exists(name):
        return fo.load_dataset(name)
    dataset = fo.Dataset(name, persistent=True)
    dataset.add_sample_field("ls_task_id", fo.IntField)
    dataset.create_index("ls_task_id", unique=True)
    return dataset


SYNC_BATCH = 500  # new tasks whose images are fetched and samples added at a time (memory: one batch)
READ_ONE_BY_ONE = 200  # changed labeled tasks read by id up to this many (one request a page); above, one paged pass


@dataclass
class _Known:
    """What the dataset holds of one task: its sample, the Label Studio ``updated_at`` it was synced at, and
    the annotation it shows."""

    sample_id: str
    updated_at: str | None
    annotation: str | None
    image_url: str | None


KNOWN_PAGE = 5000  # samples read at a time, in task id order


class _KnownInOrder:
    """The dataset's samples in ``ls_task_id`` order, a page at a time (each page one range query on the unique
    index), walked beside Label Studio's task list (also in id order): ``take(id)`` gives the sample of that task,
    ``passed(id)`` the samples of lower ids not taken (their tasks are gone), ``rest()`` those left at the end.

    The sync adds a new task's sample after the walk has passed its id (``passed`` reads pages until the head is
    at or above it), so a sample added during the walk lies at or below the pages already read: no later page
    returns it as a known one."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset
        self.page: list[tuple[int, _Known]] = []
        self.at = 0
        self.boundary: int | None = None  # the highest task id read so far
        self.done = not len(dataset)

    def _head(self) -> tuple[int, _Known] | None:
        while self.at >= len(self.page):
            if self.done:
                return None
            self._read_page()
        return self.page[self.at]

    def _read_page(self) -> None:
        fo = import_fiftyone()
        view = self.dataset.exists("ls_task_id")
        if self.boundary is not None:
            view = view.match(fo.ViewField("ls_task_id") > self.boundary)
        rows = view.sort_by("ls_task_id").limit(KNOWN_PAGE).values(
            ["ls_task_id", "id", "ls_updated_at", "ls_annotation", "ls_image_url"])
        self.page = [(int(t), _Known(i, u, a, m)) for t, i, u, a, m in zip(*rows)]
        self.at = 0
        if len(rows[0]) < KNOWN_PAGE:
            self.done = True
        if rows[0]:
            self.boundary = int(rows[0][-1])

    def take(self, task_id: int) -> _Known | None:
        head = self._head()
        if head is None or head[0] != task_id:
            return None
        self.at += 1
        return head[1]

    def passed(self, task_id: int) -> list[str]:
        out = []
        while (head := self._head()) is not None and head[0] < task_id:
            out.append(head[1].sample_id)
            self.at += 1
        return out

    def rest(self) -> list[str]:
        out = []
        while (head := self._head()) is not None:
            out.append(head[1].sample_id)
            self.at += 1
        return out


def sync_project(project_id: int | str, dataset_name: str | None = None, predict: bool = True,
                 progress: Progress | None = None, env: Settings | None = None, client=None,
                 runner: file_chunks.FilesRunner | None = None) -> SyncReport:
    """Create or update the FiftyOne dataset of a Label Studio project; only what changed is read and written.

    Label Studio is read page by page (``StudioClient.iter_tasks``): first every task's summary, whose
    ``updated_at`` moves when an annotation is saved, changed or deleted; then, in full, only the labeled tasks
    that are new or whose ``updated_at`` moved since the last sync. New samples are added a batch at a time and
    changed fields written in bulk, so memory holds a batch plus a few values per task, whatever the size.
    ``runner``: where the predictions' forward passes run (``predict_samples``).
    """
    env = env or current_settings()
    if client is None:
        with StudioClient.from_settings(env) as own:
            return _sync(own, project_id, dataset_name, predict, progress, env, runner)
    return _sync(client, project_id, dataset_name, predict, progress, env, runner)


def _sync(client: StudioClient, project_id: int | str, dataset_name: str | None, predict: bool,
          progress: Progress | None, env: Settings, runner: file_chunks.FilesRunner | None = None) -> SyncReport:
    say = progress or (lambda fraction, message: None)
    project = client.project(project_id)
    spec = parse_label_config(project["label_config"])
    if not spec.kind.trained:
        raise LabelConfigError(f"<{spec.result_type_tag} name=\"{spec.from_name}\">: {spec.kind.name} are served in "
                               "Label Studio but not synced to FiftyOne yet (only classification, boxes and polygons)")
    name = dataset_name or dataset_name_for(project_id)
    dataset = load_or_create(name)
    _declare_fields(dataset, spec)
    dataset.info["labelloop"] = {"project": int(project_id), "label_studio_url": env.label_studio_url,
                                 "task_type": spec.task_type, "label_config": project["label_config"]}
    dataset.save()
    report = SyncReport(dataset=name)

    # Label Studio's tasks (pages in id order) walked beside the dataset's samples (pages by ls_task_id, its unique
    # index): memory holds a page of each, a batch of new samples, and the tasks that changed — not the project
    say(0.02, f"reading the tasks of project {int(project_id)} from Label Studio")
    known = _KnownInOrder(dataset)
    changed: dict[int, str | None] = {}  # task -> its updated_at now: known tasks that changed, new labeled ones
    touched: dict[int, _Known] = {}  # what the dataset held of those (a new labeled task: its fresh sample)
    fresh: set[int] = set()  # the new labeled tasks (their ground truth comes with the changed ones')
    new_image: list[dict[str, Any]] = []  # known tasks that show another image now (compact)
    to_read: set[int] = set()  # labeled tasks, new or changed: their annotations are read
    batch: list[dict[str, Any]] = []  # new tasks waiting for their images (compact)
    gone: list[str] = []  # samples of deleted tasks, tagged a batch at a time
    media = media_dir_for(project_id, env)
    total, read = max(1, int(project.get("task_number") or 0)), 0
    empty = ground_truth_labels({"annotations": []}, spec)
    with MediaFetcher.from_settings(env) as fetcher:

        def add_batch() -> None:
            if not batch:
                return
            labeled_new = {int(t["id"]): t.get("updated_at") for t in batch if t["labeled"]}
            urls = [image_url_of(t, spec.value_key) for t in batch]  # cloud-storage URIs through Label Studio
            added = _add_samples(dataset, batch, fetcher.fetch_many(urls), {}, spec, project_id, media, report,
                                 pending_truth=labeled_new)
            for task_id, sample_id in added.items():
                if task_id in labeled_new:  # its annotation is read with the changed ones', then written
                    fresh.add(task_id)
                    touched[task_id] = _Known(sample_id, None, None, None)
                    changed[task_id] = labeled_new[task_id]  # written with its ground truth (see _add_samples)
            report.added += len(added)
            say(0.02 + 0.3 * min(1.0, read / total), f"added {report.added} new sample(s), read {read} of ~{total} tasks")
            batch.clear()

        for task in client.iter_tasks(project_id):
            task_id = int(task["id"])
            read += 1
            gone.extend(known.passed(task_id))  # samples whose task is no longer in Label Studio
            if len(gone) >= WRITE_BATCH:
                report.marked_deleted += _mark_deleted(dataset, gone)
                gone.clear()
            labeled = int(task.get("total_annotations") or 0) > 0
            mine = known.take(task_id)
            if mine is None:
                batch.append({"id": task_id, "data": task.get("data") or {}, "updated_at": task.get("updated_at"),
                              "labeled": labeled})
                if len(batch) >= SYNC_BATCH:
                    add_batch()
            elif mine.updated_at != task.get("updated_at"):
                changed[task_id], touched[task_id] = task.get("updated_at"), mine
                if (task.get("data") or {}).get(spec.value_key) != mine.image_url:
                    new_image.append({"id": task_id, "data": task.get("data") or {}})
            else:
                continue
            if labeled:
                to_read.add(task_id)
        add_batch()
        gone.extend(known.rest())
        report.marked_deleted += _mark_deleted(dataset, gone)
        truth = _read_truth(client, project_id, spec, to_read, lambda f, m: say(0.32 + 0.03 * f, m))
        report.updated_ground_truth = _update_changed(dataset, spec, touched, changed, truth, empty, fresh)
        say(0.35, f"{report.added} new sample(s), {len(changed) - len(fresh)} changed task(s)")
        _own_cached_images(dataset, fetcher, env, media, report)
        _replace_images(dataset, new_image, touched, fetcher, spec, media, report)

    if predict:
        model = serving_model(project_id, spec, env)
        if model is not None:
            report.version = model.version
            report.predicted = predict_samples(dataset, spec, model, progress=lambda f, m: say(0.35 + 0.6 * f, m),
                                               runner=runner, errors=report.errors)
    say(1.0, f"synced {name}: +{report.added} samples, {report.updated_ground_truth} annotation(s) updated, "
             f"{report.predicted} predicted")
    return report


def _read_truth(client: StudioClient, project_id: int | str, spec: ControlSpec, task_ids: set[int],
                progress: Progress) -> dict[int, tuple[str | None, dict[str, Any]]]:
    """Task id -> (annotation key, ground-truth fields) of the labeled tasks ``task_ids``: selected by id when they
    are few (an analyst re-syncing after a review), else in one paged pass over the labeled tasks."""
    out: dict[int, tuple[str | None, dict[str, Any]]] = {}
    if not task_ids:
        return out
    if len(task_ids) <= READ_ONE_BY_ONE:
        tasks: Any = client.select_tasks(project_id, task_ids, full=True)
    else:
        tasks = client.iter_tasks(project_id, full=True, filters=[LABELED])
    for task in tasks:
        if int(task["id"]) in task_ids:
            out[int(task["id"])] = (annotation_key(task), ground_truth_labels(task, spec))
            if len(out) % 500 == 0:
                progress(len(out) / len(task_ids), f"read {len(out)} of {len(task_ids)} annotated task(s)")
    return out


def _mark_deleted(dataset, sample_ids: list[str]) -> int:
    """Tag the samples of tasks deleted in Label Studio (never delete them: they may hold the analyst's work)."""
    if not sample_ids:
        return 0
    fresh = dataset.select(sample_ids).match_tags(DELETED_TAG, bool=False)
    count = len(fresh)
    fresh.tag_samples(DELETED_TAG)
    return count


def _replace_images(dataset, tasks: list[dict[str, Any]], known: dict[int, _Known], fetcher, spec: ControlSpec,
                    media: Path, report: SyncReport) -> None:
    """Samples whose task shows another image now (its data edited in Label Studio, or — SQLite reuses the
    highest id — a deleted task's id given to a new one): the new image, no predictions (they were of the old
    one: the next prediction pass makes them), and the tag ``ls:image-changed`` so the analyst sees that notes
    and tags on the sample were made on the old image. Nothing of theirs is removed."""
    if not tasks:
        return
    paths: dict[str, str] = {}
    urls: dict[str, Any] = {}
    retry: dict[str, Any] = {}  # sample id -> None: an updated_at that matches nothing, so the task is read again
    for task, image in zip(tasks, fetcher.fetch_many([image_url_of(t, spec.value_key) for t in tasks])):
        try:
            if isinstance(image, Exception):
                raise image
            sample_id = known[int(task["id"])].sample_id
            paths[sample_id] = str(own_copy(image, media))
            urls[sample_id] = task["data"].get(spec.value_key)
        except Exception as exc:  # the sample keeps its old image (and is looked at again next sync); the report says why
            report.missing_images += 1
            report.errors.append(f"task {task['id']}: its new image was not fetched: {exc}")
            retry[known[int(task["id"])].sample_id] = None
    if retry:
        write_columns(dataset, {"ls_updated_at": retry})
    if not paths:
        return
    cleared = {name: dict.fromkeys(paths) for name in PREDICTION_FIELDS if dataset.has_field(name)}
    write_columns(dataset, {"filepath": paths, "ls_image_url": urls, **cleared})
    dataset.select(list(paths)).tag_samples(IMAGE_CHANGED_TAG)
    report.images_changed = len(paths)


def _update_changed(dataset, spec: ControlSpec, known: dict[int, _Known], changed: dict[int, str | None],
                    truth: dict[int, tuple[str | None, dict[str, Any]]], empty: dict[str, Any],
                    fresh: set[int] | frozenset[int] = frozenset()) -> int:
    """Write the new ``updated_at`` of every changed task and, where its annotation changed, its ground truth
    (in bulk, a batch at a time); returns how many ground truths of known samples changed (``fresh``: samples this
    sync added, whose ground truth comes here too, not counted). A task left with no annotation shows none."""
    columns: dict[str, dict[str, Any]] = {"ls_updated_at": {}}
    updated = 0
    for task_id, updated_at in changed.items():
        mine = known[task_id]
        columns["ls_updated_at"][mine.sample_id] = updated_at
        key, fields = truth.get(task_id, (None, empty))
        if key != mine.annotation:
            columns.setdefault("ls_annotation", {})[mine.sample_id] = key
            for field_name, value in fields.items():
                columns.setdefault(field_name, {})[mine.sample_id] = value
            updated += task_id not in fresh
        if len(columns["ls_updated_at"]) >= WRITE_BATCH:
            write_columns(dataset, columns)
            columns = {"ls_updated_at": {}}
    write_columns(dataset, columns)
    return updated


def _declare_fields(dataset, spec: ControlSpec) -> None:
    """Declare the fields the update pass selects: a project synced before anything is labeled has
    only None values in them, which declare nothing, and selecting an undeclared field fails."""
    fo = import_fiftyone()
    kinds = {"ls_annotation": (fo.StringField, {}), "ls_updated_at": (fo.StringField, {}),
             "ls_image_url": (fo.StringField, {}),
             "ground_truth": (fo.EmbeddedDocumentField, {"embedded_doc_type": fo.Classification
                                                         if spec.kind.whole_image else fo.Detections})}
    if spec.kind.polygons:
        kinds["ground_truth_polygons"] = (fo.EmbeddedDocumentField, {"embedded_doc_type": fo.Polylines})
    for field_name, (kind, kwargs) in kinds.items():
        if not dataset.has_sample_field(field_name):
            dataset.add_sample_field(field_name, kind, **kwargs)


def _declare_prediction_fields(dataset, spec: ControlSpec, prefix: str = "") -> None:
    """Declare the fields ``prediction_labels`` fills, so every write of them takes the bulk path."""
    fo = import_fiftyone()
    kinds: dict[str, tuple[Any, dict[str, Any]]] = {"ls_score": (fo.FloatField, {}),
                                                    "prediction_version": (fo.StringField, {})}
    if spec.kind.whole_image:
        kinds["predictions"] = (fo.EmbeddedDocumentField, {"embedded_doc_type": fo.Classification})
        kinds["class_probs"] = (fo.DictField, {})
    else:
        for name in ("predictions", "candidates"):
            kinds[name] = (fo.EmbeddedDocumentField, {"embedded_doc_type": fo.Detections})
    for name, (kind, kwargs) in kinds.items():
        if not dataset.has_sample_field(prefix + name):
            dataset.add_sample_field(prefix + name, kind, **kwargs)


def _add_samples(dataset, tasks: list[dict[str, Any]], fetched: list,
                 truth: dict[int, tuple[str | None, dict[str, Any]]], spec: ControlSpec, project_id: int | str,
                 media: Path, report: SyncReport, pending_truth: dict[int, Any] | None = None) -> dict[int, str]:
    """One sample per task whose image arrived (copied into the project's media folder), with its ground truth
    from ``truth`` (none there: unlabeled); returns task id -> sample id of those added. A task in
    ``pending_truth`` (labeled, its annotation read later) gets no ``ls_updated_at`` yet: should the sync stop
    before its ground truth is written, the next one sees it changed and reads it."""
    fo = import_fiftyone()
    empty = ground_truth_labels({"annotations": []}, spec)
    samples = []
    for task, image in zip(tasks, fetched):
        try:
            if isinstance(image, Exception):
                raise image
            filepath = own_copy(image, media)
        except Exception as exc:  # one image (unfetchable, disk full) is that task's problem
            report.missing_images += 1
            report.errors.append(f"task {task['id']}: {exc}")
            continue
        key, fields = truth.get(int(task["id"]), (None, empty))
        pending = pending_truth is not None and int(task["id"]) in pending_truth
        sample = fo.Sample(filepath=str(filepath), ls_task_id=int(task["id"]), ls_project=int(project_id),
                           ls_image_url=(task.get("data") or {}).get(spec.value_key), ls_annotation=key,
                           ls_updated_at=None if pending else task.get("updated_at"), tuning_split=split_of(task["id"]))
        for field_name, value in fields.items():
            sample[field_name] = value
        samples.append(sample)
    if not samples:
        return {}
    ids = dataset.add_samples(samples, progress=False)
    return {int(sample["ls_task_id"]): str(sample_id) for sample, sample_id in zip(samples, ids)}


def _own_cached_images(dataset, fetcher, env: Settings, media: Path, report: SyncReport) -> None:
    """Move samples synced before the dataset owned its images off the media cache: each gets its own
    copy (fetched again if the cache has evicted it); only ``filepath`` changes."""
    if not len(dataset) or not dataset.has_field("ls_image_url"):
        return
    cache = os.path.abspath(env.cache_dir / "media") + os.sep
    fo = import_fiftyone()
    legacy = dataset.match(fo.ViewField("filepath").starts_with(cache))  # only those: not every sample's path
    ids, urls, paths = legacy.values(["id", "ls_image_url", "filepath"])
    stale = [(i, u) for i, u, p in zip(ids, urls, paths) if p and os.path.abspath(p).startswith(cache)]
    if not stale:
        return
    moved = {}
    for (sample_id, _url), fetched in zip(stale, fetcher.fetch_many([u or "" for _, u in stale])):
        try:
            if isinstance(fetched, Exception):
                raise fetched
            moved[sample_id] = str(own_copy(fetched, media))
        except Exception as exc:  # the sample keeps its old path; the report says why
            report.errors.append(f"sample {sample_id}: image not moved off the media cache: {exc}")
    if moved:
        write_values(dataset, "filepath", moved)


def serving_model(project_id, spec: ControlSpec, env: Settings | None = None) -> LoadedModel | None:

    env = env or current_settings()
    return resolve_model(Registry(env.model_dir), str(project_id), spec, env)


def model_for_version(project_id, version: str, env: Settings | None = None) -> LoadedModel:
    env = env or current_settings()
    manifest = Registry(env.model_dir).get(str(project_id), version)
    return load_model(manifest.weights, manifest.version)


def predict_samples(view, spec: ControlSpec, model: LoadedModel, force: bool = False, batch: int = 64,
                    progress: Progress | None = None, fields_prefix: str = "",
                    runner: file_chunks.FilesRunner | None = None, errors: list[str] | None = None) -> int:
    """Write the engine's predictions of ``model`` into the samples of ``view`` that lack them.

    ``runner`` decides where the forward passes run (``workflows.file_chunks``): default here, batch after
    batch; the plugin and the CLI can pass the Celery runner, which lets every prediction worker take chunks
    of the samples' files (on the volume they share) while this process writes what comes back. Returns the
    number of samples written; a chunk the workers failed leaves its samples for the next run, and its reason goes
    to ``errors`` (when nothing at all could be predicted, this raises with the first reason)."""
    say = progress or (lambda fraction, message: None)
    import_fiftyone()  # FiftyOne configured for labelloop before its first use
    version_field = f"{fields_prefix}prediction_version"
    if view.has_field(version_field):
        ids, paths, versions = view.values(["id", "filepath", version_field])
    else:
        ids, paths = view.values(["id", "filepath"])
        versions = [None] * len(ids)
    wanted = [(i, p) for i, p, v in zip(ids, paths, versions) if force or v != model.version]
    threshold = threshold_for(spec)
    dataset = root_dataset(view)
    if wanted:
        _declare_prediction_fields(dataset, spec, fields_prefix)
    # whole-image models see small inputs: one forward pass per batch of 64 is ~15 % faster per image than 4 of
    # 16 at 64 px (2 cores); detection and segmentation keep 16 (their inputs are up to 640 px a side)
    infer_batch = batch if spec.kind.whole_image else min(batch, 16)
    label_config = ((dataset.info or {}).get("labelloop") or {}).get("label_config")
    if runner is not None and not label_config:
        log.warning("dataset %s has no label config in its info (not made by a sync): predicting here", dataset.name)
        runner = None
    if runner is None:  # here: the model already loaded, a batch at a time
        parts = [wanted[start : start + batch] for start in range(0, len(wanted), batch)]
        results: Iterator[tuple[int, list[Any] | str]] = (
            (k, predict_images(model, [Path(p) for _, p in part], spec, threshold, batch=infer_batch))
            for k, part in enumerate(parts))
    else:
        parts = [wanted[start : start + file_chunks.CHUNK] for start in range(0, len(wanted), file_chunks.CHUNK)]
        context = file_chunks.FilesContext(str(model.path), model.version, label_config, threshold, infer_batch)
        results = runner(context, [[p for _, p in part] for part in parts])
    done = 0
    failed: list[str] = []
    columns: dict[str, dict[str, Any]] = {}
    # Writes run beside the next batches' forward passes (mongod works in its own process), one at a time:
    # memory holds at most the batch being written and the one being filled.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="labelloop-fo-write") as writer:
        pending: Future | None = None

        def flush() -> None:
            nonlocal pending, columns
            if pending is not None:
                pending.result()  # a failed write fails the job here, with FiftyOne's reason
            pending = writer.submit(write_columns, dataset, columns) if columns else None
            columns = {}

        for index, preds in file_chunks.closing(results):
            part = parts[index]
            preds = file_chunks.outputs_fit(part, preds)
            if isinstance(preds, str):  # a worker's chunk that failed: its samples keep what they had
                failed.append(preds)
                log.warning("%d samples not predicted with %s: %s", len(part), model.version, preds)
            else:
                for (sample_id, _), pred in zip(part, preds):
                    for key, value in prediction_labels(pred, spec, model.version, stored=True).items():
                        columns.setdefault(f"{fields_prefix}{key}", {})[sample_id] = value
                done += len(part)
                if len(next(iter(columns.values()), {})) >= WRITE_BATCH:
                    flush()
            say(done / max(1, len(wanted)), f"{done} of {len(wanted)} samples predicted with {model.version}"
                + (f" ({len(failed)} chunk(s) failed)" if failed else ""))
        flush()
        if pending is not None:
            pending.result()
    if failed and done == 0:
        raise LabelloopError(f"no sample could be predicted with {model.version}: {failed[0]}", kind="prediction")
    if errors is not None:
        errors.extend(f"{len(failed)} chunk(s) of samples not predicted: {reason}" for reason in failed[:3])
    return done

