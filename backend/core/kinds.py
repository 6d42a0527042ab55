"""Task kinds: everything that differs between classification, detection and segmentation, in one place.

A ``TaskKind`` carries the Label Studio side (control tag = result type), the ultralytics side (the task a
fresh model trains, the tasks whose weights can serve it, the yaml a fresh model starts from, the metric
the promotion gate compares) and what the kind's labels look like (one label per image, or regions with
boxes, optionally outlines). Code elsewhere asks the kind (``spec.kind.whole_image``) instead of comparing
task-type strings, so a new kind (keypoints, oriented boxes) is one more entry here plus the conversions
its new attributes call for.

=================  ======================  ====================  =====================
kind               Label Studio tag        ultralytics task      served by
=================  ======================  ====================  =====================
classification     ``Choices``             ``classify``          classify
detection          ``RectangleLabels``     ``detect``            detect, segment
segmentation       ``PolygonLabels``       ``segment``           segment
keypoints          ``KeyPointLabels``      ``pose``              pose (served, not trained)
=================  ======================  ====================  =====================

Served, not trained: ``KeyPointLabels`` (points from an ultralytics ``pose`` model, ``trained=False``),
``RectangleLabels model_obb="true"`` (detection's kind, rotated boxes from an ultralytics
``obb`` model: ``ControlSpec.oriented``) and ``Choices choice="multiple"`` (classification's kind, multi-label:
``ControlSpec.multiple``); training either is refused with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskKind:
    name: str                        # ours, as in manifests, /setup answers and FiftyOne datasets
    ls_tag: str                      # Label Studio control tag as a config writes it ("RectangleLabels")
    ultralytics_task: str            # what a fresh model of this kind trains as
    served_by: tuple[str, ...]       # ultralytics tasks whose weights can serve it (a segment model gives boxes too)
    standard_config: str             # ultralytics yaml a training from scratch starts from
    small_image_config: str | None   # labelloop's own yaml for small images (core/model_configs/), if any
    primary_metric: str              # the tuning-split metric the promotion gate compares
    whole_image: bool                # one label per image, no geometry
    polygons: bool                   # regions carry outlines (masks), not only boxes
    points: bool = False             # regions are named points of an object (keypoints), grouped by its box
    trained: bool = True             # labelloop trains this kind (else it only serves a pose/base model)

    @property
    def result_type(self) -> str:
        """The ``type`` of this kind's result items in Label Studio JSON (the tag, lower case)."""
        return self.ls_tag.lower()

    def __str__(self) -> str:
        return self.name


CLASSIFICATION = TaskKind("classification", "Choices", "classify", ("classify",), "yolov8n-cls.yaml",
                          "labelloop-cls-small.yaml", "top1", whole_image=True, polygons=False)
DETECTION = TaskKind("detection", "RectangleLabels", "detect", ("detect", "segment"), "yolov8n.yaml", None,
                     "box_map50_95", whole_image=False, polygons=False)
SEGMENTATION = TaskKind("segmentation", "PolygonLabels", "segment", ("segment",), "yolov8n-seg.yaml", None,
                        "mask_map50_95", whole_image=False, polygons=True)

# Keypoints are served from the user's ultralytics pose weights (a base model or model_path), as upstream's
# YOLO example does; labelloop does not train them (no recipe, gate or FiftyOne sync for points yet).
KEYPOINTS = TaskKind("keypoints", "KeyPointLabels", "pose", ("pose",), "yolov8n-pose.yaml", None,
                     "pose_map50_95", whole_image=False, polygons=False, points=True, trained=False)

KINDS = {kind.name: kind for kind in (CLASSIFICATION, DETECTION, SEGMENTATION, KEYPOINTS)}
BY_LS_TAG = {kind.ls_tag.lower(): kind for kind in KINDS.values()}  # Label Studio matches tags case-insensitively
BY_ULTRALYTICS_TASK = {kind.ultralytics_task: kind for kind in KINDS.values()}


def kind_of(value: TaskKind | str) -> TaskKind:
    """A kind from itself, its name ("classification") or its ultralytics task ("classify")."""
    if isinstance(value, TaskKind):
        return value
    kind = KINDS.get(value) or BY_ULTRALYTICS_TASK.get(value)
    if kind is None:
        raise ValueError(f"unknown task kind {value!r}; choose from {sorted(KINDS)} "
                         f"(or the ultralytics tasks {sorted(BY_ULTRALYTICS_TASK)})")
    return kind
