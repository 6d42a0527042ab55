"""Label Studio label config → what the model must do (task type, tag names, label map).

Parsing goes through label-studio-sdk's ``LabelInterface`` so we read configs exactly as Label
Studio does. Three control tags are served, each bound to an ``<Image>``:

=================  ===============  =======================
control tag        task type        ultralytics task
=================  ===============  =======================
``Choices``        classification   ``classify``
``RectangleLabels`` detection       ``detect`` (or ``segment``)
``PolygonLabels``  segmentation     ``segment``
=================  ===============  =======================

A config may hold several of them (a ``Choices`` and a ``RectangleLabels`` on one image, as upstream's YOLO
example serves): ``parse_label_controls`` returns each, ``/setup`` and ``/predict`` answer each from its own
model; ``parse_label_config`` returns the one control of a config for what works on one (training, prediction
jobs, FiftyOne) and refuses a config with several.

Tag attributes of the upstream YOLO example are honoured so an existing config works unchanged:
``model_score_threshold`` (keep regions at or above it; the older upstream name ``score_threshold``
too, the first wins when both are set), ``model_skip="true"`` (ignore this tag), ``model_path``
(weights file for this tag, only with ``ALLOW_CUSTOM_MODEL_PATH=true``, resolved under
``MODEL_ROOT``; a bare ultralytics model name such as ``yolo11n.pt`` missing there is downloaded into
it when online, see ``yolo_env.fetch_weights``). Label Studio labels map to model class names through
``predicted_values`` on ``<Label>``, then an exact match, then a case-insensitive match.

``<Choices choice="multiple">`` is served multi-label: every class whose probability is at least the
control's threshold is chosen, at least the most likely one (``scoring.multilabel_choices``); training one
is refused with that reason (ultralytics classifiers are single-label).

``<RectangleLabels model_obb="true">`` (upstream's attribute) is served from an ultralytics OBB model (task
``obb``: a base model or ``model_path``) as rotated rectangles; labelloop does not train OBB models.

``<KeyPointLabels>`` is served from an ultralytics pose model (a base model or ``model_path``), with upstream's
attributes: each ``<Label value="nose" predicted_values="person" model_index="0"/>`` names keypoint 0 of the
model class "person" (``predicted_values`` may be left out: any class), ``model_point_threshold`` (a point's
confidence needed, default 0), ``model_point_size`` (the drawn point, px, default 1), ``model_add_bboxes``
(default true: each object's box goes to the ``<RectangleLabels name="<name>_bbox">`` of the config, when it
has one, as the points' parent; that control is then answered with the points, not served on its own).
labelloop does not train keypoints.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from label_studio_sdk.label_interface import LabelInterface

from labelloop.config import Settings
from labelloop.config import settings as current_settings
from labelloop.core.kinds import BY_LS_TAG, KINDS, TaskKind
from labelloop.errors import LabelloopError


class LabelConfigError(LabelloopError, ValueError):
    """The label config cannot be served; the message names the tag and says what to change."""

    kind, http_status = "label_config", 422


@dataclass(frozen=True)
class ControlSpec:
    """One control tag the model serves."""

    task_type: str  # "classification" | "detection" | "segmentation"
    from_name: str  # control tag name, e.g. "label"
    to_name: str  # the <Image> tag name, e.g. "image"
    value_key: str  # task data key holding the image URL, e.g. "image" (from value="$image")
    labels: tuple[str, ...]  # Label Studio label values, in config order
    predicted_values: dict[str, tuple[str, ...]] = field(default_factory=dict)  # LS label → model names
    score_threshold: float | None = None  # None → LABELLOOP_SCORE_THRESHOLD
    model_path: str | None = None  # raw attribute; resolved by resolve_model_path()
    multiple: bool = False  # <Choices choice="multiple">: every class at or above the threshold is chosen
    oriented: bool = False  # <RectangleLabels model_obb="true">: rotated boxes from an ultralytics OBB model
    # <KeyPointLabels>: (LS label, model class or None = any class, keypoint index) per mapped <Label>
    points: tuple[tuple[str, str | None, int], ...] = ()
    point_threshold: float = 0.0  # model_point_threshold: a point below it is left out
    point_size: float = 1.0  # model_point_size: the drawn point's width, px
    boxes: ControlSpec | None = None  # the <RectangleLabels name="<name>_bbox"> that gets each object's box

    def __post_init__(self):
        if self.task_type not in KINDS:
            raise LabelConfigError(f"unknown task type {self.task_type!r}; choose from {sorted(KINDS)}")

    @property
    def kind(self) -> TaskKind:
        return KINDS[self.task_type]

    @property
    def result_type(self) -> str:
        return self.kind.result_type

    def label_map(self, model_names: dict[int, str] | list[str]) -> dict[int, str]:
        """Map model class indices to Label Studio labels.

        Order of precedence per model class: a ``predicted_values`` entry, then an exact match of a
        label, then a case-insensitive match. Classes that match nothing are left out (the model's
        extra classes are simply not offered to labelers).
        """
        names = dict(enumerate(model_names)) if isinstance(model_names, (list, tuple)) else dict(model_names)
        explicit = {m: label for label, ms in self.predicted_values.items() for m in ms}
        explicit_folded = {m.casefold(): label for m, label in explicit.items()}
        exact = {label: label for label in self.labels}
        folded = {label.casefold(): label for label in self.labels}
        mapping: dict[int, str] = {}
        for index, name in names.items():
            label = explicit.get(name) or explicit_folded.get(name.casefold()) or exact.get(name)
            label = label or folded.get(name.casefold())
            if label is not None:
                mapping[int(index)] = label
        return mapping

    def point_map(self, model_names: dict[int, str] | list[str]) -> dict[int, dict[int, str]]:
        """Keypoints: model class index → {keypoint index → Label Studio label}, from each ``<Label>``'s
        ``predicted_values`` (the class; none = every class) and ``model_index`` (the keypoint)."""
        names = dict(enumerate(model_names)) if isinstance(model_names, (list, tuple)) else dict(model_names)
        mapping: dict[int, dict[int, str]] = {}
        for index, name in names.items():
            for label, model_class, point in self.points:
                if model_class is None or model_class == name or model_class.casefold() == str(name).casefold():
                    mapping.setdefault(int(index), {}).setdefault(point, label)
        return mapping

    def require_label_map(self, model_names: dict[int, str] | list[str]) -> dict[int, str]:
        """``label_map`` that raises a clear error when no model class matches any label (keypoints: the
        model classes whose points are mapped, by class name)."""
        if self.kind.points:
            names = dict(enumerate(model_names)) if isinstance(model_names, (list, tuple)) else dict(model_names)
            points = self.point_map(names)
            if not points:
                raise LabelConfigError(
                    f"<KeyPointLabels name=\"{self.from_name}\">: no <Label> maps a keypoint of the model's classes "
                    f"{list(names.values())[:20]}; add model_index=\"<keypoint number, from 0>\" (and "
                    "predicted_values=\"<model class>\") to each <Label>"
                )
            return {index: str(names[index]) for index in points}
        mapping = self.label_map(model_names)
        if not mapping:
            shown = list(dict(enumerate(model_names)).values() if isinstance(model_names, (list, tuple))
                         else model_names.values())
            raise LabelConfigError(
                f"<{self.result_type_tag}> '{self.from_name}': none of its labels {list(self.labels)} "
                f"matches a model class {shown[:20]}; add predicted_values=\"<model class>\" to a <Label>"
            )
        return mapping

    @property
    def result_type_tag(self) -> str:
        return self.kind.ls_tag


# The tag attributes that set a region's display threshold: the upstream YOLO example's name, then the
# older upstream examples' one.
THRESHOLD_ATTRIBUTES = ("model_score_threshold", "score_threshold")


def threshold_for(spec: ControlSpec, env: Settings | None = None) -> float:
    """The score a region needs to be offered: the tag's ``model_score_threshold`` (or ``score_threshold``),
    else LABELLOOP_SCORE_THRESHOLD."""
    if spec.score_threshold is not None:
        return spec.score_threshold
    return (env or current_settings()).score_threshold


def _truthy(value: str | None) -> bool:
    return str(value or "").strip().lower() in ("1", "true", "yes")


def _check_xml(config: str) -> None:
    if not isinstance(config, str) or not config.strip():
        raise LabelConfigError("the label config is empty")
    try:
        ET.fromstring(config)
    except ET.ParseError as exc:
        raise LabelConfigError(f"the label config is not valid XML: {exc}") from None


def parse_label_config(config: str) -> ControlSpec:
    """Parse a Label Studio label config into the one control the model serves (training, prediction jobs,
    FiftyOne: a project's trained versions are of one control).

    Raises LabelConfigError naming the offending tag when the config has no servable control,
    when a servable control is not bound to an <Image>, or when several are (mark all but one with
    ``model_skip="true"``; ``/predict`` serves several, see ``parse_label_controls``).
    """
    servable = parse_label_controls(config)
    if len(servable) > 1:
        names = ", ".join(f"<{s.result_type_tag} name=\"{s.from_name}\">" for s in servable)
        raise LabelConfigError(
            f"the label config has {len(servable)} controls the model could serve ({names}); /predict answers "
            "each from its own model, but training, prediction jobs and FiftyOne work on one control: "
            "mark all but one with model_skip=\"true\""
        )
    return servable[0]


def parse_label_controls(config: str) -> list[ControlSpec]:
    """Every control of the config the model can serve, in config order (at least one): what ``/setup`` and
    ``/predict`` answer, each control from its own model (as upstream's YOLO example does).

    Raises LabelConfigError naming the offending tag when there is none, or when a servable control is
    not bound to an <Image>.
    """
    _check_xml(config)
    try:
        interface = LabelInterface(config)
    except Exception as exc:  # the SDK raises assorted types for malformed configs
        raise LabelConfigError(f"Label Studio could not parse the label config: {exc}") from None

    images = {obj.name: obj for obj in interface.objects if obj.tag.lower() == "image"}
    servable: list[ControlSpec] = []
    seen_tags: list[str] = []
    # a KeyPointLabels' "<name>_bbox" rectangles carry its objects' boxes: answered with the points
    box_controls = {f"{c.name}_bbox" for c in interface.controls
                    if c.tag.lower() == "keypointlabels" and not _truthy(c.attr.get("model_skip"))
                    and str(c.attr.get("model_add_bboxes", "true")).strip().lower() in ("1", "true", "yes")}
    by_name = {c.name: c for c in interface.controls}
    for control in interface.controls:
        tag = control.tag
        seen_tags.append(f"<{tag} name=\"{control.name}\">")
        if tag.lower() not in BY_LS_TAG or _truthy(control.attr.get("model_skip")):
            continue
        if tag.lower() == "rectanglelabels" and control.name in box_controls:
            continue
        to_names = list(control.to_name or [])
        image = next((images[n] for n in to_names if n in images), None)
        if image is None:
            raise LabelConfigError(
                f"<{tag} name=\"{control.name}\"> must point toName at an <Image> tag "
                f"(it points at {to_names}); only image tasks are supported"
            )
        spec = _control_spec(control, image)
        if spec.kind.points:
            spec = _with_points(spec, control, by_name.get(f"{control.name}_bbox"), image)
        servable.append(spec)

    if not servable:
        raise LabelConfigError(
            "the label config has no control the model can serve: expected <Choices>, <RectangleLabels>, "
            f"<PolygonLabels> or <KeyPointLabels> bound to an <Image>; found {seen_tags or 'no control tags'}"
        )
    return servable


MAX_KEYPOINT_INDEX = 1000  # ultralytics pose models have tens of keypoints; a bound for an attribute from outside


def _number(control, attribute: str, default: float, low: float, high: float) -> float:
    raw = control.attr.get(attribute)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise LabelConfigError(f"<{control.tag} name=\"{control.name}\"> {attribute}={raw!r} is not a number") from None
    if not low <= value <= high:  # NaN fails this too
        raise LabelConfigError(f"<{control.tag} name=\"{control.name}\"> {attribute} must be in [{low:g}, {high:g}], "
                               f"got {raw!r}")
    return value


def _with_points(spec: ControlSpec, control, box_control, image) -> ControlSpec:
    """A KeyPointLabels spec with its point map, point threshold and size, and its box control."""
    import dataclasses

    points: list[tuple[str, str | None, int]] = []
    for label, attrs in (getattr(control, "labels_attrs", None) or {}).items():
        attr = getattr(attrs, "attr", None) or {}
        raw = attr.get("model_index")
        if raw is None:
            continue
        try:
            index = int(str(raw).strip())
        except ValueError:
            raise LabelConfigError(f"<Label value=\"{label}\"> of <KeyPointLabels name=\"{control.name}\">: "
                                   f"model_index={raw!r} is not a whole number") from None
        if not 0 <= index < MAX_KEYPOINT_INDEX:
            raise LabelConfigError(f"<Label value=\"{label}\"> of <KeyPointLabels name=\"{control.name}\">: "
                                   f"model_index must be in [0, {MAX_KEYPOINT_INDEX}), got {raw!r}")
        classes: list[str | None] = [v.strip() for v in str(attr.get("predicted_values") or "").split(",") if v.strip()]
        points += [(label, model_class, index) for model_class in (classes or [None])]
    boxes = None
    if box_control is not None and str(control.attr.get("model_add_bboxes", "true")).strip().lower() in ("1", "true", "yes"):
        if box_control.tag.lower() != "rectanglelabels":
            raise LabelConfigError(f"<{box_control.tag} name=\"{box_control.name}\"> would get the boxes of "
                                   f"<KeyPointLabels name=\"{control.name}\">: it must be a <RectangleLabels>")
        boxes = _control_spec(box_control, image)
    return dataclasses.replace(spec, points=tuple(points),
                               point_threshold=_number(control, "model_point_threshold", 0.0, 0.0, 1.0),
                               point_size=_number(control, "model_point_size", 1.0, 0.0, 10_000.0), boxes=boxes)


def _control_spec(control, image) -> ControlSpec:
    tag = control.tag
    labels = tuple(control.labels or [])
    if not labels:
        raise LabelConfigError(f"<{tag} name=\"{control.name}\"> has no labels")
    predicted: dict[str, tuple[str, ...]] = {}
    for label, attrs in (getattr(control, "labels_attrs", None) or {}).items():
        raw = (getattr(attrs, "attr", None) or {}).get("predicted_values")
        if raw:
            predicted[label] = tuple(v.strip() for v in raw.split(",") if v.strip())
    threshold = None
    for attribute in THRESHOLD_ATTRIBUTES:  # the first one set wins
        raw = control.attr.get(attribute)
        if raw is None:
            continue
        try:
            threshold = float(raw)
        except ValueError:
            raise LabelConfigError(f"<{tag} name=\"{control.name}\"> {attribute}={raw!r} is not a number") from None
        if not 0.0 <= threshold <= 1.0:  # NaN fails this too
            raise LabelConfigError(f"<{tag} name=\"{control.name}\"> {attribute} must be in [0, 1], got {raw!r}")
        break
    value = str(image.value or "")
    if not value.startswith("$") or len(value) < 2:
        raise LabelConfigError(f"<Image name=\"{image.name}\"> needs value=\"$<data key>\", got {value!r}")
    return ControlSpec(
        task_type=BY_LS_TAG[tag.lower()].name,
        from_name=control.name,
        to_name=image.name,
        value_key=value[1:],
        labels=labels,
        predicted_values=predicted,
        score_threshold=threshold,
        model_path=control.attr.get("model_path") or None,
        multiple=tag.lower() == "choices" and str(control.attr.get("choice") or "").strip().lower() == "multiple",
        oriented=tag.lower() == "rectanglelabels" and _truthy(control.attr.get("model_obb")),
    )


def resolve_model_path(spec: ControlSpec, allow_custom: bool, model_root: Path,
                       offline: bool | None = None) -> Path | None:
    """The weights file named by the tag's ``model_path``, if allowed and inside ``model_root``.

    A bare ultralytics model name (``yolo11n.pt``) that is not under ``model_root`` is downloaded there
    (``yolo_env.fetch_weights``) unless ``offline`` (default: LABELLOOP_OFFLINE) or there is no network."""
    if not spec.model_path:
        return None
    if not allow_custom:
        raise LabelConfigError(
            f"<{spec.result_type_tag} name=\"{spec.from_name}\"> sets model_path but "
            "ALLOW_CUSTOM_MODEL_PATH is not true on the backend"
        )
    root = model_root.resolve()
    path = (root / spec.model_path).resolve()
    if root not in path.parents and path != root:
        raise LabelConfigError(f"model_path {spec.model_path!r} escapes MODEL_ROOT")
    if not path.is_file():
        from labelloop.config import is_weights_name

        if is_weights_name(spec.model_path):
            from labelloop.core.yolo_env import fetch_weights

            return fetch_weights(spec.model_path, root, what="model_path",
                                 offline=current_settings().offline if offline is None else offline)
        raise LabelConfigError(f"model_path {spec.model_path!r} does not exist under MODEL_ROOT ({root})")
    return path
