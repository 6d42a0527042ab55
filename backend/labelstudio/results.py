"""Label Studio result JSON ⇄ the engine's labels, in one place.

Label Studio writes regions in percent of the image (``x``, ``y``, ``width``, ``height`` of a rectangle
rotated about its top-left corner; polygon ``points``), one result item per region, tagged with the
control's name and type. Reading: the latest human annotation of a task → ``LabeledImage`` in image
fractions. Writing: an engine prediction → the ``result`` list of a Label Studio prediction.
"""

from __future__ import annotations

import math
from typing import Any

from labelloop.core.labelconfig import ControlSpec
from labelloop.core.predict import ImagePrediction
from labelloop.core.truth import LabeledImage, TruthRegion

# -- reading annotations -------------------------------------------------------------------------------


def latest_human_annotation(task: dict[str, Any]) -> dict[str, Any] | None:
    """The newest annotation that was not skipped/cancelled, or None (predictions never count)."""
    kept = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    if not kept:
        return None
    return max(kept, key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""), a.get("id") or 0))


def _key(annotation: dict[str, Any]) -> str:
    return f"{annotation.get('id')}@{annotation.get('updated_at')}"


def annotation_key(task: dict[str, Any]) -> str | None:
    """Which annotation is the task's truth now ("<id>@<updated_at>"); None when it has none."""
    annotation = latest_human_annotation(task)
    return None if annotation is None else _key(annotation)


def rectangle_to_polygon(value: dict) -> list[tuple[float, float]]:
    """Corners (percent) of a possibly rotated Label Studio rectangle; rotation is about (x, y)."""
    x, y, w, h = (float(value.get(k, 0)) for k in ("x", "y", "width", "height"))
    angle = math.radians(float(value.get("rotation") or 0))
    cos, sin = math.cos(angle), math.sin(angle)
    corners = [(0, 0), (w, 0), (w, h), (0, h)]
    return [(x + dx * cos - dy * sin, y + dx * sin + dy * cos) for dx, dy in corners]


def _fraction(percent: float) -> float:
    return min(1.0, max(0.0, float(percent) / 100.0))


def _region(item: dict[str, Any], spec: ControlSpec) -> TruthRegion | None:
    """One rectangle / polygon result item → a region in image fractions (None: not one of our labels,
    a polygon of fewer than 3 points, or a box with no area once clipped to the image)."""
    value = item.get("value") or {}
    label = next((v for v in value.get(spec.result_type) or [] if v in spec.labels), None)
    if label is None:
        return None
    if spec.kind.polygons:
        points = [(_fraction(px), _fraction(py)) for px, py in value.get("points") or []]
        if len(points) < 3:
            return None
    else:
        points = [(_fraction(px), _fraction(py)) for px, py in rectangle_to_polygon(value)]
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    box = (min(xs), min(ys), max(xs), max(ys))
    if box[2] - box[0] <= 0 or box[3] - box[1] <= 0:
        return None
    return TruthRegion(label, box, tuple(points) if spec.kind.polygons else ())


def labeled_image(task: dict[str, Any], spec: ControlSpec) -> LabeledImage | None:
    """The task's truth for our control, or None when it has none (unlabeled; classification without
    one of our choices). Detection/segmentation: an annotation without a region of our control still
    counts — an image with nothing in it is a useful negative."""
    annotation = latest_human_annotation(task)
    if annotation is None:
        return None
    items = [r for r in annotation.get("result") or [] if r.get("from_name") == spec.from_name]
    key = _key(annotation)
    if spec.kind.whole_image:
        choice = next((c for r in items for c in (r.get("value") or {}).get("choices") or [] if c in spec.labels), None)
        return None if choice is None else LabeledImage(task["id"], key, label=choice)
    regions = tuple(r for r in (_region(item, spec) for item in items) if r is not None)
    return LabeledImage(task["id"], key, regions=regions)


def first_label(result: list[dict[str, Any]] | None, spec: ControlSpec) -> str:
    """The label of a result's first region of ``spec``'s control ("" for none): e.g. the class an
    uncertainty pick is charged to."""
    for item in result or []:
        labels = (item.get("value") or {}).get(spec.result_type)
        if isinstance(labels, list) and labels:
            return str(labels[0])
    return ""


def labeled_images(tasks: list[dict[str, Any]], spec: ControlSpec) -> list[LabeledImage]:
    """``labeled_image`` of every task that has one, in task order."""
    return [image for image in (labeled_image(t, spec) for t in tasks) if image is not None]


# -- writing predictions -------------------------------------------------------------------------------


def _pct(value: float, size: int) -> float:
    return round(min(100.0, max(0.0, 100.0 * value / size)), 4) if size else 0.0


def _pct_unclamped(value: float, size: int) -> float:
    return round(100.0 * value / size, 4) if size else 0.0


def prediction_result(pred: ImagePrediction, spec: ControlSpec) -> list[dict[str, Any]]:
    """Label Studio ``result`` list for one engine prediction (coordinates in percent of the image).

    A multi-label ``Choices`` (``choice="multiple"``) is one item choosing every chosen class, scored by the
    least likely of them."""
    if spec.kind.whole_image and spec.multiple and pred.regions:
        return [{"id": "ll0", "from_name": spec.from_name, "to_name": spec.to_name, "type": spec.result_type,
                 "score": round(min(r.score for r in pred.regions), 6),
                 "value": {"choices": [r.label for r in pred.regions]}}]
    if spec.kind.points:
        return _keypoint_items(pred, spec)
    items: list[dict[str, Any]] = []
    for k, region in enumerate(pred.regions):
        item: dict[str, Any] = {"id": f"ll{k}", "from_name": spec.from_name, "to_name": spec.to_name,
                                "type": spec.result_type, "score": round(region.score, 6)}
        if spec.kind.whole_image:
            item["value"] = {"choices": [region.label]}
        else:
            item.update(original_width=pred.width, original_height=pred.height, image_rotation=0)
            if spec.kind.polygons:
                item["value"] = {"points": [[_pct(x, pred.width), _pct(y, pred.height)] for x, y in region.polygon],
                                 "closed": True, spec.result_type: [region.label]}
            else:
                x, y, w, h = region.bbox
                if region.rotation:  # a rotated box: its corner may lie outside the image, so no clamping
                    position = {"x": _pct_unclamped(x, pred.width), "y": _pct_unclamped(y, pred.height),
                                "rotation": round(region.rotation, 4)}
                else:
                    position = {"x": _pct(x, pred.width), "y": _pct(y, pred.height), "rotation": 0}
                item["value"] = {"x": position["x"], "y": position["y"], "width": _pct(w, pred.width),
                                 "height": _pct(h, pred.height), "rotation": position["rotation"],
                                 spec.result_type: [region.label]}
        items.append(item)
    return items


def _keypoint_items(pred: ImagePrediction, spec: ControlSpec) -> list[dict[str, Any]]:
    """A pose model's objects as upstream's YOLO example writes them: one ``keypointlabels`` item per point
    (``width`` = the point's size in percent of the image width) and, when the config has the control's
    ``<name>_bbox`` rectangles, the object's box as a hidden parent of its points (``parentID``)."""
    items: list[dict[str, Any]] = []
    size = {"original_width": pred.width, "original_height": pred.height, "image_rotation": 0}
    width = round(min(100.0, 100.0 * spec.point_size / pred.width), 4) if pred.width else 0.0
    for k, region in enumerate(pred.regions):
        parent = None
        if spec.boxes is not None and region.label in spec.boxes.labels and region.bbox is not None:
            parent = f"ll{k}"
            x, y, w, h = region.bbox
            items.append({"id": parent, "from_name": spec.boxes.from_name, "to_name": spec.boxes.to_name,
                          "type": spec.boxes.result_type, "score": round(region.score, 6), "hidden": True, **size,
                          "value": {"x": _pct(x, pred.width), "y": _pct(y, pred.height), "width": _pct(w, pred.width),
                                    "height": _pct(h, pred.height), "rotation": 0,
                                    spec.boxes.result_type: [region.label]}})
        for j, (label, px, py, score) in enumerate(region.points):
            item: dict[str, Any] = {"id": f"ll{k}-{j}", "from_name": spec.from_name, "to_name": spec.to_name,
                                    "type": spec.result_type, "score": round(score, 6), **size,
                                    "value": {"x": _pct(px, pred.width), "y": _pct(py, pred.height), "width": width,
                                              spec.result_type: [label]}}
            if parent is not None:
                item["parentID"] = parent
            items.append(item)
    return items
