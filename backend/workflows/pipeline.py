"""The engine's two workflows, shared by the HTTP service, the CLI and the Celery jobs.

* ``predict_tasks``: Label Studio tasks → one scored prediction per task (or a reason why not).
* ``train_new_version``: Label Studio tasks with annotations → a new registry version, promoted unless
  it is worse than the version in service on the same held-out tuning split by more than that split's
  noise (``gate.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from labelloop.config import Settings
from labelloop.config import settings as current_settings
from labelloop.core import acquisition, drift, gate, modeltests, pretrain, recipe
from labelloop.core.calibration import calibration_report
from labelloop.core.datasets import DatasetError, annotation_fingerprint, build_dataset, first_training_minimum
from labelloop.core.labelconfig import ControlSpec, LabelConfigError, parse_label_config, resolve_model_path, threshold_for
from labelloop.core.predict import ImagePrediction, LoadedModel, Region, load_model, predict_images
from labelloop.core.registry import VERSION_RE, Manifest, Registry
from labelloop.core.training import (
    Progress,
    choose_base,
    choose_settings,
    evaluate,
    image_sides,
    settings_dict,
    train,
)
from labelloop.core.yolo_env import import_yolo
from labelloop.errors import LabelloopError
from labelloop.labelstudio.client import StudioClient
from labelloop.labelstudio.media import MediaError, MediaFetcher, task_image_url
from labelloop.labelstudio.results import (
    labeled_images,
    prediction_result,
)
from labelloop.workflows import backlog
from labelloop.workflows.drift_check import check_incoming, created_after
from labelloop.workflows.misses import MISSES_TAB, refresh_misses
from labelloop.workflows.suspects import SUSPECTS_TAB, entry_of, publish_suspects

log = logging.getLogger(__name__)


# -- prediction ----------------------------------------------------------------------------------

def model_source(registry: Registry, project: str | int | None, spec: ControlSpec,
                 env: Settings | None = None, serving_of_its_kind_only: bool = False) -> tuple[Path, str] | None:
    """(weights file, version name) of the model that answers for ``project``, or None when there is
    none yet — without loading it (Label Studio gives ``/setup`` 3 s).

    Order: the project's version in service (trained by labelloop) → the tag's ``model_path`` (with
    ALLOW_CUSTOM_MODEL_PATH) → LABELLOOP_BASE_MODEL. The first two are what upstream configs expect;
    the trained version wins because it was trained from them on this project's labels.
    """
    env = env or current_settings()
    serving = registry.serving(project) if project is not None else None
    if serving is not None and (not serving_of_its_kind_only or serving.task_type == spec.task_type):
        return serving.weights, serving.version
    custom = resolve_model_path(spec, env.allow_custom_model_path, env.model_root)
    if custom is not None:
        return custom, f"custom-{custom.stem}"
    if env.base_model:
        path = Path(env.base_model)
        if not path.is_file():
            raise LabelConfigError(f"LABELLOOP_BASE_MODEL={env.base_model} does not exist")
        return path, f"base-{path.stem}"
    return None


def resolve_model(registry: Registry, project: str | int | None, spec: ControlSpec,
                  env: Settings | None = None) -> LoadedModel | None:
    """The model that answers for ``project`` (``model_source``), loaded and warmed; None when there is none."""
    source = model_source(registry, project, spec, env)
    return None if source is None else load_model(*source)


def control_source(registry: Registry, project: str | int | None, spec: ControlSpec,
                   env: Settings | None = None) -> tuple[Path, str] | None:
    """``model_source`` for one control of a config with several: the project's version in service only if
    it is of this control's kind (trained versions are per project and kind), else the tag's
    ``model_path``, else LABELLOOP_BASE_MODEL (whose kind is checked once loaded)."""
    return model_source(registry, project, spec, env, serving_of_its_kind_only=True)


def combined_version(versions: list[str | None]) -> str | None:
    """The ``model_version`` of a prediction drawn from several controls' models: their versions in control
    order, each once, joined by "+" (``/setup`` and ``/predict`` compute it alike)."""
    unique = list(dict.fromkeys(v for v in versions if v))
    return "+".join(unique) if unique else None


def resolve_control_models(registry: Registry, project: str | int | None, specs: list[ControlSpec],
                           env: Settings | None = None) -> tuple[list[tuple[ControlSpec, LoadedModel]], list[str], str | None]:
    """(control, loaded model) for every control that has a model that can answer it, why each other control
    is skipped, and the combined version (``combined_version`` of every control's source)."""
    from labelloop.core.predict import check_compatible

    served: list[tuple[ControlSpec, LoadedModel]] = []
    skipped: list[str] = []
    versions: list[str | None] = []
    for spec in specs:
        tag = f"<{spec.result_type_tag} name=\"{spec.from_name}\">"
        source = control_source(registry, project, spec, env)
        versions.append(source[1] if source else None)
        if source is None:
            skipped.append(f"{tag} skipped: no model (set its model_path, or LABELLOOP_BASE_MODEL to a "
                           f"{' or '.join(spec.kind.served_by)} model)")
            continue
        model = load_model(*source)
        try:
            check_compatible(model, spec)
            spec.require_label_map(model.names)
        except LabelConfigError as exc:
            skipped.append(f"{tag} skipped: {exc}")
            continue
        served.append((spec, model))
    return served, skipped, combined_version(versions)


def predict_controls(tasks: list[dict[str, Any]], served: list[tuple[ControlSpec, LoadedModel]], fetcher,
                     version: str, env: Settings | None = None,
                     timings: dict[str, float] | None = None) -> list[TaskPrediction]:
    """``predict_tasks`` for every served control, merged: one result list per task with every control's
    regions (ids ``ll<control>-<k>``, unique across controls) and one task score, the lowest of the
    controls' task scores (each is the probability that its part of the pre-label is right; the least
    confident part decides when the task needs review). A task where any control failed carries the
    reasons and scores 0 (review first); the other controls' regions stay."""
    per_control = [predict_tasks(tasks, spec, model, fetcher, env=env, timings=timings) for spec, model in served]
    out: list[TaskPrediction] = []
    for i, task in enumerate(tasks):
        merged = TaskPrediction(task_id=task.get("id"), model_version=version)
        scores, errors = [], []
        for c, preds in enumerate(per_control):
            part = preds[i]
            if part.error:
                errors.append(f"{served[c][0].from_name}: {part.error}")
                merged.error_kind = merged.error_kind or part.error_kind
                continue
            merged.result += [_in_control(item, c) for item in part.result]
            if part.score is not None:
                scores.append(part.score)
        if errors:
            merged.error = "; ".join(errors)
        else:
            merged.score = min(scores) if scores else None
        out.append(merged)
    return out


def _in_control(item: dict[str, Any], control: int) -> dict[str, Any]:
    """A result item's id (and a keypoint's ``parentID``) made unique across controls: ``ll<k>`` of control
    ``c`` becomes ``ll<c>-<k>``."""
    out = {**item, "id": f"ll{control}-{str(item.get('id', ''))[2:]}"}
    if "parentID" in item:
        out["parentID"] = f"ll{control}-{str(item['parentID'])[2:]}"
    return out


@dataclass
class TaskPrediction:
    task_id: Any
    result: list[dict] = field(default_factory=list)
    score: float | None = None
    model_version: str = ""
    error: str | None = None
    error_kind: str | None = None  # a fixed name for metrics (MediaError.kind, or no_image)
    prediction: ImagePrediction | None = None  # the engine's own (class probabilities, hidden candidates)

    def to_label_studio(self) -> dict[str, Any]:
        return {"result": self.result, "score": 0.0 if self.score is None else round(self.score, 6),
                "model_version": self.model_version}


def predict_tasks(tasks: list[dict[str, Any]], spec: ControlSpec, model: LoadedModel, fetcher,
                  threshold: float | None = None, batch: int | None = None, tta: bool = False,
                  env: Settings | None = None, timings: dict[str, float] | None = None) -> list[TaskPrediction]:
    """One TaskPrediction per task, in order. A task whose image is missing, broken or refused gets an
    empty result with ``error`` set; the others are predicted in batches. ``tta``: see predict_images.

    Fetching and inference overlap: while one batch is predicted, the next images are being fetched
    (``fetcher.fetch_ahead``, at most two batches ahead; a fetcher without it fetches everything first).

    ``timings`` (optional) gets the seconds of each phase added, which sum to the call's time: ``fetch``
    (waiting for images — download, cache, full decode check — that inference did not hide), ``infer``
    (ultralytics: load, letterbox, forward, NMS) and ``serialize`` (Label Studio JSON)."""
    clock = timings if timings is not None else {}
    mark = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        clock[phase] = clock.get(phase, 0.0) + now - mark
        mark = now

    env = env or current_settings()
    threshold = threshold_for(spec, env) if threshold is None else threshold
    size = max(1, int(batch or env.predict_batch or 1))
    out = [TaskPrediction(task_id=t.get("id"), model_version=model.version) for t in tasks]
    urls = []
    for i, task in enumerate(tasks):
        try:
            url = task_image_url(task, spec.value_key)  # a cloud-storage URI: Label Studio's presign path
        except MediaError as exc:
            url, out[i].error, out[i].error_kind = None, str(exc), exc.kind
        if out[i].error is None and not url:
            out[i].error = f"task data has no image under '{spec.value_key}'"
            out[i].error_kind = "no_image"
        urls.append(url if out[i].error is None else None)
    wanted = [i for i, url in enumerate(urls) if url is not None]

    def predict(ready: list[tuple[int, Path]]) -> None:
        lap("fetch")
        if not ready:
            return
        preds = predict_images(model, [p for _, p in ready], spec, threshold, size, tta=tta)
        lap("infer")
        for (i, _), pred in zip(ready, preds):
            out[i].result = prediction_result(pred, spec)
            out[i].score = pred.score
            out[i].prediction = pred
        lap("serialize")

    with _fetch_ahead(fetcher, [urls[i] for i in wanted], window=2 * size) as fetched:
        ready: list[tuple[int, Path]] = []
        for k, i in enumerate(wanted):
            item = fetched.result(k)
            if isinstance(item, Exception):
                out[i].error = str(item)
                out[i].error_kind = item.kind if isinstance(item, LabelloopError) else "error"
            else:
                ready.append((i, item))
            if len(ready) == size:  # a full batch: predict it while the next images arrive
                predict(ready)
                ready = []
        predict(ready)  # the last, partial batch (or none: the fetch wait is still counted)
    for p in out:
        if p.error:
            log.warning("task %s: no prediction: %s", p.task_id, p.error)
    return out


def image_url_of(task: dict[str, Any], key: str) -> str:
    """``task_image_url``, "" (the fetcher's "empty image URL") for none; a cloud-storage URI that cannot be
    presigned stays as it is, and the fetcher refuses it with the reason."""
    try:
        return task_image_url(task, key) or ""
    except MediaError:
        value = (task.get("data") or {}).get(key)
        return value if isinstance(value, str) else ""


class _FetchedFirst:
    """``fetch_ahead``'s interface over a plain ``fetch_many``: everything fetched up front."""

    def __init__(self, fetcher, urls: list[str]):
        self._items = fetcher.fetch_many(urls) if urls else []

    def result(self, k: int):
        return self._items[k]

    def __enter__(self) -> _FetchedFirst:
        return self

    def __exit__(self, *exc) -> None:
        pass


def _fetch_ahead(fetcher, urls: list[str], window: int):
    ahead = getattr(fetcher, "fetch_ahead", None)
    if callable(ahead) and urls:
        return ahead(urls, window=window)
    return _FetchedFirst(fetcher, urls)


# -- training ------------------------------------------------------------------------------------

class NothingNew(LabelloopError):
    """No annotation changed since the last version: training again would learn nothing new."""

    kind, http_status = "nothing_new", 409


@dataclass
class TrainOutcome:
    manifest: Manifest
    promoted: bool
    reason: str
    compared_with: str | None = None
    serving_metrics_now: dict[str, float] | None = None


def train_new_version(registry: Registry, project: str | int, tasks: list[dict[str, Any]], spec: ControlSpec,
                      fetcher, progress: Progress | None = None, min_train: int = 2,
                      skip_if_unchanged: bool = False, env: Settings | None = None) -> TrainOutcome:
    """Export → dataset → train → evaluate → register → promote-if-not-worse.

    Trains from ``choose_base`` (the user's weights or the recipe's architecture) every round; the
    version in service is the manifest's ``parent`` and the bar to promotion. Raises DatasetError/TrainingError with a reason, and
    NothingNew when ``skip_if_unchanged`` and the newest version saw exactly these annotations.
    """
    env = env or current_settings()
    say = progress or (lambda fraction, message: None)
    if spec.multiple:  # never trained as single-label behind the labeler's back
        raise DatasetError(f"<Choices name=\"{spec.from_name}\"> is choice=\"multiple\": labelloop serves it "
                           "(every class at or above the threshold) but cannot train it, ultralytics classifiers "
                           "are single-label; train from single-label Choices, or serve a model_path or base model")
    if spec.oriented:
        raise DatasetError(f"<RectangleLabels name=\"{spec.from_name}\"> has model_obb=\"true\": labelloop serves "
                           "an OBB model's rotated boxes (a base model or model_path) but does not train OBB models")
    if not spec.kind.trained:
        raise DatasetError(f"<{spec.result_type_tag} name=\"{spec.from_name}\">: labelloop serves {spec.kind.name} "
                           f"from an ultralytics {spec.kind.ultralytics_task} model (a base model or model_path) but "
                           "does not train them")
    images = labeled_images(tasks, spec)
    if len(images) < min_train:
        raise DatasetError(f"project {project} has {len(images)} labeled task(s) for '{spec.from_name}'; "
                           f"need at least {min_train}")
    fingerprint = annotation_fingerprint(images)
    latest = (registry.versions(project) or [None])[-1]
    if skip_if_unchanged and latest is not None and latest.data_fingerprint == fingerprint:
        raise NothingNew(f"no annotation changed since {latest.version}")
    say(0.0, f"fetching {len(images)} images")
    url_of = {t.get("id"): image_url_of(t, spec.value_key) for t in tasks}
    fetched = fetcher.fetch_many([url_of[image.task_id] for image in images])
    image_paths = {image.task_id: p for image, p in zip(images, fetched) if not isinstance(p, Exception)}
    failures = [str(p) for p in fetched if isinstance(p, Exception)]
    if failures:
        log.warning("project %s: %d image(s) could not be fetched, e.g. %s", project, len(failures), failures[0])

    serving = registry.serving(project)
    task = spec.kind.ultralytics_task
    with tempfile.TemporaryDirectory(prefix="labelloop-train-") as tmp:
        # The first-training minimum counts labeled tasks (checked above, as README promises); the split
        # only needs two training images (BatchNorm), or which tasks the id hash puts in the tuning
        # split would decide whether 10 labels are enough.
        costs = modeltests.load_costs(registry.project_dir(project), spec.labels)
        repeats = modeltests.training_repeats(costs, spec.labels) if costs is not None else {}
        dataset = build_dataset(images, spec, image_paths, Path(tmp) / "data", min_train=2, repeats=repeats)
        # epochs come from optimizer steps over the files training sees: up-weighting costs no extra steps
        chosen = choose_settings(dataset.counts["train_files"], image_sides(list(image_paths.values())), spec.kind, env,
                                 n_images=dataset.counts["train"])
        same_classes = serving is not None and serving.task == task and sorted(serving.classes) == sorted(dataset.classes)
        # Every round trains afresh from the base (the user's weights or the recipe's architecture),
        # not from the version in service: measured on the demo's loop (40 -> 240 labels), a fine-tune
        # chain was no better (0.79-1.00 vs 0.83-0.99 per round), and a version that depends only on
        # its labels and its base cannot inherit an early bad optimum.
        base = choose_base(spec, resolve_model_path(spec, env.allow_custom_model_path, env.model_root), env,
                           chosen.imgsz, warm_start=lambda architecture: registry.warm_start(project, architecture))
        parent = serving.version if serving is not None else None
        say(0.02, f"training from {Path(base).name}: {dataset.counts['train']} train / "
                  f"{dataset.counts['val']} tuning images, {chosen.epochs} epochs at {chosen.imgsz} px")

        def train_progress(fraction: float, message: str) -> None:
            say(0.02 + 0.88 * fraction, message)

        weights = train(dataset, spec, base, chosen, Path(tmp) / "run", train_progress)
        say(0.92, "evaluating on the tuning split")
        metrics = evaluate(weights, dataset, chosen.imgsz, chosen.device)
        calibration = calibrate_on_tuning_split(weights, dataset, spec) if spec.kind.whole_image else {}
        # the tuning split task by task: the project's tests, what changed, and what the errors cost
        tuning = tuning_items(images, image_paths, dataset, tasks)
        candidate = answer_predictor(weights, "candidate", spec)
        current = ((serving.version, answer_predictor(serving.weights, serving.version, spec))
                   if serving is not None and same_classes else None)
        model_tests = run_model_tests(registry, project, spec, tuning, candidate, current, image_paths, fetcher,
                                      url_of, say)
        changes = trace_changes(tuning, candidate, current, env.label_studio_url, project)
        if costs is not None and tuning:  # value-aligned: what the errors cost, beside the plain metric
            images_of = [item.image for item in tuning]
            model_tests["costs"] = modeltests.compare_costs(
                tuning, candidate(images_of), current[1](images_of) if current else None, costs)
            if current:
                model_tests["costs"]["compared_with"] = current[0]
            metrics = {**metrics, "cost": model_tests["costs"]["cost"]}

        names = dict(import_yolo()(str(weights)).names)
        classes = [names[i] for i in sorted(names)]
        manifest = registry.add_version(project, weights, {
            "parent": parent,
            "task": task,
            "task_type": spec.task_type,
            "classes": classes,
            "counts": dataset.counts,
            "metrics": metrics,
            "settings": {**settings_dict(chosen), "recipe": recipe.describe(spec.kind, chosen.imgsz, dataset.counts["train"],
                                                                            base),
                         **({"upweighted": repeats} if repeats else {})},
            "base": base,
            "data_fingerprint": fingerprint,
            "calibration": calibration,
            "model_tests": model_tests,
            "changes": changes,
        })
        outcome = _promote_if_not_worse(registry, project, manifest, serving, same_classes, dataset, chosen)
    say(1.0, outcome.reason)
    return outcome


def tuning_items(images, image_paths: dict, dataset, tasks: list[dict[str, Any]]) -> list[modeltests.TuningItem]:
    """The tuning split's labeled tasks: id, human label (classification) or regions (boxes, polygons; an image
    with none is a negative the version must leave empty), image, the task's data and meta."""
    by_id = {t.get("id"): t for t in tasks}
    truth = {image.task_id: image for image in images}
    out = []
    for task_id in dataset.task_ids.get("val", []):
        image = truth.get(task_id)
        if image is None or task_id not in image_paths:
            continue
        task = by_id.get(task_id) or {}
        out.append(modeltests.TuningItem(int(task_id), image.label, image_paths[task_id], dict(task.get("data") or {}),
                                          dict(task.get("meta") or {}),
                                          None if image.label is not None else tuple(image.regions)))
    return out


def answer_predictor(weights: Path, version: str, spec: ControlSpec) -> modeltests.Predict:
    """images → what a version says of each with its weights, as labelers see it (the display threshold): a
    label, or its regions in image fractions; an image file is predicted once (the model tests, the regression
    trace and the costs read the same tuning predictions)."""
    model = load_model(weights, version)
    seen: dict[str, modeltests.Answer] = {}

    def predict(batch: list[Any]) -> list[modeltests.Answer]:
        todo = [b for b in batch if isinstance(b, np.ndarray) or str(b) not in seen]
        preds = predict_images(model, todo, spec, threshold_for(spec)) if todo else []
        fresh = [modeltests.answer_of(p, spec.kind.whole_image) for p in preds]
        arrays = iter(label for b, label in zip(todo, fresh) if isinstance(b, np.ndarray))
        seen.update({str(b): label for b, label in zip(todo, fresh) if not isinstance(b, np.ndarray)})
        return [next(arrays) if isinstance(b, np.ndarray) else seen[str(b)] for b in batch]

    return predict


def run_model_tests(registry: Registry, project, spec: ControlSpec, tuning: list[modeltests.TuningItem],
                    candidate: modeltests.Predict, current: tuple[str, modeltests.Predict] | None,
                    image_paths: dict, fetcher, url_of: dict, say: Progress) -> dict[str, Any]:
    """The project's model tests (``core/modeltests.py``) on the tuning split, for the new version and,
    beside it, the version in service (same tasks, same tests): {} when the project has none."""
    tests = modeltests.load_suite(registry.project_dir(project), spec.labels)
    if not tests:
        return {}
    modeltests.check_kind(spec.kind, tests)
    say(0.94, f"running {len(tests)} model test(s) on the tuning split")
    wanted = sorted({t for test in tests for t in test.tasks if t in url_of and t not in image_paths})
    examples = dict(image_paths)
    for task_id, fetched in zip(wanted, fetcher.fetch_many([url_of[t] for t in wanted]) if wanted else []):
        if not isinstance(fetched, Exception):
            examples[task_id] = fetched
    out: dict[str, Any] = {"results": modeltests.run_suite(tests, tuning, candidate, examples), "tuning_tasks": len(tuning)}
    if current is not None:
        out["serving"] = {"version": current[0], "results": modeltests.run_suite(tests, tuning, current[1], examples)}
    return out


def trace_changes(tuning: list[modeltests.TuningItem], candidate: modeltests.Predict,
                  current: tuple[str, modeltests.Predict] | None, label_studio_url: str = "",
                  project=None) -> dict[str, Any]:
    """Which tuning tasks the new version gets wrong that the version in service got right (``regressed``)
    and the other way round (``fixed``), so a drop points at the items behind it (first 50 ids each, the
    counts, and Label Studio links to the first regressions)."""
    if current is None or not tuning:
        return {}
    images = [item.image for item in tuning]
    new, old = candidate(images), current[1](images)
    right_new = [modeltests.is_right(i, a) for i, a in zip(tuning, new)]
    right_old = [modeltests.is_right(i, b) for i, b in zip(tuning, old)]
    regressed = [i.task_id for i, a, b in zip(tuning, right_new, right_old) if b and not a]
    fixed = [i.task_id for i, a, b in zip(tuning, right_new, right_old) if a and not b]
    shown = modeltests.SHOWN_FAILING
    out: dict[str, Any] = {"compared_with": current[0], "regressed": regressed[:shown], "regressed_count": len(regressed),
                           "fixed": fixed[:shown], "fixed_count": len(fixed), "tuning_tasks": len(tuning)}
    if label_studio_url and project is not None and regressed:
        base = label_studio_url.rstrip("/")
        out["links"] = [f"{base}/projects/{project}/data?task={t}" for t in regressed[:10]]
    return out


def _describe_changes(changes: dict[str, Any]) -> str:
    if not changes or not changes.get("regressed_count"):
        return ""
    ids = ", ".join(str(t) for t in changes["regressed"][:10]) + (", …" if changes["regressed_count"] > 10 else "")
    return (f"; {changes['regressed_count']} tuning task(s) it gets wrong that {changes['compared_with']} got right "
            f"({ids}), {changes['fixed_count']} the other way")


def calibrate_on_tuning_split(weights: Path, dataset, spec: ControlSpec) -> dict[str, Any]:
    """Temperature scaling of a classifier on its tuning split (``calibration.py``); {} without one."""

    images, labels = [], []
    for index, label in enumerate(dataset.classes):
        for path in sorted(dataset.class_dir("val", label).glob("*")):
            images.append(path)
            labels.append(index)
    if not images:
        return {}
    model = load_model(weights, "uncalibrated")
    preds = predict_images(model, images, spec, 0.5)
    probs = [[p.class_probs.get(label, 0.0) for label in dataset.classes] for p in preds]
    report = calibration_report(probs, labels)
    report["on"] = "tuning split"
    return report


def _promote_if_not_worse(registry: Registry, project, manifest: Manifest, serving: Manifest | None,
                          comparable: bool, dataset, chosen) -> TrainOutcome:
    failed = modeltests.failed_required((manifest.model_tests or {}).get("results") or [])
    if failed:  # the project's own bar comes first: a required model test keeps the version out
        reason = (f"{manifest.version} kept out: {len(failed)} required model test(s) failed on the tuning split: "
                  f"{modeltests.describe_failures(failed)}{_describe_changes(manifest.changes)}")
        return TrainOutcome(manifest, False, reason, compared_with=serving.version if serving else None)
    new = manifest.metrics["primary"]
    if serving is None:
        reason = f"{manifest.version} promoted: first version (primary metric {new:.3f})"
        registry.promote(project, manifest.version, reason)
        return TrainOutcome(manifest, True, reason)
    if not comparable:
        reason = f"{manifest.version} promoted: classes changed since {serving.version}, not comparable"
        registry.promote(project, manifest.version, reason)
        return TrainOutcome(manifest, True, reason, compared_with=serving.version)
    # Re-evaluate the version in service on today's tuning split: both numbers on the same tasks.
    old_metrics = evaluate(serving.weights, dataset, chosen.imgsz, chosen.device)
    old = old_metrics["primary"]
    n = int(dataset.counts["val"])
    costs = (manifest.model_tests or {}).get("costs") or {}
    if "serving_cost" in costs:  # the project said what errors cost: that decides, the plain metric is reported
        mine, theirs, noise = costs["cost"], costs["serving_cost"], costs["tolerance"]
        plain = f"plain {manifest.metrics.get('primary', 0.0):.3f} vs {old:.3f}"
        promoted = mine <= theirs + noise + 1e-12
        reason = (f"{manifest.version} promoted: mean cost {mine:.3f} per tuning task <= {theirs:.3f} of "
                  f"{serving.version} (+{noise:.3f} noise) on the same tuning split ({plain})" if promoted else
                  f"{manifest.version} kept out of service: mean cost {mine:.3f} per tuning task > {theirs:.3f} of "
                  f"{serving.version} by more than the {noise:.3f} the split can tell ({plain})")
    else:
        allowed = gate.tolerance(old, n)
        promoted = gate.should_promote(new, old, n)
        relation = ">=" if new >= old else f"within {allowed:.3f} (noise of {n} images) of"
        reason = (f"{manifest.version} promoted: {new:.3f} {relation} {old:.3f} of {serving.version} "
                  f"on the same tuning split" if promoted else
                  f"{manifest.version} kept out of service: {new:.3f} < {old:.3f} of {serving.version} on the same "
                  f"tuning split, by more than the {allowed:.3f} a split of {n} images can tell")
    if promoted:
        registry.promote(project, manifest.version, reason)
    else:
        reason += _describe_changes(manifest.changes)
        log.info("project %s: %s", project, reason)
    return TrainOutcome(manifest, promoted, reason, serving.version, old_metrics)


def train_from_label_studio(project_id: int | str, progress: Progress | None = None, env: Settings | None = None,
                  force: bool = True) -> TrainOutcome:
    """Train a new version for a Label Studio project, reading the truth from its API.

    ``force`` (the CLI, Label Studio's "Start training" button): train on whatever is labeled (at
    least 2 tasks). Not forced (annotation events): wait for ``first_training_minimum`` labeled
    tasks before the first version, and skip when no annotation changed since the newest version.
    """

    env = env or current_settings()
    registry = Registry(env.model_dir)
    registry.remove_stale_temp()
    with StudioClient.from_settings(env) as client:
        project = client.load_labeled(project_id)  # page by page: training uses only the labeled tasks
        tasks = project.tasks + _tasks_named_by_tests(client, registry, project_id, project)
    first = registry.serving(project_id) is None
    min_train = 2 if force or not first else first_training_minimum(project.spec)
    with MediaFetcher.from_settings(env) as fetcher:
        return train_new_version(registry, project_id, tasks, project.spec, fetcher, progress,
                                 min_train=min_train, skip_if_unchanged=not force, env=env)


def _tasks_named_by_tests(client: StudioClient, registry: Registry, project_id: int | str, project) -> list[dict[str, Any]]:
    """Tasks the project's model tests name as examples that nobody labeled (their images are checked too), read
    through the Data Manager's list; a suite that does not load is left to the training, which says why."""
    try:
        suite = modeltests.load_suite(registry.project_dir(project_id), project.spec.labels)
    except Exception:  # train_new_version loads it again and reports the reason
        return []
    labeled = {int(task["id"]) for task in project.tasks}
    wanted = {int(t) for test in suite for t in test.tasks} - labeled
    out = list(client.select_tasks(project_id, wanted, full=True)) if wanted else []
    for task_id in sorted(wanted - {int(t["id"]) for t in out}):  # deleted: the test reports its example as missing
        log.warning("project %s: model-test example task %s not found", project_id, task_id)
    return out


WARM_START_MIN_IMAGES = 32  # fewer images than this teach a contrastive pretraining nothing useful
WARM_START_REFRESH = 1.5  # rebuild when the project has this many times the images the last one saw


def build_warm_start(registry: Registry, project: str | int, tasks: list[dict[str, Any]], spec: ControlSpec,
                     fetcher, progress: Progress | None = None, env: Settings | None = None,
                     steps: int | None = None) -> dict[str, Any]:
    """The project's self-supervised warm start (``pretrain.py``) from every task image, labeled or not.

    Every later training of the project starts from it (``training.choose_base``). Measured on the
    demo's data (bench/pretraining.py): it is what makes 40–80 labels useful. Only for classification
    trained from the recipe's own architecture: a project with the user's weights or config keeps
    them, and detection/segmentation have no warm start yet. Returns what was done, or why not.
    """
    import json
    import random


    env = env or current_settings()
    say = progress or (lambda fraction, message: None)
    steps = env.warm_start_steps if steps is None else steps
    if steps <= 0:
        return {"skipped": "warm start switched off (LABELLOOP_WARM_START_STEPS=0)"}
    if not spec.kind.whole_image:
        return {"skipped": f"no warm start for {spec.task_type} yet"}
    if spec.multiple:
        return {"skipped": "multi-label Choices (choice=\"multiple\") are not trained, so no warm start"}
    if resolve_model_path(spec, env.allow_custom_model_path, env.model_root) or env.base_model or env.model_config:
        return {"skipped": "the project trains from the user's weights or model config"}
    urls = [u for u in (image_url_of(t, spec.value_key) for t in tasks) if u]
    if len(urls) < WARM_START_MIN_IMAGES:
        return {"skipped": f"{len(urls)} images; a warm start needs at least {WARM_START_MIN_IMAGES}"}
    sample = random.Random(0).sample(urls, min(len(urls), pretrain.MAX_IMAGES))
    say(0.0, f"fetching {len(sample)} images")
    paths = [p for p in fetcher.fetch_many(sample) if not isinstance(p, Exception)]
    if len(paths) < WARM_START_MIN_IMAGES:
        return {"skipped": f"only {len(paths)} of {len(sample)} images could be fetched"}
    imgsz = choose_settings(len(paths), image_sides(paths), spec.kind, env).imgsz
    target = registry.warm_start_path(project, recipe.model_config(spec.kind, imgsz))
    info_path = target.with_suffix(".json")
    try:
        previous = json.loads(info_path.read_text()) if target.is_file() else None
    except (OSError, ValueError):
        previous = None
    if previous and len(paths) < WARM_START_REFRESH * int(previous.get("images", 0)):
        return {"skipped": f"up to date: built from {previous['images']} images", **previous}

    def pretrain_progress(fraction: float, message: str) -> None:
        say(0.05 + 0.95 * fraction, message)

    pretrain.pretrain_classifier(paths, imgsz, target, steps=steps, progress=pretrain_progress)
    info = {"images": len(paths), "imgsz": imgsz, "steps": steps, "architecture": target.stem, "path": str(target)}
    partial = info_path.with_name(info_path.name + ".partial")
    partial.write_text(json.dumps(info))
    partial.replace(info_path)
    return {"built": True, **info}


def warm_start_from_label_studio(project_id: int | str, progress: Progress | None = None,
                       env: Settings | None = None) -> dict[str, Any]:
    """``build_warm_start`` for a Label Studio project, reading its tasks from the API."""

    env = env or current_settings()
    with StudioClient.from_settings(env) as client:  # only the images matter: ids and data, page by page
        spec = parse_label_config(client.project(project_id)["label_config"])
        tasks = client.image_tasks(project_id)
    with MediaFetcher.from_settings(env) as fetcher:
        return build_warm_start(Registry(env.model_dir), project_id, tasks, spec, fetcher, progress, env)


def predict_unlabeled(project_id: int | str, version: str, progress: Progress | None = None,
                      env: Settings | None = None, runner: backlog.ChunkRunner | None = None) -> dict[str, Any]:
    """Predict every task of the project without a human annotation with ``version`` and push the
    predictions to Label Studio (never touching annotations); then, if ``version`` is still the one
    in service, rewrite the "label next" tab, score every human label with it (``suspects``: the task's
    meta and the "mislabel suspects" tab) and make it the project's model version so the Data Manager
    sorts by its scores.

    The project is read page by page and the backlog predicted in chunks (``backlog.py``): ``runner``
    decides where the chunks run (default: here, one after another; the Celery job lets every prediction
    worker take chunks). Tasks that already hold a prediction of this version are skipped, so running twice
    is harmless.
    """

    env = env or current_settings()
    say = progress or (lambda fraction, message: None)
    registry = Registry(env.model_dir)
    manifest = registry.get(project_id, version) if VERSION_RE.fullmatch(version) else None
    with StudioClient.from_settings(env) as client, MediaFetcher.from_settings(env) as fetcher:
        info = client.project(project_id)
        spec = parse_label_config(info["label_config"])
        weights = manifest.weights if manifest is not None else base_weights(registry, project_id, spec, version, env)
        say(0.0, "reading the project")
        phases: dict[str, float] = {}  # seconds per phase, in the job's record: where a slow job spends its time
        mark = time.perf_counter()

        def took(phase: str) -> None:
            nonlocal mark
            now = time.perf_counter()
            phases[phase] = round(phases.get(phase, 0.0) + now - mark, 3)
            mark = now

        since = manifest.created_at if manifest is not None and spec.kind.trained else None
        scan = backlog.BacklogScan(client, project_id, spec, version,
                                   incoming=(lambda task: created_after(task, since)) if since is not None else None,
                                   incoming_keep=drift.MAX_INCOMING)
        book = scan.book  # every unlabeled task's score by this version, for the "label next" tab
        results = scan.held_results  # what it shows on the tasks with rough labels, for the misses tab
        counts: dict[str, Any] = {"pushed": 0, "errors": 0, "chunks": 0}
        context = backlog.ChunkContext(str(project_id), version, str(weights), info["label_config"])
        run = runner or (lambda c, parts, report: backlog.run_here(c, parts, report, env))
        say(0.0, f"reading the project and predicting its unlabeled tasks with {version}")
        share = 0.8  # of the job's progress: the backlog (the human labels' scoring after it)
        # the read and the backlog run together: chunks go to the runner as the read makes them
        chunks = scan.stream(total=int(info.get("task_number") or 0))
        for out in run(context, chunks, lambda fraction, message: say(share * fraction, message)):
            counts["chunks"] += 1
            counts["errors"] += int(out.get("errors") or 0)
            counts["pushed"] += len(out.get("pushed") or {})
            _tally_worker(counts, "chunks_by_worker", out)
            for task_id, pushed in (out.get("pushed") or {}).items():
                book.add(int(task_id), pushed[0], pushed[1])
                if len(pushed) > 2:
                    results[int(task_id)] = pushed[2]
        counts.update(unlabeled=scan.unlabeled, already_there=scan.held)
        took("backlog")
        scan.read_labeled()
        labeled = scan.labeled  # the human labels the served version disagrees with: scored after the backlog
        took("read_labeled")
        if serves(registry, project_id, spec, version, env):
            model = load_model(weights, version)
            try:
                counts["label_next"], counts["label_next_mode"] = refresh_label_next(
                    client, project_id, book, manifest, version)
            except LabelloopError as exc:  # the predictions are in; a tab is not worth failing the job
                log.warning("project %s: the %r tab was not updated: %s", project_id, LABEL_NEXT_TAB, exc)
            took("label_next")
            # the tasks whose meta the suspects' entries concern: the labeled ones and the few others holding one
            every_task = {**scan.with_entry, **{int(t["id"]): t for t in [*scan.untruthed, *(t for t, _ in labeled)]}}
            if labeled or any(entry_of(t) for t in every_task.values()):  # else no tab, no entry to take back
                scored: dict[int, float] = {}
                if labeled:
                    say(share, f"scoring the human labels of {len(labeled)} task(s) with {version}")
                    # in chunks too, so every prediction worker helps; the ranking and the writes need every score
                    outs = run(dataclasses.replace(context, work=backlog.SCORE),
                               backlog.chunked(backlog.labeled_items(labeled)),
                               lambda fraction, message: say(share + (1 - share) * 0.9 * fraction, message))
                    for out in outs:
                        scored.update({int(task_id): float(score) for task_id, score in (out.get("scores") or {}).items()})
                        _tally_worker(counts, "score_chunks_by_worker", out)
                took("suspects_score")
                unscored = {int(t["id"]) for t, _ in labeled} - set(scored)  # their entries stay as they were
                try:
                    counts.update(publish_suspects(client, project_id, spec, version, every_task, scored, unscored))
                except LabelloopError as exc:
                    log.warning("project %s: the %r tab was not updated: %s", project_id, SUSPECTS_TAB, exc)
                took("suspects_write")
            try:  # rough labels in the task data against what the version shows: its misses, for review
                misses = refresh_misses(client, project_id, spec, scan.rough, results)
                if misses is not None:
                    counts["misses"] = misses
            except LabelloopError as exc:
                log.warning("project %s: the %r tab was not updated: %s", project_id, MISSES_TAB, exc)
            took("misses")
            if manifest is not None and spec.kind.trained:
                # tasks imported after this version was trained, against the labels it learned from
                tasks = scan.incoming_tasks() + [t for t, _ in labeled]
                try:
                    report = check_incoming(client, registry, project_id, manifest, model, tasks,
                                            {t["id"] for t, _ in labeled}, fetcher.fetch_many,
                                            {t["id"]: image_url_of(t, spec.value_key) for t in tasks})
                    if report is not None:
                        counts["drift"] = report
                except (LabelloopError, ValueError) as exc:
                    log.warning("project %s: no drift check: %s", project_id, exc)
                took("drift")
            client.set_model_version(project_id, version)
            took("model_version")
        counts["seconds"] = phases
        return counts


def _tally_worker(counts: dict[str, Any], key: str, out: dict[str, Any]) -> None:
    """Count a chunk for the worker that ran it (the Celery runner names it; ``run_here`` does not)."""
    if out.get("worker"):
        by_worker = counts.setdefault(key, {})
        by_worker[out["worker"]] = by_worker.get(out["worker"], 0) + 1


LABEL_NEXT_TAB = "labelloop: label next"
LABEL_NEXT_SIZE = 50  # a labeler's sitting; refreshed after every promotion


def refresh_label_next(client: StudioClient, project_id: int | str, book: backlog.ScoreBook,
                       manifest: Manifest | None, version: str) -> tuple[int, str]:
    """Rewrite the project's "label next" Data Manager tab from ``version``'s (task score, predicted label) per
    unlabeled task (``book``): the ``LABEL_NEXT_SIZE`` tasks ``acquisition.next_to_label`` picks — a random
    sample until the version is right on ``acquisition.EXPLORE_BELOW`` of its tuning split (a base model, which
    has none, explores too), then the least confident in turns over the predicted classes. Returns (tasks in the
    tab, mode)."""
    ids = np.frombuffer(book.ids, dtype=np.int64) if len(book) else np.zeros(0, dtype=np.int64)
    order = np.argsort(ids, kind="stable")  # by task id: the same picks whatever order the chunks finished in
    scores = np.frombuffer(book.scores, dtype=np.float64)[order] if len(book) else np.zeros(0)
    uncertainty = 1.0 - np.nan_to_num(scores, nan=0.0)
    labels = np.frombuffer(book.labels, dtype=np.uint16)[order] if len(book) else np.zeros(0, dtype=np.uint16)
    tuning = manifest.metrics.get("primary") if manifest is not None else None
    picks, mode = acquisition.next_to_label(uncertainty, LABEL_NEXT_SIZE, tuning,
                                            seed=zlib.crc32(f"{project_id}/{version}".encode()),
                                            predicted=[book.names[i] for i in labels])
    ordering = ("tasks:predictions_score",) if mode == "uncertainty" else ("tasks:id",)
    client.put_tab(project_id, LABEL_NEXT_TAB, [int(ids[order[j]]) for j in picks], ordering=ordering)
    return len(picks), mode


class NotServed(LabelloopError):
    """A base model's version (``base-<stem>``, ``custom-<stem>``) that no longer answers the project."""

    kind, http_status = "not_served", 409


def base_weights(registry: Registry, project_id: int | str, spec: ControlSpec, version: str,
                 env: Settings | None = None) -> Path:
    """The weights of ``version`` when it is the base model answering the project (``model_source``:
    LABELLOOP_BASE_MODEL or the tag's ``model_path``, before any version is trained); NotServed when a
    trained version or another model answers it now."""
    source = model_source(registry, project_id, spec, env)
    if source is None or source[1] != version:
        now = source[1] if source is not None else "no model"
        raise NotServed(f"{version} no longer answers project {project_id} ({now} does)")
    return source[0]


def serves(registry: Registry, project_id: int | str, spec: ControlSpec, version: str,
           env: Settings | None = None) -> bool:
    """Whether ``version`` is the model answering the project now (a trained version or a base model)."""
    try:
        source = model_source(registry, project_id, spec, env)
    except LabelloopError:
        return False
    return source is not None and source[1] == version


# -- out-of-sample model outputs (K-fold) ------------------------------------------------------------

def fold_of(task_id: int | str, folds: int) -> int:
    """Which of ``folds`` folds a task belongs to (a hash of its id: stable, independent of order)."""
    import hashlib

    return int.from_bytes(hashlib.sha1(f"fold:{task_id}".encode()).digest()[:4], "big") % folds


def prediction_to_json(pred) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(pred)


def prediction_from_json(data: dict[str, Any]):

    fields = dict(data)
    fields["regions"] = [Region(**r) for r in fields.get("regions") or []]
    fields["candidates"] = [Region(**r) for r in fields.get("candidates") or []]
    return ImagePrediction(**fields)


def train_fold_and_predict(tasks: list[dict[str, Any]], spec: ControlSpec, fetcher, folds: int, fold: int,
                           progress: Progress | None = None) -> dict[int, dict[str, Any]]:
    """Train on the labeled tasks outside ``fold`` and predict the labeled tasks inside it.

    Returns {task id: prediction as JSON}: outputs of a model that never saw those tasks' labels.
    """
    from labelloop.core.registry import Registry as _Registry

    labeled = {image.task_id for image in labeled_images(tasks, spec)}
    rows = [t for t in tasks if t.get("id") in labeled]
    held_out = [t for t in rows if fold_of(t["id"], folds) == fold]
    training = [t for t in rows if fold_of(t["id"], folds) != fold]
    if not held_out:
        return {}
    with tempfile.TemporaryDirectory(prefix=f"labelloop-fold{fold}-") as tmp:
        registry = _Registry(Path(tmp) / "models")
        outcome = train_new_version(registry, f"fold{fold}", training, spec, fetcher, progress)
        model = load_model(outcome.manifest.weights, f"fold{fold}-of-{folds}")
        fetched = fetcher.fetch_many([image_url_of(t, spec.value_key) for t in held_out])
        ready = [(t, p) for t, p in zip(held_out, fetched) if not isinstance(p, Exception)]
        threshold = threshold_for(spec)
        preds = predict_images(model, [p for _, p in ready], spec, threshold)
        return {int(t["id"]): prediction_to_json(pred) for (t, _), pred in zip(ready, preds)}


def cross_val_predictions(tasks: list[dict[str, Any]], spec: ControlSpec, fetcher, folds: int = 5,
                          progress: Progress | None = None) -> dict[int, Any]:
    """Out-of-sample predictions for every labeled task, folds trained one after another in-process.

    (The FiftyOne plugin runs the same folds as Celery jobs on the training queue instead.)
    """
    say = progress or (lambda fraction, message: None)
    out: dict[int, Any] = {}
    for fold in range(folds):
        def fold_progress(fraction: float, message: str, fold=fold) -> None:
            say((fold + fraction) / folds, f"fold {fold + 1} of {folds}: {message}")

        for task_id, data in train_fold_and_predict(tasks, spec, fetcher, folds, fold, fold_progress).items():
            out[task_id] = prediction_from_json(data)
    return out
