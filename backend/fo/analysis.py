"""Analyses on a synced FiftyOne dataset, written back as fields, tags, saved views and brain runs.

Every number comes from the engine's scoring functions (scoring.py) applied to the engine's
predictions (core/predict.py): the plugin operators, the CLI and the Celery jobs all call these.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from labelloop.core import scoring
from labelloop.core.labelconfig import ControlSpec, parse_label_config, threshold_for
from labelloop.core.registry import VERSION_RE
from labelloop.core.saliency import saliency_maps
from labelloop.errors import LabelloopError
from labelloop.fo.env import dataset_name, import_fiftyone, root_dataset
from labelloop.fo.sync import model_for_version, predict_samples, prediction_labels, serving_model
from labelloop.fo.writes import WRITE_BATCH, write_values
from labelloop.labelstudio.client import StudioClient, read_labeled
from labelloop.labelstudio.media import MediaFetcher
from labelloop.workflows import file_chunks
from labelloop.workflows.pipeline import cross_val_predictions

log = logging.getLogger(__name__)
Progress = Callable[[float, str], None]

MISLABEL_VIEW = "labelloop-suspected-mislabels"
UNCERTAIN_VIEW = "labelloop-uncertain"
UNCERTAIN_TAG = "labelloop:uncertain"
MISTAKES_VIEW = "labelloop-high-confidence-mistakes"
EXPLAINED_VIEW = "labelloop-explained"
MAX_EXPLAINED = 500  # maps per run: each is stored in the sample (a few kB at <= HEATMAP_SIDE px)
HEATMAP_SIDE = 128


class AnalysisError(LabelloopError, ValueError):
    """The dataset lacks what the analysis needs; the message says what to run first."""

    kind, http_status = "analysis", 400


def spec_of(dataset) -> ControlSpec:
    info = (dataset.info or {}).get("labelloop") or {}
    if "label_config" not in info:
        raise AnalysisError(f"dataset {dataset.name} was not synced from Label Studio (run 'Sync from Label Studio')")
    return parse_label_config(info["label_config"])


def _served(view):
    """(dataset, control spec, the model in service) for an analysis that needs the served version."""
    dataset = root_dataset(view)
    spec = spec_of(dataset)
    model = serving_model(project_of(dataset), spec)
    if model is None:
        raise AnalysisError("no model yet for this project: annotate in Label Studio so one is trained")
    return dataset, spec, model


def project_of(dataset) -> int:
    return int(dataset.info["labelloop"]["project"])


def _threshold(spec: ControlSpec) -> float:
    return threshold_for(spec)


def _require(view, field: str, hint: str) -> None:
    if not view.has_field(field):
        raise AnalysisError(f"no '{field}' field on {dataset_name(view)}: {hint}")


def _save_view(dataset, name: str, view, description: str) -> None:
    if dataset.has_saved_view(name):
        dataset.delete_saved_view(name)
    dataset.save_view(name, view, description=description)


# -- mislabel-by-loss ----------------------------------------------------------------------------------

def mislabel_scores_for(sample_fields: dict[str, Any], spec: ControlSpec) -> tuple[float, list[dict]]:
    """(score, flags) for one sample from its ground truth and model outputs (plain values)."""
    gt = sample_fields.get("ground_truth")
    if gt is None:
        return float("nan"), []
    if spec.kind.whole_image:
        probs = sample_fields.get("class_probs") or {}
        return scoring.classification_loss(probs, gt.label), []
    ground = [(d.label, d.bounding_box) for d in gt.detections]
    candidates = [(d.label, float(d.confidence or 0.0), d.bounding_box)
                  for d in (sample_fields.get("candidates") or sample_fields.get("predictions")).detections]
    flags = scoring.detection_flags(ground, candidates, _threshold(spec))
    return scoring.detection_mislabel_score(flags), flags


def compute_mislabel_scores(view, mode: str = "in_sample", folds: int = 5, progress: Progress | None = None,
                            fold_runner: FoldRunner | None = None) -> dict[str, Any]:
    """Write ``mislabel_score`` (+ per-object flags for detection) and a saved view, worst first.

    ``in_sample`` (fast): outputs of the version in service, which has seen most of these labels, so it
    tends to agree with them — weaker. ``out_of_sample``: K-fold models, each scoring only the
    samples it never trained on (``fold_runner``: where the folds run; default: here, one by one).
    """
    import_fiftyone()  # FiftyOne configured for labelloop before its first use
    from fiftyone import ViewField as F

    say = progress or (lambda fraction, message: None)
    dataset = root_dataset(view)
    spec = spec_of(dataset)
    labeled = view.exists("ground_truth")
    if len(labeled) == 0:
        raise AnalysisError("no sample has a ground truth (a human annotation) in this view")
    score_field = "mislabel_score" if mode == "in_sample" else "mislabel_score_oos"
    if mode == "in_sample":
        _require(labeled, "prediction_version", "sync with predictions first (a model version must exist)")
        outputs = None
    else:
        say(0.0, f"training {folds} fold models (out-of-sample)")
        outputs = (fold_runner or run_folds_here)(project_of(dataset), folds, lambda f, m: say(0.9 * f, m))

    fields = ["id", "ground_truth", "class_probs", "candidates", "predictions", "ls_task_id"]
    present = [f for f in fields if labeled.has_field(f)]
    rows = labeled.values(present)
    scores, flags_by_id = {}, {}
    for values in zip(*rows):
        record = dict(zip(present, values))
        if outputs is not None:
            pred = outputs.get(int(record["ls_task_id"]))
            if pred is None:
                continue
            record.update(prediction_labels(pred, spec, "oos"))
        score, flags = mislabel_scores_for(record, spec)
        scores[record["id"]] = score
        flags_by_id[record["id"]] = flags
    write_values(dataset, score_field, scores)
    if not spec.kind.whole_image:
        _write_object_flags(dataset, flags_by_id, mode)
    cutoff = _suspect_cutoff(spec)
    suspects = labeled.match(F(score_field) >= cutoff).sort_by(score_field, reverse=True)
    _save_view(dataset, MISLABEL_VIEW if mode == "in_sample" else MISLABEL_VIEW + "-oos", suspects,
               f"labels the model ({mode.replace('_', '-')}) believes are wrong, worst first")
    say(1.0, f"{len(suspects)} suspected mislabel(s) of {len(scores)} labeled samples")
    return {"scored": len(scores), "suspected": len(suspects), "field": score_field, "cutoff": cutoff}


def _suspect_cutoff(spec: ControlSpec) -> float:
    return scoring.suspect_cutoff(spec.kind.whole_image, _threshold(spec))


def _write_object_flags(dataset, flags_by_id: dict[str, list[dict]], mode: str) -> None:
    """Per-object flags onto ground-truth boxes; possible-missing boxes into their own field."""
    fo = import_fiftyone()
    suffix = "" if mode == "in_sample" else "_oos"
    missing_field = f"mislabel_missing{suffix}"
    for sample in dataset.select(list(flags_by_id)).iter_samples(autosave=True):
        flags = flags_by_id[sample.id]
        for index, detection in enumerate(sample.ground_truth.detections):
            mine = [f for f in flags if f["object"] == index]
            detection[f"mislabel_flag{suffix}"] = mine[0]["kind"] if mine else None
            detection[f"mislabel_flag_score{suffix}"] = mine[0]["score"] if mine else 0.0
        sample[missing_field] = fo.Detections(detections=[
            fo.Detection(label=f["predicted"], bounding_box=f["box"], confidence=f["score"], mislabel_flag="possible_missing")
            for f in flags if f["kind"] == "possible_missing"])


# (project id, folds, progress) -> {task id: ImagePrediction} for every labeled task of the project,
# each predicted by the fold model that never trained on it. Injected so this module never imports Celery:
# the CLI and the plugin pass labelloop.tasks.jobs.run_folds_on_celery to spread folds over workers.
FoldRunner = Callable[[int, int, Progress], dict[int, Any]]


def run_folds_here(project: int, folds: int, progress: Progress) -> dict[int, Any]:
    """The folds one after another in this process (no worker needed; slower)."""
    project_data = read_labeled(project)  # folds train and predict the labeled tasks only
    with MediaFetcher.from_settings() as fetcher:
        return cross_val_predictions(project_data.tasks, project_data.spec, fetcher, folds, progress)


# -- uncertainty sampling ---------------------------------------------------------------------------

def uncertainty_of(sample_fields: dict[str, Any], spec: ControlSpec, method: str) -> float:
    if spec.kind.whole_image:
        probs = list((sample_fields.get("class_probs") or {}).values())
        if not probs:
            return float("nan")
        return {"least_confidence": scoring.least_confidence, "margin": scoring.margin_uncertainty,
                "entropy": scoring.entropy_uncertainty}[method](probs)
    candidates = sample_fields.get("candidates")
    pairs = [(float(d.confidence or 0.0), dict(d["class_probs"] or {}) if d.has_field("class_probs") else {})
             for d in (candidates.detections if candidates else [])]
    return scoring.detection_uncertainty(pairs, _threshold(spec), method)


def uncertainty_sampling(view, k: int = 20, method: str = "least_confidence", diversity: bool = False,
                         unlabeled_only: bool = True, progress: Progress | None = None) -> dict[str, Any]:
    """Score every sample's uncertainty, tag the k to label next (``labelloop:uncertain``), save a view.

    With ``diversity`` the k come from the 4k most uncertain by k-center greedy on ``embeddings``
    (computed if missing), away from what is already labeled.
    """
    import_fiftyone()  # FiftyOne configured for labelloop before its first use
    from fiftyone import ViewField as F

    say = progress or (lambda fraction, message: None)
    dataset = root_dataset(view)
    spec = spec_of(dataset)
    _require(view, "prediction_version", "sync with predictions first (a model version must exist)")
    pool = view.match(F("ground_truth") == None) if unlabeled_only and view.has_field("ground_truth") else view  # noqa: E711
    pool = pool.exists("prediction_version")
    if len(pool) == 0:
        raise AnalysisError("no predicted sample left to choose from in this view")
    fields = [f for f in ("id", "class_probs", "candidates") if pool.has_field(f)]
    rows = list(zip(*pool.values(fields)))
    ids = [r[0] for r in rows]
    scores = [uncertainty_of(dict(zip(fields, r)), spec, method) for r in rows]
    write_values(dataset, "uncertainty", dict(zip(ids, scores)))
    say(0.4, f"scored {len(ids)} samples ({method})")
    if diversity:
        if not pool.has_field("embeddings") or len(pool.exists("embeddings")) < len(pool):
            compute_embeddings(pool, visualize=False, progress=lambda f, m: say(0.4 + 0.4 * f, m))
        vectors = np.stack([np.asarray(v) for v in pool.values("embeddings")])
        labeled = view.exists("ground_truth").exists("embeddings") if view.has_field("ground_truth") else None
        avoid = np.stack([np.asarray(v) for v in labeled.values("embeddings")]) if labeled is not None and len(labeled) else None
        chosen = [ids[i] for i in scoring.diverse_top_k(scores, vectors, k, avoid=avoid)]
    else:
        order = np.argsort(-np.asarray(scores), kind="stable")[:k]
        chosen = [ids[i] for i in order]
    view.untag_samples(UNCERTAIN_TAG)
    dataset.select(chosen).tag_samples(UNCERTAIN_TAG)
    picked = dataset.match_tags(UNCERTAIN_TAG).sort_by("uncertainty", reverse=True)
    _save_view(dataset, UNCERTAIN_VIEW, picked, f"the {k} samples to label next ({method}"
                                                f"{', diverse' if diversity else ''}), most uncertain first")
    say(1.0, f"tagged {len(chosen)} sample(s) '{UNCERTAIN_TAG}'")
    return {"selected": chosen, "scored": len(ids), "method": method, "diversity": diversity}


# -- embeddings ---------------------------------------------------------------------------------------

def compute_saliency(view, limit: int = 100, progress: Progress | None = None,
                     field: str = "saliency") -> dict[str, Any]:
    """Where the served version looked: an EigenCAM map (``core/saliency.py``, the model that serves
    predictions) as a FiftyOne heatmap on each sample of ``view`` (the first ``limit``, at most
    MAX_EXPLAINED), saved as the view ``labelloop-explained``. Good views to explain: the suspected
    mislabels and the high-confidence mistakes."""
    import_fiftyone()  # FiftyOne configured for labelloop before its first use
    from pathlib import Path

    import cv2
    import fiftyone as fo

    say = progress or (lambda fraction, message: None)
    dataset, spec, model = _served(view)
    limit = max(1, min(int(limit), MAX_EXPLAINED))
    ids, paths = view.limit(limit).values(["id", "filepath"])
    maps: dict[str, Any] = {}
    for start in range(0, len(ids), 16):
        for sample_id, cam in zip(ids[start : start + 16], saliency_maps(model, [Path(p) for p in paths[start : start + 16]])):
            h, w = cam.shape
            scale = min(1.0, HEATMAP_SIDE / max(h, w))  # the App stretches a heatmap over its image
            small = cv2.resize(cam, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
            maps[sample_id] = fo.Heatmap(map=(np.clip(small, 0, 1) * 255).astype(np.uint8), range=[0, 255])
        say(min(1.0, (start + 16) / max(1, len(ids))), f"explained {min(len(ids), start + 16)} of {len(ids)}")
    dataset.set_values(field, maps, key_field="id")
    _save_view(dataset, EXPLAINED_VIEW, dataset.select(list(maps)),
               f"samples with a '{field}' map: where {model.version} looked (EigenCAM)")
    return {"explained": len(maps), "field": field, "model_version": model.version, "saved_view": EXPLAINED_VIEW}


TEST_FAILURES_VIEW = "labelloop-test-failures"
OOD_VIEW = "labelloop-out-of-distribution"
REGRESSIONS_VIEW = "labelloop-regressions"


def model_check_views(view, version: str | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """The project's model checks on its samples: ``failed_tests`` (the names of the model tests a sample
    failed in ``version``, default the newest version that ran tests) with the saved view
    ``labelloop-test-failures``; ``regressed_in`` (the version that got these tuning tasks wrong where the
    version in service then got them right) with ``labelloop-regressions``; and ``ood_ratio`` (how far
    beyond the training set the last drift check put a newly imported task; > 1 = beyond) with the saved
    view ``labelloop-out-of-distribution``, farthest first."""
    import_fiftyone()
    from fiftyone import ViewField as F

    from labelloop.config import settings as current_settings
    from labelloop.core.registry import Registry
    from labelloop.fo.versions import failing_tasks, regressed_tasks
    from labelloop.workflows.drift_check import report_of

    say = progress or (lambda fraction, message: None)
    dataset = root_dataset(view)
    project = project_of(dataset)
    if version:
        check_version(dataset, version)
    failing = failing_tasks(project, version)
    by_task: dict[int, list[str]] = {}
    for name, task_ids in failing.items():
        for task_id in task_ids:
            by_task.setdefault(task_id, []).append(name)
    ids, tasks = dataset.values(["id", "ls_task_id"])
    dataset.set_values("failed_tests", {i: by_task.get(int(t)) if t is not None else None
                                        for i, t in zip(ids, tasks)}, key_field="id")
    failures = dataset.exists("failed_tests")
    _save_view(dataset, TEST_FAILURES_VIEW, failures, "samples that failed a model test of the version checked")
    say(0.5, f"{len(failures)} sample(s) failed a model test")
    compared, regressed = regressed_tasks(project, version)
    wrong_now = set(regressed)
    dataset.set_values("regressed_in", {i: compared if t is not None and int(t) in wrong_now else None
                                        for i, t in zip(ids, tasks)}, key_field="id")
    _save_view(dataset, REGRESSIONS_VIEW, dataset.exists("regressed_in"),
               f"tuning tasks {compared or 'a version'} got wrong that the version in service then got right")
    report = report_of(Registry(current_settings().model_dir), project) or {}
    ratios = {int(b["task"]): float(b["ratio"]) for b in report.get("beyond") or []}
    dataset.set_values("ood_ratio", {i: ratios.get(int(t)) if t is not None else None for i, t in zip(ids, tasks)},
                       key_field="id")
    ood = dataset.exists("ood_ratio").sort_by(F("ood_ratio"), reverse=True)
    _save_view(dataset, OOD_VIEW, ood, "newly imported tasks beyond the training set (last drift check), farthest first")
    say(1.0, f"{len(ood)} sample(s) out of distribution")
    return {"test_failures": len(failures), "tests_failed": sorted(failing), "regressions": len(wrong_now),
            "regressed_version": compared, "out_of_distribution": len(ood), "drifted": bool(report.get("drifted")),
            "saved_views": [TEST_FAILURES_VIEW, REGRESSIONS_VIEW, OOD_VIEW]}


def compute_embeddings(view, method: str = "umap", visualize: bool = True, similarity: bool = True,
                       progress: Progress | None = None, brain_key: str = "labelloop_embeddings",
                       runner: file_chunks.FilesRunner | None = None) -> dict[str, Any]:
    """Per-sample embeddings from the served model's own backbone, then a 2-D map and a similarity index.
    ``runner``: where the forward passes run (``workflows.file_chunks``; default here, 64 images at a time)."""
    import_fiftyone()  # FiftyOne configured for labelloop before its first use

    say = progress or (lambda fraction, message: None)
    dataset, spec, model = _served(view)
    ids, paths = view.values(["id", "filepath"])
    size = file_chunks.CHUNK if runner is not None else 64
    parts = [(ids[start : start + size], paths[start : start + size]) for start in range(0, len(ids), size)]
    context = file_chunks.FilesContext(str(model.path), model.version, "", 0.0, 16, file_chunks.EMBED)
    vectors: dict[str, list[float]] = {}
    embedded, failed = 0, []
    missed: list[str] = []  # ids of the chunks that failed: they keep what they had, and stay off the map
    results = (runner or file_chunks.run_here)(context, [part[1] for part in parts])
    for index, outputs in file_chunks.closing(results):
        outputs = file_chunks.outputs_fit(parts[index][1], outputs)
        if isinstance(outputs, str):  # a worker's chunk that failed every try
            failed.append(outputs)
            missed.extend(parts[index][0])
            log.warning("%d samples not embedded with %s: %s", len(parts[index][0]), model.version, outputs)
            continue
        vectors.update(zip(parts[index][0], outputs))
        embedded += len(outputs)
        if len(vectors) >= WRITE_BATCH:  # written as they come: memory holds a batch, not every vector
            write_values(dataset, "embeddings", vectors)
            vectors.clear()
        say(0.6 * min(1.0, embedded / max(1, len(ids))), f"embedded {embedded} of {len(ids)}")
    write_values(dataset, "embeddings", vectors)
    if failed and embedded == 0:
        raise AnalysisError(f"no sample could be embedded: {failed[0]}")
    if missed:  # the map and the index cover only this run's vectors (an older version's may differ in size)
        left_out = set(missed)
        ids = [i for i in ids if i not in left_out]
    out: dict[str, Any] = {"embedded": embedded, "model_version": model.version, "failed_chunks": len(failed)}
    if visualize or similarity:
        import fiftyone.brain as fob

        # the whole dataset as itself: selecting 100k ids makes a query document of megabytes
        view = dataset if len(ids) == len(dataset) else dataset.select(ids)
        if visualize:
            key = f"{brain_key}_{method}"
            if key in dataset.list_brain_runs():
                dataset.delete_brain_run(key)
            say(0.7, f"computing the {method.upper()} map")
            fob.compute_visualization(view, embeddings="embeddings", method=method, brain_key=key,
                                      num_dims=2, seed=0, verbose=False)
            out["visualization"] = key
        if similarity:
            key = f"{brain_key}_similarity"
            if key in dataset.list_brain_runs():
                dataset.delete_brain_run(key)
            fob.compute_similarity(view, embeddings="embeddings", backend="sklearn", brain_key=key)
            out["similarity"] = key
    say(1.0, f"embeddings of {embedded} samples from {model.version}")
    return out


# -- error analysis -----------------------------------------------------------------------------------

def check_version(dataset, version: str) -> str:
    """``version`` when it names a version of the dataset's project (``p<project>-v<n>``), else an
    AnalysisError that says so. A name typed into an operator's form becomes a registry path, field
    names and, at the end, a pickle load: only the registry's own shape goes further."""

    match = VERSION_RE.fullmatch(version) if isinstance(version, str) else None
    if match is None:
        raise AnalysisError(f"{version!r} is not a labelloop version name (expected p<project>-v<n>, e.g. p12-v3)")
    if "project" not in ((dataset.info or {}).get("labelloop") or {}):
        raise AnalysisError(f"dataset {dataset.name} was not synced from Label Studio (run 'Sync from Label Studio')")
    project = str(project_of(dataset))
    if match["project"] != project:
        raise AnalysisError(f"version {version} belongs to project {match['project']}, not to this dataset's "
                            f"project {project}")
    return version


def version_field(version: str | None) -> str:
    return "predictions" if not version else "pred_" + version.replace("-", "_")


def ensure_version_predictions(dataset, view, version: str | None, progress: Progress | None = None) -> str:
    """The field holding ``version``'s predictions on ``view`` (predicting it if needed)."""

    if not version:
        _require(view, "prediction_version", "sync with predictions first")
        return "predictions"
    spec = spec_of(dataset)
    prefix = version_field(check_version(dataset, version)) + "_"
    predict_samples(view, spec, model_for_version(project_of(dataset), version), fields_prefix=prefix,
                    progress=progress)
    return prefix + "predictions"


def _labeled_scope(view, split: str | None):
    """(dataset, spec, the labeled samples of ``view`` in ``split``); an error when there are none."""
    from fiftyone import ViewField as F

    dataset = root_dataset(view)
    spec = spec_of(dataset)
    scope = view.exists("ground_truth")
    if split:
        scope = scope.match(F("tuning_split") == split)
    if len(scope) == 0:
        raise AnalysisError(f"no labeled sample in the {split or 'whole'} split of this view")
    return dataset, spec, scope


def computed_on(split: str | None) -> str:
    """Which samples a metric was computed on, in words an analyst can weigh."""
    if split == "val":
        return "held-out tuning split (labeled tasks no version trained on)"
    if split == "train":
        return "training samples (optimistic: the model learned these labels)"
    return "all labeled samples (optimistic: most are the model's own training samples)"


def evaluate_model(view, version: str | None = None, split: str | None = "val", cohort: str | None = None,
                   confidence: float = 0.8, progress: Progress | None = None) -> dict[str, Any]:
    """Per-class precision/recall/F1 and a confusion matrix (a FiftyOne evaluation run: its cells open
    their samples in the App's Model Evaluation panel), a saved view of high-confidence mistakes, and
    metrics per cohort of any field or tag (``cohort="tags"`` or a field name)."""
    from fiftyone import ViewField as F

    if version:
        check_version(root_dataset(view), version)
    dataset, spec, scope = _labeled_scope(view, split)
    pred_field = ensure_version_predictions(dataset, scope, version, progress)
    eval_key = "eval_" + (version or "serving").replace("-", "_")
    if eval_key in dataset.list_evaluations():
        dataset.delete_evaluation(eval_key)
    if spec.kind.whole_image:
        results = scope.evaluate_classifications(pred_field, gt_field="ground_truth", eval_key=eval_key)
        mistakes = scope.match((F(eval_key) == False) & (F(f"{pred_field}.confidence") >= confidence))  # noqa: E712
    else:
        results = scope.evaluate_detections(pred_field, gt_field="ground_truth", eval_key=eval_key, iou=0.5)
        mistakes = scope.filter_labels(pred_field, (F(eval_key) == "fp") & (F("confidence") >= confidence))
    _save_view(dataset, MISTAKES_VIEW, mistakes, f"predictions of {version or 'the version in service'} "
                                                 f"that are wrong with confidence >= {confidence}")
    classes = list(spec.labels)
    report = results.report(classes=classes)
    matrix = results.confusion_matrix(classes=classes)
    out = {"eval_key": eval_key, "prediction_field": pred_field, "report": report,
           "confusion_matrix": {"classes": classes, "matrix": np.asarray(matrix).tolist()},
           "high_confidence_mistakes": len(mistakes), "samples": len(scope), "computed_on": computed_on(split)}
    if spec.kind.whole_image:
        out["accuracy"] = float(results.metrics()["accuracy"])
    if cohort:
        out["cohorts"] = cohort_metrics(scope, eval_key, cohort, spec)
    return out


def cohort_metrics(view, eval_key: str, by: str, spec: ControlSpec) -> dict[str, dict[str, float]]:
    """Accuracy (classification) or precision/recall (detection) per value of a field, or per tag."""
    from fiftyone import ViewField as F

    values = view.distinct("tags") if by == "tags" else view.distinct(by)
    out = {}
    for value in values:
        part = view.match_tags(value) if by == "tags" else view.match(F(by) == value)
        if spec.kind.whole_image:
            correct = part.count_values(eval_key)
            n = sum(correct.values())
            out[str(value)] = {"samples": n, "accuracy": correct.get(True, 0) / n if n else float("nan")}
        else:
            tp, fp, fn = (sum(part.values(f"{eval_key}_{k}")) for k in ("tp", "fp", "fn"))
            out[str(value)] = {"samples": len(part), "precision": tp / (tp + fp) if tp + fp else float("nan"),
                               "recall": tp / (tp + fn) if tp + fn else float("nan")}
    return out


def compare_versions(view, version_a: str, version_b: str, split: str | None = "val",
                     progress: Progress | None = None) -> dict[str, Any]:
    """Samples that gained or lost correctness from ``version_a`` to ``version_b``, and changed
    predictions: tags ``diff:gained``/``diff:lost``/``diff:changed`` and a saved view each."""
    for version in (version_a, version_b):  # both, before the first one's predictions are computed
        check_version(root_dataset(view), version)
    dataset, spec, scope = _labeled_scope(view, split)
    errors = {}
    fields = {}
    for version in (version_a, version_b):
        field = ensure_version_predictions(dataset, scope, version, progress)
        key = "eval_" + version.replace("-", "_")
        if key in dataset.list_evaluations():
            dataset.delete_evaluation(key)
        if spec.kind.whole_image:
            scope.evaluate_classifications(field, gt_field="ground_truth", eval_key=key)
            errors[version] = dict(zip(*scope.values(["id", key])))
            errors[version] = {i: (0 if ok else 1) for i, ok in errors[version].items()}
        else:
            scope.evaluate_detections(field, gt_field="ground_truth", eval_key=key, iou=0.5)
            ids, fp, fn = scope.values(["id", f"{key}_fp", f"{key}_fn"])
            errors[version] = {i: a + b for i, a, b in zip(ids, fp, fn)}
        fields[version] = field
    for tag in ("diff:gained", "diff:lost", "diff:changed"):
        scope.untag_samples(tag)
    gained = [i for i in errors[version_a] if errors[version_b][i] < errors[version_a][i]]
    lost = [i for i in errors[version_a] if errors[version_b][i] > errors[version_a][i]]
    label_path = "label" if spec.kind.whole_image else "detections.label"
    a_labels = dict(zip(*scope.values(["id", f"{fields[version_a]}.{label_path}"])))
    b_labels = dict(zip(*scope.values(["id", f"{fields[version_b]}.{label_path}"])))
    changed = [i for i in a_labels if _normalized(a_labels[i]) != _normalized(b_labels.get(i))]
    for tag, ids in (("diff:gained", gained), ("diff:lost", lost), ("diff:changed", changed)):
        if ids:
            dataset.select(ids).tag_samples(tag)
        _save_view(dataset, f"labelloop-{tag.replace(':', '-')}", dataset.match_tags(tag),
                   f"{version_a} → {version_b}: {tag.split(':')[1]}")
    return {"gained": len(gained), "lost": len(lost), "changed": len(changed), "compared": len(errors[version_a])}


def _normalized(labels) -> Any:
    return sorted(labels) if isinstance(labels, list) else labels


# -- back to Label Studio -------------------------------------------------------------------------

def send_to_label_studio(view, title: str = "labelloop review queue", client=None) -> dict[str, Any]:
    """Create a Data Manager tab in the project holding exactly these tasks (labelers open the tab and
    press "Label All Tasks": Label Studio then hands out those tasks, in the tab's order)."""

    import_fiftyone()  # FiftyOne configured for labelloop before its first use
    dataset = root_dataset(view)
    project = project_of(dataset)
    task_ids = [int(t) for t in view.values("ls_task_id")]
    if not task_ids:
        raise AnalysisError("the view is empty: nothing to send")
    own = client is None
    client = client or StudioClient.from_settings()
    try:
        created = client.create_review_tab(project, title, task_ids)
    finally:
        if own:
            client.close()
    return {"project": project, "tab": created.get("id"), "title": title, "tasks": len(task_ids)}
