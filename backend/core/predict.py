"""Batched inference: images → regions with scores, and regions → Label Studio results.

One code path for every face: the service's /predict, the Celery prediction job and the FiftyOne
plugins all call ``predict_images`` and read the same ``ImagePrediction`` objects, so a score seen
in FiftyOne is the score Label Studio got.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from labelloop.core import scoring
from labelloop.core.calibration import apply_temperature
from labelloop.core.kinds import kind_of
from labelloop.core.labelconfig import ControlSpec, LabelConfigError
from labelloop.core.yolo_env import import_yolo

log = logging.getLogger(__name__)


@dataclass
class Region:
    label: str  # Label Studio label
    score: float  # model confidence
    class_index: int  # model class index
    bbox: tuple[float, float, float, float] | None = None  # x, y, w, h in pixels
    polygon: list[tuple[float, float]] | None = None  # pixels
    rotation: float = 0.0  # degrees clockwise about the bbox's (x, y) corner (an OBB model's rotated box)
    # detection: the per-class sigmoid scores of this box, by Label Studio label (not normalized)
    class_probs: dict[str, float] = field(default_factory=dict)
    # keypoints: the object's named points, (Label Studio label, x px, y px, confidence); label = the box's
    points: list[tuple[str, float, float, float]] = field(default_factory=list)


@dataclass
class ImagePrediction:
    width: int = 0
    height: int = 0
    regions: list[Region] = field(default_factory=list)  # shown: confidence >= threshold
    candidates: list[Region] = field(default_factory=list)  # every region >= floor, shown or hidden
    candidate_scores: list[float] = field(default_factory=list)  # their confidences (for the task score)
    class_probs: dict[str, float] = field(default_factory=dict)  # classification: LS label -> prob
    score: float | None = None  # task score (see scoring.py); None when the image failed
    error: str | None = None  # why this image has no prediction


@dataclass
class LoadedModel:
    """An ultralytics model loaded once per process and weights file; predict calls are serialized."""

    yolo: Any  # ultralytics.YOLO
    path: Path
    version: str
    task: str  # classify | detect | segment
    names: dict[int, str]
    lock: threading.Lock = field(default_factory=threading.Lock)
    temperature: float = 1.0  # classification: probabilities are softmax(log p / T) (see calibration.py)


_cache: OrderedDict[tuple[str, int], LoadedModel] = OrderedDict()
_cache_lock = threading.Lock()
_loading: dict[tuple[str, int], threading.Lock] = {}  # a lock per file being loaded
CACHE_SIZE = 3  # a few versions at once: the served one, its predecessor, a comparison


def load_model(path: str | Path, version: str) -> LoadedModel:
    """Load (or reuse) the model at ``path``; keyed by path and mtime so a replaced file reloads."""
    path = Path(path)
    try:
        key = (str(path.resolve()), path.stat().st_mtime_ns)
    except FileNotFoundError:
        raise LabelConfigError(f"model weights not found: {path}") from None
    with _cache_lock:
        cached = _cache.get(key)
        if cached is not None:
            _cache.move_to_end(key)
            return cached
        loading = _loading.setdefault(key, threading.Lock())
    with loading:  # one load per file at a time: a /predict arriving during /setup's load waits for it
        with _cache_lock:
            cached = _cache.get(key)
        if cached is not None:
            return cached
        try:
            model = _load(path, version)
        finally:
            with _cache_lock:
                _loading.pop(key, None)
        with _cache_lock:
            _cache[key] = model
            while len(_cache) > CACHE_SIZE:
                _cache.popitem(last=False)
        return model


def _load(path: Path, version: str) -> LoadedModel:
    from labelloop.core.safe_load import check_weights

    check_weights(path)  # weights from outside the registry: refuse a pickle that would run code
    YOLO = import_yolo()
    yolo = YOLO(str(path))
    model = LoadedModel(yolo=yolo, path=path, version=version, task=yolo.task, names=dict(yolo.names),
                        temperature=_temperature_beside(path))
    warmed = _warm_up(model)
    log.info("loaded model %s (%s, %d classes) from %s; warm-up %.2f s", version, model.task, len(model.names),
             path, warmed)
    return model


def _warm_up(model: LoadedModel) -> float:
    """One forward pass on a blank image, with the predictor that serves this model, so that no request
    pays ultralytics' first-call setup (predictor build, layer fusion, first allocations): measured on a
    yolov8n detector on 2 CPU cores, the first 8-image predict took 3.4 s, the next ones 0.7-1.0 s.
    Returns the seconds it took; a failure here is logged and left to the first request to report."""
    started = time.perf_counter()
    kwargs: dict[str, Any] = {"verbose": False}
    if model.task in SCORED_REGION_TASKS:
        kwargs["predictor"] = _scoring_predictor(model.task)
    try:
        with model.lock:
            model.yolo.predict(np.zeros((64, 64, 3), dtype=np.uint8), **kwargs)
    except Exception:  # a model that cannot run says so on its first real request, with the task's error
        log.warning("warm-up of %s failed", model.version, exc_info=True)
    return time.perf_counter() - started


def _temperature_beside(weights: Path) -> float:
    """The calibration temperature in the registry manifest next to ``weights`` (1.0 for foreign weights)."""
    import json

    try:
        data = json.loads((weights.parent / "manifest.json").read_text())
        temperature = float((data.get("calibration") or {}).get("temperature") or 1.0)
    except (OSError, ValueError, TypeError, AttributeError):
        return 1.0
    return temperature if 0.0 < temperature < 1000.0 else 1.0


class _KeepClassScores:
    """Keeps each kept box's per-class scores, which ultralytics' Results drop after NMS.

    Uses the predictor's own object-feature hook: when ``_feats`` is set, its postprocess asks NMS for
    the kept rows and hands them to ``get_obj_feats``, whose answer lands in ``result.feats``. Here
    ``_feats`` is the raw output and ``get_obj_feats`` reads the class columns of the kept rows.
    """

    def postprocess(self, preds, img, orig_imgs, **kwargs):
        raw = preds
        while isinstance(raw, (list, tuple)):  # detect: tensor or (y, x); segment: ((y, x), protos)
            raw = raw[0]
        self._feats = raw
        try:
            return super().postprocess(preds, img, orig_imgs, **kwargs)
        finally:
            self._feats = None

    def get_obj_feats(self, raw, idxs):
        nc = len(self.model.names)
        return [raw[b, 4 : 4 + nc, idx.long().view(-1)].T.float().cpu().numpy() for b, idx in enumerate(idxs)]


# the tasks whose boxes carry per-class scores (_KeepClassScores); pose and obb answer with ultralytics' own
SCORED_REGION_TASKS = ("detect", "segment")


@functools.cache
def _scoring_predictor(task: str):
    """The ultralytics predictor class for ``task`` with class scores kept (classify needs none)."""
    from ultralytics.models.yolo.detect import DetectionPredictor
    from ultralytics.models.yolo.segment import SegmentationPredictor

    base = SegmentationPredictor if kind_of(task).polygons else DetectionPredictor
    return type(f"Scoring{base.__name__}", (_KeepClassScores, base), {})


def cached_model_count() -> int:
    return len(_cache)


def loaded_versions() -> list[str]:
    """Versions in memory and warmed, oldest first: what answers a /predict without loading."""
    with _cache_lock:
        return [model.version for model in _cache.values()]


def check_compatible(model: LoadedModel, spec: ControlSpec) -> None:
    if spec.oriented:
        if model.task != "obb":
            raise LabelConfigError(
                f"<{spec.result_type_tag} name=\"{spec.from_name}\"> has model_obb=\"true\": it needs an obb model "
                f"(rotated boxes), but {model.version} is a {model.task} model"
            )
        return
    if model.task not in spec.kind.served_by:
        raise LabelConfigError(
            f"<{spec.result_type_tag} name=\"{spec.from_name}\"> needs a "
            f"{' or '.join(spec.kind.served_by)} model, but {model.version} is a {model.task} model"
        )


def predict_images(
    model: LoadedModel,
    images: list[Path] | list[np.ndarray],
    spec: ControlSpec,
    threshold: float,
    batch: int = 16,
    imgsz: int | None = None,
    tta: bool = False,
) -> list[ImagePrediction]:
    """Predict every image, in batches of ``batch``; one ImagePrediction per image, in order.

    ``tta`` (classification): average the calibrated probabilities over the image and three
    label-preserving views (the training augmentation's flips and 90° turns), four forward passes.
    """
    check_compatible(model, spec)
    label_of = spec.require_label_map(model.names)
    multilabel = threshold if spec.kind.whole_image and spec.multiple else None
    if tta and spec.kind.whole_image:
        paths = [p for p in images if isinstance(p, Path)]
        if len(paths) != len(images):
            raise ValueError("test-time augmentation reads image files, not arrays")
        return _predict_classification_tta(model, paths, label_of, batch, imgsz, multilabel)
    if spec.kind.whole_image and model.task == "classify" and not imgsz:
        return _predict_classification(model, images, label_of, batch, multilabel)
    floor = min(scoring.CANDIDATE_FLOOR, threshold)
    out: list[ImagePrediction] = []
    for start in range(0, len(images), batch):
        # paths, or BGR arrays (model tests predict perturbed images without writing them)
        chunk = [p if isinstance(p, np.ndarray) else str(p) for p in images[start : start + batch]]
        kwargs = dict(conf=floor, verbose=False, batch=len(chunk))
        if imgsz:
            kwargs["imgsz"] = imgsz
        if model.task in SCORED_REGION_TASKS and not spec.oriented:
            kwargs["predictor"] = _scoring_predictor(model.task)
        with model.lock:  # ultralytics predictors keep per-call state: one call at a time per model
            results = model.yolo.predict(chunk, **kwargs)
        for result in results:
            out.append(_convert(result, model, spec, label_of, threshold, floor, getattr(result, "feats", None)))
    return out


TTA_VIEWS = 4  # the image, flipped left-right, flipped up-down, turned 90°


def _views(image: np.ndarray) -> list[np.ndarray]:
    return [image, np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(image[::-1]),
            np.ascontiguousarray(np.rot90(image))]


def _predict_classification_tta(model: LoadedModel, images: list[Path], label_of: dict[int, str], batch: int,
                                imgsz: int | None, multilabel: float | None = None) -> list[ImagePrediction]:
    out: list[ImagePrediction] = []
    per_chunk = max(1, batch // TTA_VIEWS)
    for start in range(0, len(images), per_chunk):
        arrays: list[np.ndarray] = []
        for p in images[start : start + per_chunk]:
            decoded = _read_bgr(p)
            if decoded is None:
                raise ValueError(f"cannot decode image {p}")
            arrays.append(decoded)
        views = [v for a in arrays for v in _views(a)]
        probs = _classify(model, views, imgsz)
        for k, array in enumerate(arrays):
            group = [_mapped_probs(row, label_of, model.temperature) for row in probs[k * TTA_VIEWS : (k + 1) * TTA_VIEWS]]
            height, width = array.shape[:2]
            out.append(_classification_prediction(ImagePrediction(width=width, height=height),
                                                   [label_of[i] for i in sorted(label_of)], np.mean(group, axis=0),
                                                   label_of, multilabel))
    return out


def _predict_classification(model: LoadedModel, images: list[Path] | list[np.ndarray], label_of: dict[int, str],
                            batch: int, multilabel: float | None) -> list[ImagePrediction]:
    """Whole-image predictions, images decoded here and the batch fed to the model (``_classify``); a batch with
    a file OpenCV cannot decode goes through ultralytics' own loader, which reads more formats or says why not."""
    labels = [label_of[i] for i in sorted(label_of)]
    out: list[ImagePrediction] = []
    for start in range(0, len(images), batch):
        part = images[start : start + batch]
        read = [p if isinstance(p, np.ndarray) else _read_bgr(p) for p in part]
        arrays = [a for a in read if a is not None]
        if len(arrays) < len(read):
            try:
                with model.lock:
                    rows, shapes = _ultralytics_probs(model, [str(p) if isinstance(p, Path) else p for p in part])
            except Exception as exc:  # ultralytics' own words are about its loader (e.g. a missing HEIF plugin)
                bad = next(p for p, a in zip(part, read) if a is None)
                raise ValueError(f"cannot decode image {bad}: {type(exc).__name__}: {exc}") from exc
        else:
            rows = list(_classify(model, arrays))
            shapes = [a.shape[:2] for a in arrays]
        for row, (height, width) in zip(rows, shapes):
            out.append(_classification_prediction(ImagePrediction(width=width, height=height), labels,
                                                   _mapped_probs(row, label_of, model.temperature), label_of, multilabel))
    return out


def _read_bgr(path) -> np.ndarray | None:
    import cv2

    return cv2.imread(str(path), cv2.IMREAD_COLOR)


def _classify(model: LoadedModel, arrays: list[np.ndarray], imgsz: int | None = None) -> np.ndarray:
    """Class probabilities (n, classes) of BGR images, the same numbers as ``model.yolo.predict`` gives.

    ultralytics' predict builds a source loader, a batch of Results and a stream per call: at 64 px that is a
    third of the per-image cost (0.65 ms an image from files against 0.55 ms fed here, 2 cores). Here the
    predictor's own preprocessing (its transforms: resize, crop, BGR to RGB, scaling) and its model's forward
    pass run on the decoded batch; ``tests/test_predict_direct.py`` holds the two to the same probabilities.
    A model whose predictor is not set up (or another image size) goes through ``predict``."""
    import torch

    with model.lock:
        predictor = getattr(model.yolo, "predictor", None)
        ready = (imgsz is None and predictor is not None and getattr(predictor, "model", None) is not None
                 and getattr(predictor, "transforms", None) is not None)
        if not ready or predictor is None:
            return np.stack(_ultralytics_probs(model, arrays, imgsz)[0])
        with torch.inference_mode():
            # not predictor.inference, which follows the state its last call left (embed, augment)
            output = predictor.model(_preprocessed(predictor, arrays))
        output = output[0] if isinstance(output, (list, tuple)) else output  # (probabilities, logits)
        return output.float().cpu().numpy().astype(float)


def _ultralytics_probs(model: LoadedModel, sources: list, imgsz: int | None = None) -> tuple[list[np.ndarray], list]:
    """``model.yolo.predict``'s class probabilities and original (height, width) per source; the caller holds
    ``model.lock``."""
    kwargs: dict[str, Any] = {"verbose": False, "batch": len(sources)}
    if imgsz:
        kwargs["imgsz"] = imgsz
    results = model.yolo.predict(sources, **kwargs)
    return ([r.probs.data.cpu().numpy().astype(float) for r in results],
            [tuple(int(v) for v in r.orig_shape) for r in results])


def _preprocessed(predictor, arrays: list[np.ndarray]):
    """``predictor.preprocess(arrays)``; images already at the model's size skip its resize and crop, which
    return such an image unchanged (0.1 ms an image at 64 px through PIL)."""
    size = tuple(getattr(predictor, "imgsz", ()) or ())
    device_transform = getattr(predictor, "device_transform", None)
    if (getattr(predictor, "host_transforms", None) is None or device_transform is None or len(size) != 2
            or any(a.shape != (size[0], size[1], 3) or a.dtype != np.uint8 for a in arrays)):
        return predictor.preprocess(arrays)
    import torch

    # ultralytics' BasePredictor.preprocess from here: uint8 to the device, BHWC to BCHW, BGR to RGB, 0-1
    batch = torch.from_numpy(np.stack(arrays)).to(predictor.device).permute(0, 3, 1, 2).contiguous().flip(1)
    batch = (batch.half() if predictor.model.fp16 else batch.float()).div_(255)
    return device_transform(batch)


def _mapped_probs(probs: np.ndarray, label_of: dict[int, str], temperature: float = 1.0) -> np.ndarray:
    """The model's probabilities of the config's classes, renormalized, then calibrated (``temperature``)."""
    mapped = scoring.normalize([probs[i] for i in sorted(label_of)])
    return apply_temperature(mapped, temperature) if temperature != 1.0 else mapped


def embed_images(model: LoadedModel, images: list[Path], batch: int = 16) -> np.ndarray:
    """One vector per image from the model's own backbone (pooled features), shape (n, d)."""
    vectors = []
    for start in range(0, len(images), batch):
        chunk = [str(p) for p in images[start : start + batch]]
        with model.lock:
            for vector in model.yolo.embed(chunk, verbose=False):
                vectors.append(vector.float().cpu().numpy().reshape(-1))
    return np.stack(vectors) if vectors else np.zeros((0, 0))


def _convert(result, model: LoadedModel, spec: ControlSpec, label_of: dict[int, str], threshold: float,
             floor: float, box_scores: np.ndarray | None = None) -> ImagePrediction:
    height, width = (int(v) for v in result.orig_shape)
    pred = ImagePrediction(width=width, height=height)
    if spec.kind.whole_image:
        return _convert_classification(result, pred, label_of, model.temperature,
                                       threshold if spec.multiple else None)
    if spec.oriented:
        return _convert_oriented(result, pred, label_of, threshold, floor)
    if spec.kind.points:
        return _convert_keypoints(result, pred, spec, spec.point_map(model.names), model.names, threshold, floor)

    boxes = result.boxes
    if boxes is None or len(boxes) == 0:
        pred.score = scoring.detection_task_score([], threshold, floor)
        return pred
    conf = boxes.conf.cpu().numpy().astype(float)
    cls = boxes.cls.cpu().numpy().astype(int)
    xyxy = boxes.xyxy.cpu().numpy().astype(float)
    polygons = result.masks.xy if (spec.kind.polygons and result.masks is not None) else None
    aligned = box_scores is not None and len(box_scores) == len(conf)
    for i in range(len(conf)):
        label = label_of.get(int(cls[i]))
        if label is None:  # a model class the label config does not offer
            continue
        x1, y1, x2, y2 = (float(v) for v in xyxy[i])
        region = Region(label=label, score=float(conf[i]), class_index=int(cls[i]),
                        bbox=(x1, y1, x2 - x1, y2 - y1))
        if aligned and box_scores is not None:
            region.class_probs = {lab: float(box_scores[i][j]) for j, lab in label_of.items() if j < box_scores.shape[1]}
        pred.candidates.append(region)
        pred.candidate_scores.append(float(conf[i]))
        if conf[i] < threshold:
            continue
        if polygons is not None:
            region.polygon = simplify_polygon(polygons[i])
            if len(region.polygon) < 3:
                continue  # mask too small to outline; still counted in the task score
        pred.regions.append(region)
    pred.score = scoring.detection_task_score(pred.candidate_scores, threshold, floor)
    return pred


def _convert_oriented(result, pred: ImagePrediction, label_of: dict[int, str], threshold: float,
                      floor: float) -> ImagePrediction:
    """An OBB model's rotated boxes (centre, size, angle) as Label Studio rectangles: the corner the box
    rotates about (its top-left before rotation) and the angle in degrees; scored as detection's boxes."""
    import math

    obb = getattr(result, "obb", None)
    if obb is not None and len(obb):
        conf = obb.conf.cpu().numpy().astype(float)
        cls = obb.cls.cpu().numpy().astype(int)
        for i, (cx, cy, w, h, angle) in enumerate(obb.xywhr.cpu().numpy().astype(float)):
            label = label_of.get(int(cls[i]))
            if label is None:
                continue
            cos, sin = math.cos(angle), math.sin(angle)
            x = cx - (w / 2) * cos + (h / 2) * sin  # the centre minus the rotated half-diagonal
            y = cy - (w / 2) * sin - (h / 2) * cos
            region = Region(label=label, score=float(conf[i]), class_index=int(cls[i]), bbox=(x, y, w, h),
                            rotation=math.degrees(angle) % 360.0)
            pred.candidates.append(region)
            pred.candidate_scores.append(float(conf[i]))
            if conf[i] >= threshold:
                pred.regions.append(region)
    pred.score = scoring.detection_task_score(pred.candidate_scores, threshold, floor)
    return pred


def _convert_keypoints(result, pred: ImagePrediction, spec: ControlSpec, point_map: dict[int, dict[int, str]],
                       names: dict[int, str], threshold: float, floor: float) -> ImagePrediction:
    """A pose model's objects: each kept box (scored as detection's keep/drop decisions) with its mapped points
    at or above the control's point threshold (a model without point confidences keeps them all). The box's
    label is its class mapped onto the ``<name>_bbox`` control's labels, else the model's class name."""
    boxes, keypoints = result.boxes, getattr(result, "keypoints", None)
    if boxes is None or len(boxes) == 0 or keypoints is None:
        pred.score = scoring.detection_task_score([], threshold, floor)
        return pred
    conf = boxes.conf.cpu().numpy().astype(float)
    cls = boxes.cls.cpu().numpy().astype(int)
    xyxy = boxes.xyxy.cpu().numpy().astype(float)
    xy = keypoints.xy.cpu().numpy().astype(float)
    point_conf = keypoints.conf.cpu().numpy().astype(float) if keypoints.conf is not None else None
    box_label = spec.boxes.label_map(names) if spec.boxes is not None else {}
    for i in range(len(conf)):
        mapped = point_map.get(int(cls[i]))
        if not mapped:  # a class none of the config's points belongs to
            continue
        x1, y1, x2, y2 = (float(v) for v in xyxy[i])
        region = Region(label=box_label.get(int(cls[i]), str(names.get(int(cls[i]), cls[i]))), score=float(conf[i]),
                        class_index=int(cls[i]), bbox=(x1, y1, x2 - x1, y2 - y1))
        pred.candidates.append(region)
        pred.candidate_scores.append(float(conf[i]))
        if conf[i] < threshold:
            continue
        for k, label in sorted(mapped.items()):
            if k >= len(xy[i]):
                continue
            score = float(point_conf[i][k]) if point_conf is not None else float(conf[i])
            x, y = float(xy[i][k][0]), float(xy[i][k][1])
            # ultralytics puts an invisible point at (0, 0); one below the threshold is not offered either
            if score < spec.point_threshold or (x == 0.0 and y == 0.0):
                continue
            region.points.append((label, x, y, score))
        pred.regions.append(region)
    pred.score = scoring.detection_task_score(pred.candidate_scores, threshold, floor)
    return pred


def _convert_classification(result, pred: ImagePrediction, label_of: dict[int, str],
                            temperature: float = 1.0, multilabel: float | None = None) -> ImagePrediction:
    probs = result.probs.data.cpu().numpy().astype(float)
    return _classification_prediction(pred, [label_of[i] for i in sorted(label_of)],
                                      _mapped_probs(probs, label_of, temperature), label_of, multilabel)


def _classification_prediction(pred: ImagePrediction, labels: list[str], probs, label_of: dict[int, str],
                               multilabel: float | None = None) -> ImagePrediction:
    """One chosen class (the most likely); with ``multilabel`` (the threshold of a ``choice="multiple"``
    control) every class at or above it, at least the most likely (``scoring.multilabel_choices``), scored
    as choose/leave decisions (``scoring.multilabel_task_score``). ultralytics classifiers are softmax
    models: their probabilities compete, so a multi-label control wants a threshold under 0.5."""
    index_of = {label: i for i, label in label_of.items()}
    pred.class_probs = {label: float(p) for label, p in zip(labels, probs)}
    if multilabel is not None:
        chosen = scoring.multilabel_choices(probs, multilabel)
        pred.regions = [Region(label=labels[i], score=float(probs[i]), class_index=index_of[labels[i]]) for i in chosen]
        pred.candidate_scores = [float(probs[i]) for i in chosen]
        pred.score = scoring.multilabel_task_score(probs, multilabel)
        return pred
    best = int(np.argmax(probs))
    pred.regions.append(Region(label=labels[best], score=float(probs[best]), class_index=index_of[labels[best]]))
    pred.candidate_scores = [float(probs[best])]
    pred.score = scoring.classification_task_score(list(probs))
    return pred


def simplify_polygon(points: np.ndarray, tolerance_px: float = 1.0) -> list[tuple[float, float]]:
    """Fewer polygon vertices (Douglas-Peucker, 1 px) so Label Studio payloads stay small."""
    array = np.asarray(points, dtype=np.float32)
    if len(array) < 3:
        return []
    import cv2

    approx = cv2.approxPolyDP(array.reshape(-1, 1, 2), tolerance_px, True).reshape(-1, 2)
    kept = approx if len(approx) >= 3 else array
    return [(float(x), float(y)) for x, y in kept]
