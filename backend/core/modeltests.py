"""Model tests: what a version must get right before it may serve — a project's promotion gates.

A project writes its tests down once (``model-tests.json`` beside its versions, or ``PUT
/projects/<id>/model-tests``, or ``labelloop model-tests --set``); every new version runs them on the
tuning split (the project's held-out labeled tasks) before promotion, and a failing *required* test keeps
it out of service with the failing tasks named. Three kinds, after the error-analysis seed's
"confidence tests", "invariance tests" and "data unit tests":

* ``confidence`` — on a cohort of tuning tasks (``{"label": "star"}``: tasks whose human label is, or
  whose regions include, a star; ``{"data.camera": "7"}``, ``{"meta.source": "night"}``; every key must
  match; none = all), a metric is at least ``min``: ``accuracy`` (share of tasks the version gets right),
  ``recall`` (share of the human labels, of ``label`` if given, it finds) or ``precision`` (share of what
  it predicts, as ``label`` if given, that is right).
* ``invariance`` — the prediction stays the same under a perturbation (``flip_lr``, ``flip_ud``,
  ``rotate90``, ``brightness``, ``contrast``, ``blur``, ``noise``, ``shift``; ``strength`` tunes it) on up to
  ``sample`` tuning tasks: the share that changes is at most ``max_change``. Boxes and outlines are moved
  with the image (a box on the left must come back on the right after ``flip_lr``).
* ``examples`` — the listed tasks (labeled or not) are predicted as ``label`` (boxes and polygons: show at
  least one ``label`` region) in at least ``min_pass`` of them ("images like these must be predicted as L").

Boxes and polygons are judged region by region: a predicted region is right when it overlaps a human one
of the same label at IoU >= 0.5 (polygons by their bounding boxes), each human region found at most once;
a task is right when every human region is found, with its label, and nothing else is predicted.

A test whose cohort has no tuning task passes with a note (a young project's split may hold none): the
gate cannot judge it, and keeping every version out would stop the loop.

Everything here is bounded: a suite comes from outside (HTTP, a file), so sizes, names and numbers are
checked before a test runs.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from labelloop.core.kinds import TaskKind
from labelloop.core.scoring import box_iou
from labelloop.core.truth import TruthRegion
from labelloop.errors import LabelloopError

KINDS = ("confidence", "invariance", "examples")
METRICS = ("accuracy", "precision", "recall")
PERTURBATIONS = ("flip_lr", "flip_ud", "rotate90", "brightness", "contrast", "blur", "noise", "shift")
# what strength means per perturbation, and its default: a factor, pixels of blur, grey levels of noise,
# a fraction of the side
DEFAULT_STRENGTH = {"brightness": 1.3, "contrast": 1.3, "blur": 1.0, "noise": 8.0, "shift": 0.1}
STRENGTH_RANGE = {"brightness": (0.1, 10.0), "contrast": (0.1, 10.0), "blur": (0.1, 20.0), "noise": (0.1, 128.0),
                  "shift": (0.01, 0.5)}
KIND_KEYS = {"confidence": {"metric", "label", "min"}, "invariance": {"perturbation", "strength", "max_change", "sample"},
             "examples": {"tasks", "label", "min_pass"}}
MAX_TESTS = 50
MAX_NAME = 100
MAX_TASKS = 1000  # tasks an examples test lists
MAX_SAMPLE = 1000  # tuning tasks an invariance test perturbs
MAX_COHORT_KEYS = 8
MAX_VALUE = 200  # characters of a cohort value
SHOWN_FAILING = 50  # failing task ids kept per test in results
NAME_RE = re.compile(r"^[\w .:/()+-]{1,100}$")
COHORT_KEY_RE = re.compile(r"^(label|(data|meta)\.[A-Za-z0-9_\-]{1,64})$")
SUITE_FILE = "model-tests.json"
MAX_COSTS = 1000  # class and confusion entries
MAX_COST = 1e6
MAX_REPEAT = 4  # up-weighting: a costly class's training images are seen at most this many times as often
MATCH_IOU = 0.5  # a predicted region is the human one when their boxes overlap this much

Regions = tuple[TruthRegion, ...]
Answer = str | None | Regions  # what a version says about one image: a label (None: none), or its regions


class ModelTestError(LabelloopError, ValueError):
    """A model test suite that cannot be used; the message names the test and what to change."""

    kind, http_status = "model_tests", 422


@dataclass(frozen=True)
class ModelTest:
    name: str
    kind: str  # one of KINDS
    required: bool = True
    cohort: dict[str, str] = field(default_factory=dict)  # confidence, invariance: which tuning tasks
    metric: str = "accuracy"  # confidence
    label: str | None = None  # confidence precision / recall: of this label (None: all); examples: expected
    min: float = 0.0  # confidence: the bar
    perturbation: str | None = None  # invariance
    strength: float | None = None  # invariance: None = DEFAULT_STRENGTH
    max_change: float = 0.1  # invariance: allowed share of changed predictions
    sample: int = 50  # invariance: tuning tasks perturbed
    tasks: tuple[int, ...] = ()  # examples
    min_pass: float = 1.0  # examples

    def to_json(self) -> dict[str, Any]:
        """The JSON form ``parse_test`` reads: the keys of this test's kind."""
        keys = {"name", "kind", "required", "cohort"} | KIND_KEYS[self.kind]
        data = {k: v for k, v in asdict(self).items() if k in keys and v not in (None, (), {})}
        if self.tasks:
            data["tasks"] = list(self.tasks)
        return data


@dataclass
class TuningItem:
    """One labeled task of the tuning split: its id, human label (classification) or regions (boxes,
    polygons; ``label`` is then None), image and the task's data and meta."""

    task_id: int
    label: str | None
    image: Path
    data: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    regions: Regions | None = None  # None: a classification task

    def truth(self) -> Answer:
        return self.label if self.regions is None else self.regions

    def has(self, label: str) -> bool:
        return self.label == label if self.regions is None else any(r.label == label for r in self.regions)


# -- parsing -------------------------------------------------------------------------------------------


def _number(test: str, key: str, raw: Any, low: float, high: float) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(float(raw)):
        raise ModelTestError(f"test {test!r}: {key} must be a number, got {raw!r}")
    if not low <= float(raw) <= high:
        raise ModelTestError(f"test {test!r}: {key} must be in [{low:g}, {high:g}], got {raw!r}")
    return float(raw)


def _label(test: str, raw: Any, labels: Sequence[str] | None) -> str:
    if not isinstance(raw, str) or not raw:
        raise ModelTestError(f"test {test!r}: label must be one of the project's labels, got {raw!r}")
    if labels is not None and raw not in labels:
        raise ModelTestError(f"test {test!r}: label {raw!r} is not one of the project's labels {list(labels)[:20]}")
    return raw


def parse_test(raw: Any, labels: Sequence[str] | None = None) -> ModelTest:
    """One test from its JSON form; ``labels`` (the project's, when known) are checked too."""
    if not isinstance(raw, dict):
        raise ModelTestError(f"a test must be an object, got {type(raw).__name__}")
    name = raw.get("name")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ModelTestError(f"a test needs a name of 1-{MAX_NAME} letters, digits, spaces or . : / ( ) + -, "
                             f"got {name!r}")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise ModelTestError(f"test {name!r}: kind must be one of {list(KINDS)}, got {kind!r}")
    allowed = {"name", "kind", "required", "cohort"} | KIND_KEYS[kind]
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ModelTestError(f"test {name!r}: unknown key(s) {unknown} for a {kind} test; allowed: {sorted(allowed)}")
    required = raw.get("required", True)
    if not isinstance(required, bool):
        raise ModelTestError(f"test {name!r}: required must be true or false")
    cohort = raw.get("cohort") or {}
    if not isinstance(cohort, dict) or len(cohort) > MAX_COHORT_KEYS:
        raise ModelTestError(f"test {name!r}: cohort must be an object of at most {MAX_COHORT_KEYS} keys")
    for key, value in cohort.items():
        if not isinstance(key, str) or not COHORT_KEY_RE.fullmatch(key):
            raise ModelTestError(f"test {name!r}: cohort key {key!r} must be 'label', 'data.<key>' or 'meta.<key>'")
        if not isinstance(value, (str, int, float, bool)) or len(str(value)) > MAX_VALUE:
            raise ModelTestError(f"test {name!r}: cohort value of {key!r} must be a short string or number")
        if key == "label":
            _label(name, value, labels)
    cohort = {k: str(v) for k, v in cohort.items()}
    if kind == "confidence":
        metric = raw.get("metric", "accuracy")
        if metric not in METRICS:
            raise ModelTestError(f"test {name!r}: metric must be one of {list(METRICS)}, got {metric!r}")
        label = _label(name, raw["label"], labels) if metric != "accuracy" and raw.get("label") is not None else None
        if "min" not in raw:
            raise ModelTestError(f"test {name!r}: a confidence test needs min (the bar, 0..1)")
        return ModelTest(name, kind, required, cohort, metric=metric, label=label,
                         min=_number(name, "min", raw["min"], 0.0, 1.0))
    if kind == "invariance":
        perturbation = raw.get("perturbation")
        if perturbation not in PERTURBATIONS:
            raise ModelTestError(f"test {name!r}: perturbation must be one of {list(PERTURBATIONS)}, got {perturbation!r}")
        strength = None
        if raw.get("strength") is not None:
            if perturbation not in STRENGTH_RANGE:
                raise ModelTestError(f"test {name!r}: {perturbation} takes no strength")
            strength = _number(name, "strength", raw["strength"], *STRENGTH_RANGE[perturbation])
        return ModelTest(name, kind, required, cohort, perturbation=perturbation, strength=strength,
                         max_change=_number(name, "max_change", raw.get("max_change", 0.1), 0.0, 1.0),
                         sample=int(_number(name, "sample", raw.get("sample", 50), 1, MAX_SAMPLE)))
    tasks = raw.get("tasks")
    if (not isinstance(tasks, list) or not tasks or len(tasks) > MAX_TASKS
            or not all(isinstance(t, int) and not isinstance(t, bool) and 0 < t < 2**63 for t in tasks)):
        raise ModelTestError(f"test {name!r}: tasks must be a list of 1-{MAX_TASKS} Label Studio task ids")
    if cohort:
        raise ModelTestError(f"test {name!r}: an examples test lists its tasks; it takes no cohort")
    return ModelTest(name, kind, required, label=_label(name, raw.get("label"), labels),
                     tasks=tuple(dict.fromkeys(tasks)), min_pass=_number(name, "min_pass", raw.get("min_pass", 1.0), 0.0, 1.0))


@dataclass(frozen=True)
class Costs:
    """What an error costs the product (value-aligned metrics): a wrong prediction for a task whose human label
    is T and the model says P costs ``confusions[(T, P)]``, else ``classes[T]``, else ``default``; a right one
    costs 0. Boxes and polygons add up per region: a human region found with label P costs as the confusion
    (T, P), one not found as ``classes[T]`` (else ``default``), a predicted region matching nothing
    ``false_positive`` (else ``default``). Set, the gate compares versions by their mean cost per tuning task
    instead of the plain metric, and training sees the images of costly classes more often (``upweight``,
    ``training_repeats``; measured in ``bench/cost_weighted.py``: a rare class priced 10x, mean cost per test
    image 1.42 -> 0.74 at 160 labels, 2.17 -> 1.81 at 80; ``"upweight": false`` turns it off)."""

    default: float = 1.0
    classes: dict[str, float] = field(default_factory=dict)
    confusions: dict[tuple[str, str], float] = field(default_factory=dict)
    false_positive: float | None = None
    upweight: bool = True

    def of(self, truth: str | None, predicted: str | None) -> float:
        if predicted == truth:
            return 0.0
        if truth is None:  # a region that matches nothing a human drew
            return self.default if self.false_positive is None else self.false_positive
        return self.confusions.get((truth, str(predicted)), self.classes.get(truth, self.default))

    def of_answer(self, item: TuningItem, answer: Answer) -> float:
        """What a version's answer for one tuning task costs (0 when right)."""
        if item.regions is None:
            return self.of(item.label, answer if isinstance(answer, str) or answer is None else None)
        found = match_regions(item.regions, _regions(answer))
        return (sum(self.of(item.regions[t].label, _regions(answer)[p].label) for t, p in found.pairs)
                + sum(self.of(item.regions[t].label, None) for t in found.missed)
                + sum(self.of(None, "?") for _ in found.extra))

    def values(self) -> list[float]:
        extra = [] if self.false_positive is None else [self.false_positive]
        return [self.default, *self.classes.values(), *self.confusions.values(), *extra]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"default": self.default, "classes": dict(self.classes),
                               "confusions": {f"{t}->{p}": c for (t, p), c in self.confusions.items()}}
        if self.false_positive is not None:
            out["false_positive"] = self.false_positive
        if not self.upweight:
            out["upweight"] = False
        return out


def training_repeats(costs: Costs, labels: Sequence[str]) -> dict[str, int]:
    """How many times a training image of each label is shown (``costs.upweight``, on unless turned off): a
    label's miss cost (its class cost, or its costliest confusion) over the cheapest label's, rounded,
    1..MAX_REPEAT; {} when every label costs the same (or up-weighting is off). Boxes and polygons: an image
    takes its costliest region's. The optimizer steps stay the same (epochs follow the files seen)."""
    if not costs.upweight:
        return {}
    miss = {label: max([costs.classes.get(label, costs.default),
                        *(c for (t, _), c in costs.confusions.items() if t == label)]) for label in labels}
    cheapest = min((c for c in miss.values() if c > 0), default=0.0)
    if not cheapest:
        return {}
    repeats = {label: int(min(MAX_REPEAT, max(1, round(c / cheapest)))) for label, c in miss.items()}
    return {label: r for label, r in repeats.items() if r > 1}


def parse_costs(raw: Any, labels: Sequence[str] | None = None) -> Costs | None:
    """``{"default": 1, "classes": {"star": 5}, "confusions": {"star->circle": 20}, "false_positive": 2}``
    (None: no costs; ``false_positive`` only counts for boxes and polygons)."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) - {"default", "classes", "confusions", "false_positive", "upweight"}:
        raise ModelTestError('costs are {"default": <cost>, "classes": {label: cost}, "confusions": '
                             '{"<true label>-><predicted label>": cost}, "false_positive": <cost>, '
                             '"upweight": true|false}')
    if not isinstance(raw.get("upweight", True), bool):
        raise ModelTestError("costs: upweight must be true or false")
    false_positive = (None if raw.get("false_positive") is None else
                      _number("costs", "false_positive", raw["false_positive"], 0.0, MAX_COST))
    default = _number("costs", "default", raw.get("default", 1.0), 0.0, MAX_COST)
    classes_raw, confusions_raw = raw.get("classes") or {}, raw.get("confusions") or {}
    if not isinstance(classes_raw, dict) or not isinstance(confusions_raw, dict) or \
            len(classes_raw) + len(confusions_raw) > MAX_COSTS:
        raise ModelTestError(f"costs: classes and confusions are objects of at most {MAX_COSTS} entries in all")
    classes = {_label("costs", k, labels): _number("costs", f"classes[{k!r}]", v, 0.0, MAX_COST)
               for k, v in classes_raw.items()}
    confusions: dict[tuple[str, str], float] = {}
    for key, value in confusions_raw.items():
        truth, arrow, predicted = str(key).partition("->")
        if not arrow:
            raise ModelTestError(f"costs: confusion {key!r} must read '<true label>-><predicted label>'")
        pair = (_label("costs", truth.strip(), labels), _label("costs", predicted.strip(), labels))
        confusions[pair] = _number("costs", f"confusions[{key!r}]", value, 0.0, MAX_COST)
    return Costs(default, classes, confusions, false_positive, bool(raw.get("upweight", True)))


def compare_costs(tuning: Sequence[TuningItem], new: Sequence[Answer], old: Sequence[Answer] | None,
                  costs: Costs) -> dict[str, Any]:
    """Mean cost per tuning task of the new version (and of the one in service on the same tasks), and the
    noise of their difference: one standard error of the paired per-task differences (at least one task's
    smallest non-zero cost / n, so a single differing task is never "significant" on its own)."""
    mine = np.array([costs.of_answer(i, p) for i, p in zip(tuning, new)], dtype=np.float64)
    out: dict[str, Any] = {"cost": round(float(mine.mean()), 6) if len(mine) else 0.0, "tuning_tasks": len(mine),
                           "costs": costs.to_json()}
    if old is not None and len(mine):
        theirs = np.array([costs.of_answer(i, p) for i, p in zip(tuning, old)], dtype=np.float64)
        diff = mine - theirs
        positive = [c for c in costs.values() if c > 0]
        floor = (min(positive) if positive else 0.0) / len(diff)
        se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else 0.0
        out.update(serving_cost=round(float(theirs.mean()), 6), tolerance=round(max(se, floor), 6))
    return out


def parse_suite(raw: Any, labels: Sequence[str] | None = None) -> list[ModelTest]:
    """A suite from its JSON form (``{"tests": [...]}`` or a bare list): at most MAX_TESTS, unique names."""
    items = raw.get("tests") if isinstance(raw, dict) else raw
    if not isinstance(items, list):
        raise ModelTestError('a model test suite is {"tests": [...]} (a list of tests)')
    if len(items) > MAX_TESTS:
        raise ModelTestError(f"a suite holds at most {MAX_TESTS} tests, got {len(items)}")
    tests = [parse_test(item, labels) for item in items]
    names = [t.name for t in tests]
    if len(set(names)) != len(names):
        raise ModelTestError(f"test names must be unique: {sorted({n for n in names if names.count(n) > 1})}")
    return tests


def suite_json(tests: Sequence[ModelTest]) -> dict[str, Any]:
    return {"tests": [t.to_json() for t in tests]}


def check_kind(kind: TaskKind, tests: Sequence[Any]) -> None:
    """Tests (and costs) gate the versions labelloop trains; a served-only kind (keypoints) has none to gate."""
    if tests and not kind.trained:
        raise ModelTestError(f"model tests and costs gate the versions labelloop trains; {kind.name} is served from "
                             "your own model, not trained, so there is no version to gate")


def _read(project_dir: Path) -> Any:
    path = Path(project_dir) / SUITE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelTestError(f"{path} is not readable JSON: {exc}") from None


def load_suite(project_dir: Path, labels: Sequence[str] | None = None) -> list[ModelTest]:
    """The project's stored tests ([] when it has none)."""
    raw = _read(project_dir)
    return [] if raw is None else parse_suite(raw, labels)


def load_costs(project_dir: Path, labels: Sequence[str] | None = None) -> Costs | None:
    """The project's stored costs (None when it has none)."""
    raw = _read(project_dir)
    return parse_costs(raw.get("costs"), labels) if isinstance(raw, dict) else None


def save_suite(project_dir: Path, tests: Sequence[ModelTest], costs: Costs | None = None) -> Path:
    """Write the tests (and costs) atomically (a half-written suite never gates a version)."""
    path = Path(project_dir) / SUITE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    data = suite_json(tests)
    if costs is not None:
        data["costs"] = costs.to_json()
    tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    tmp.replace(path)
    return path


# -- perturbations -------------------------------------------------------------------------------------


def perturb(image: np.ndarray, perturbation: str, strength: float | None = None) -> np.ndarray:
    """``image`` (H x W x 3, uint8) under a perturbation that should not change what it shows."""
    s = float(DEFAULT_STRENGTH.get(perturbation, 0.0) if strength is None else strength)
    array = np.asarray(image)
    if perturbation == "flip_lr":
        return np.ascontiguousarray(array[:, ::-1])
    if perturbation == "flip_ud":
        return np.ascontiguousarray(array[::-1])
    if perturbation == "rotate90":
        return np.ascontiguousarray(np.rot90(array))
    values = array.astype(np.float32)
    if perturbation == "brightness":
        out = values * float(s)
    elif perturbation == "contrast":
        mean = values.mean(axis=(0, 1), keepdims=True)
        out = (values - mean) * float(s) + mean
    elif perturbation == "noise":
        out = values + np.random.default_rng(0).normal(0.0, float(s), values.shape)
    elif perturbation == "blur":
        import cv2

        return np.asarray(cv2.GaussianBlur(array, (0, 0), sigmaX=s))
    elif perturbation == "shift":
        import cv2

        dx, dy = round(float(s) * array.shape[1]), round(float(s) * array.shape[0])
        matrix = np.array([[1, 0, dx], [0, 1, dy]], dtype=np.float32)
        return np.asarray(cv2.warpAffine(array, matrix, (array.shape[1], array.shape[0]),
                                         borderMode=cv2.BORDER_REPLICATE))
    else:
        raise ModelTestError(f"unknown perturbation {perturbation!r}")
    return np.clip(out, 0, 255).astype(np.uint8)


# -- regions: matching and moving with the image -------------------------------------------------------


@dataclass(frozen=True)
class RegionMatch:
    """Human regions against predicted ones: ``pairs`` (human index, predicted index) overlap at MATCH_IOU
    (same label first, then the larger overlap; each region in one pair at most), ``missed`` human regions
    no prediction overlaps, ``extra`` predictions that overlap nothing."""

    pairs: tuple[tuple[int, int], ...]
    missed: tuple[int, ...]
    extra: tuple[int, ...]


def _iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    return box_iou((a[0], a[1], a[2] - a[0], a[3] - a[1]), (b[0], b[1], b[2] - b[0], b[3] - b[1]))


def match_regions(truth: Regions, predicted: Regions, iou: float = MATCH_IOU) -> RegionMatch:
    candidates = sorted((truth[t].label != predicted[p].label, -overlap, t, p)
                        for t in range(len(truth)) for p in range(len(predicted))
                        if (overlap := _iou(truth[t].box, predicted[p].box)) >= iou)
    pairs, used_t, used_p = [], set(), set()
    for _, _, t, p in candidates:
        if t not in used_t and p not in used_p:
            pairs.append((t, p))
            used_t.add(t)
            used_p.add(p)
    return RegionMatch(tuple(sorted(pairs)), tuple(t for t in range(len(truth)) if t not in used_t),
                       tuple(p for p in range(len(predicted)) if p not in used_p))


def _regions(answer: Answer) -> Regions:
    return answer if isinstance(answer, tuple) else ()


def answer_of(prediction: Any, whole_image: bool) -> Answer:
    """An engine ``ImagePrediction`` as an answer: its shown label, or its shown regions in image fractions."""
    if whole_image:
        return prediction.regions[0].label if prediction.regions else None
    w, h = max(1, prediction.width), max(1, prediction.height)
    return tuple(TruthRegion(r.label, _clip((r.bbox[0] / w, r.bbox[1] / h, (r.bbox[0] + r.bbox[2]) / w,
                                             (r.bbox[1] + r.bbox[3]) / h)),
                             tuple((x / w, y / h) for x, y in r.polygon or ()))
                 for r in prediction.regions if r.bbox is not None)


def is_right(item: TuningItem, answer: Answer) -> bool:
    """The version's answer is the human one: the label, or every region found with its label and no other."""
    if item.regions is None:
        return answer == item.label
    return same_answer(item.regions, answer)


def same_answer(a: Answer, b: Answer) -> bool:
    """Two answers say the same: equal labels, or regions that pair up one to one with equal labels."""
    if not isinstance(a, tuple) and not isinstance(b, tuple):
        return a == b
    ra, rb = _regions(a), _regions(b)
    found = match_regions(ra, rb)
    return not found.missed and not found.extra and all(ra[t].label == rb[p].label for t, p in found.pairs)


def _clip(box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = (min(1.0, max(0.0, v)) for v in box)
    return x1, y1, x2, y2


def _area(box: tuple[float, float, float, float]) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def _shift_fractions(strength: float | None, shape: tuple[int, int]) -> tuple[float, float]:
    """How far ``perturb``'s shift moves an image of ``shape`` (height, width), as fractions of its sides."""
    s = float(DEFAULT_STRENGTH["shift"] if strength is None else strength)
    return round(s * shape[1]) / shape[1], round(s * shape[0]) / shape[0]


def move_regions(regions: Regions, perturbation: str, strength: float | None, shape: tuple[int, int]) -> Regions:
    """Where ``regions`` (fractions of an image of ``shape`` = height, width) are after ``perturb``: flips mirror
    them, ``rotate90`` turns them with the image, ``shift`` moves them (a region that leaves the image by more
    than half is dropped); the photometric perturbations leave them in place."""
    def point(x: float, y: float) -> tuple[float, float]:
        if perturbation == "flip_lr":
            return 1.0 - x, y
        if perturbation == "flip_ud":
            return x, 1.0 - y
        if perturbation == "rotate90":  # np.rot90: counter-clockwise, the top-right corner goes to the top-left
            return y, 1.0 - x
        if perturbation == "shift":
            return x + dx, y + dy
        return x, y

    dx, dy = _shift_fractions(strength, shape) if perturbation == "shift" else (0.0, 0.0)
    moved = []
    for region in regions:
        corners = [point(x, y) for x, y in ((region.box[0], region.box[1]), (region.box[2], region.box[3]))]
        box = (min(c[0] for c in corners), min(c[1] for c in corners), max(c[0] for c in corners),
               max(c[1] for c in corners))
        clipped = _clip(box)
        if _area(box) > 0 and _area(clipped) < 0.5 * _area(box):
            continue
        polygon = tuple(tuple(min(1.0, max(0.0, v)) for v in point(x, y)) for x, y in region.polygon)
        moved.append(TruthRegion(region.label, clipped, polygon))  # type: ignore[arg-type]
    return tuple(moved)


def _beside_shift_band(regions: Regions, perturbation: str, strength: float | None, shape: tuple[int, int]) -> Regions:
    """A shift fills the strip it opens by repeating the edge: regions wholly inside that strip are not judged."""
    if perturbation != "shift":
        return regions
    fx, fy = _shift_fractions(strength, shape)
    return tuple(r for r in regions if r.box[2] > fx and r.box[3] > fy)


# -- running -------------------------------------------------------------------------------------------

Predict = Callable[[list[Any]], list[Answer]]  # images (paths or BGR arrays) -> what the version says of each


def in_cohort(item: TuningItem, cohort: dict[str, str]) -> bool:
    for key, value in cohort.items():
        if key == "label":
            if not item.has(value):
                return False
            continue
        source, _, name = key.partition(".")
        found = (item.data if source == "data" else item.meta).get(name)
        if found is None or str(found) != value:
            return False
    return True


def _result(test: ModelTest, passed: bool, value: float | None, bar: str, samples: int,
            failing: Sequence[int] = (), note: str = "") -> dict[str, Any]:
    return {"name": test.name, "kind": test.kind, "required": test.required, "passed": bool(passed),
            "value": None if value is None else round(float(value), 4), "bar": bar, "samples": int(samples),
            "failing": [int(t) for t in failing[:SHOWN_FAILING]], "failing_count": len(failing), "note": note}


def _counts(item: TuningItem, answer: Answer, metric: str, label: str | None) -> tuple[int, int]:
    """(right, out of) for recall (human labels found) or precision (predictions right), of ``label`` or all."""
    if item.regions is None:
        if metric == "recall":  # the human label, when it is the one counted
            judged = label is None or item.label == label
            return int(judged and answer == item.label), int(judged)
        judged = isinstance(answer, str) and (label is None or answer == label)
        return int(judged and answer == item.label), int(judged)
    regions = _regions(answer)
    found = match_regions(item.regions, regions)
    right_t = {t for t, p in found.pairs if item.regions[t].label == regions[p].label}
    right_p = {p for t, p in found.pairs if item.regions[t].label == regions[p].label}
    if metric == "recall":
        counted = [t for t, r in enumerate(item.regions) if label is None or r.label == label]
        return sum(1 for t in counted if t in right_t), len(counted)
    counted = [p for p, r in enumerate(regions) if label is None or r.label == label]
    return sum(1 for p in counted if p in right_p), len(counted)


def _confidence(test: ModelTest, cohort: Sequence[TuningItem], answers: Sequence[Answer]) -> dict[str, Any]:
    if test.metric == "accuracy":
        failing = [i.task_id for i, a in zip(cohort, answers) if not is_right(i, a)]
        value = 1.0 - len(failing) / len(cohort)
        return _result(test, value >= test.min - 1e-12, value, _bar(test), len(cohort), failing)
    right = total = 0
    failing = []
    for item, answer in zip(cohort, answers):
        r, n = _counts(item, answer, test.metric, test.label)
        right, total = right + r, total + n
        if r < n:
            failing.append(item.task_id)
    if not total:
        what = "human" if test.metric == "recall" else "predicted"
        return _result(test, True, None, _bar(test), 0,
                       note=f"nothing {what} as {test.label or 'any label'!r} in the cohort: not judged")
    value = right / total
    return _result(test, value >= test.min - 1e-12, value, _bar(test), total, failing)


def run_suite(tests: Sequence[ModelTest], tuning: Sequence[TuningItem], predict: Predict,
              examples: dict[int, Path] | None = None) -> list[dict[str, Any]]:
    """Each test's result on ``tuning`` with ``predict`` (the version under test): passed, the value and
    its bar, the samples it saw (tasks; for recall and precision, labels or predictions) and the failing task
    ids. ``examples``: the images of the tasks examples tests list (a task missing there fails, named)."""
    import cv2

    results = []
    cache: dict[int, Answer] = {}

    def predicted(items: Sequence[TuningItem]) -> list[Answer]:
        todo = [i for i in items if i.task_id not in cache]
        for item, answer in zip(todo, predict([i.image for i in todo]) if todo else []):
            cache[item.task_id] = answer
        return [cache[i.task_id] for i in items]

    for test in tests:
        if test.kind == "examples":
            known = examples or {}
            present = [t for t in test.tasks if t in known]
            shown = dict(zip(present, predict([known[t] for t in present]) if present else []))
            failing = [t for t in test.tasks if not _shows(shown.get(t), test.label or "")]
            rate = 1.0 - len(failing) / len(test.tasks)
            note = f"{len(test.tasks) - len(present)} listed task(s) have no image" if len(present) < len(test.tasks) else ""
            results.append(_result(test, rate >= test.min_pass - 1e-12, rate,
                                   f"predicted as {test.label!r} >= {test.min_pass:g}", len(test.tasks), failing, note))
            continue
        cohort = [item for item in tuning if in_cohort(item, test.cohort)]
        if test.kind == "invariance":
            cohort = sorted(cohort, key=lambda i: i.task_id)[: test.sample]
        if not cohort:
            results.append(_result(test, True, None, _bar(test), 0, note="no tuning task in the cohort: not judged"))
            continue
        answers = predicted(cohort)
        if test.kind == "confidence":
            results.append(_confidence(test, cohort, answers))
            continue
        perturbed, shapes = [], []
        for item in cohort:
            array = cv2.imread(str(item.image), cv2.IMREAD_COLOR)
            if array is None:
                raise ModelTestError(f"cannot decode the image of task {item.task_id}")
            perturbed.append(perturb(array, test.perturbation or "", test.strength))
            shapes.append(array.shape[:2])
        changed = []
        for item, before, after, shape in zip(cohort, answers, predict(perturbed), shapes):
            if isinstance(before, tuple):  # regions move with the image before they are compared
                how = (test.perturbation or "", test.strength, shape)
                before = _beside_shift_band(move_regions(before, *how), *how)
                after = _beside_shift_band(_regions(after), *how)
            if not same_answer(before, after):
                changed.append(item.task_id)
        rate = len(changed) / len(cohort)
        results.append(_result(test, rate <= test.max_change + 1e-12, rate, _bar(test), len(cohort), changed))
    return results


def _shows(answer: Answer, label: str) -> bool:
    return any(r.label == label for r in answer) if isinstance(answer, tuple) else answer == label


def describe_bar(test: ModelTest) -> str:
    """What a test asks, in words ("accuracy >= 0.8", "changed by flip_lr <= 0.1")."""
    return _bar(test)


def _bar(test: ModelTest) -> str:
    if test.kind == "confidence":
        what = test.metric if test.metric == "accuracy" or not test.label else f"{test.metric} of {test.label!r}"
        return f"{what} >= {test.min:g}"
    if test.kind == "invariance":
        return f"changed by {test.perturbation} <= {test.max_change:g}"
    return f"predicted as {test.label!r} >= {test.min_pass:g}"


def failed_required(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in results if r["required"] and not r["passed"]]


def describe_failures(results: Sequence[dict[str, Any]]) -> str:
    """'name' value vs bar (tasks a, b, …) for each failed required test, for a job's reason."""
    parts = []
    for r in failed_required(results):
        shown = ", ".join(str(t) for t in r["failing"][:10]) + (", …" if r["failing_count"] > 10 else "")
        value = "n/a" if r["value"] is None else f"{r['value']:.3f}"
        parts.append(f"'{r['name']}' {value}, needs {r['bar']} (tasks {shown})")
    return "; ".join(parts)
