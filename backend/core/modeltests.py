"""Model tests: what a version must get right before it may serve — a project's promotion gates.

A project writes its tests down once (``model-tests.json`` beside its versions, or ``PUT
/projects/<id>/model-tests``, or ``labelloop model-tests --set``); every new version runs them on the
tuning split (the project's held-out labeled tasks) before promotion, and a failing *required* test keeps
it out of service with the failing tasks named. Three kinds, after the error-analysis seed's
"confidence tests", "invariance tests" and "data unit tests":

* ``confidence`` — on a cohort of tuning tasks (``{"label": "star"}``, ``{"data.camera": "7"}``,
  ``{"meta.source": "night"}``; every key must match; none = all), ``accuracy`` (share predicted as the
  human label) or ``precision`` of a ``label`` (share of the cohort predicted as it that truly is it) is
  at least ``min``.
* ``invariance`` — the predicted label stays the same under a perturbation (``flip_lr``, ``flip_ud``,
  ``rotate90``, ``brightness``, ``contrast``, ``blur``, ``noise``, ``shift``; ``strength`` tunes it) on up to
  ``sample`` tuning tasks: the share that changes is at most ``max_change``.
* ``examples`` — the listed tasks (labeled or not) are predicted as ``label`` in at least ``min_pass`` of
  them ("images like these must be predicted as L").

A test whose cohort has no tuning task passes with a note (a young project's split may hold none): the
gate cannot judge it, and keeping every version out would stop the loop. Classification versions are
gated; for boxes and polygons a suite is refused with the reason (not yet).

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

from labelloop.errors import LabelloopError

KINDS = ("confidence", "invariance", "examples")
METRICS = ("accuracy", "precision")
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
    label: str | None = None  # confidence precision; examples: the expected label
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
    """One labeled task of the tuning split: its id, human label, image and the task's data and meta."""

    task_id: int
    label: str
    image: Path
    data: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


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
        label = _label(name, raw.get("label"), labels) if metric == "precision" else None
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
    costs 0. Set, the gate compares versions by their mean cost per tuning task instead of the plain metric."""

    default: float = 1.0
    classes: dict[str, float] = field(default_factory=dict)
    confusions: dict[tuple[str, str], float] = field(default_factory=dict)

    def of(self, truth: str, predicted: str | None) -> float:
        if predicted == truth:
            return 0.0
        return self.confusions.get((truth, str(predicted)), self.classes.get(truth, self.default))

    def to_json(self) -> dict[str, Any]:
        return {"default": self.default, "classes": dict(self.classes),
                "confusions": {f"{t}->{p}": c for (t, p), c in self.confusions.items()}}


def parse_costs(raw: Any, labels: Sequence[str] | None = None) -> Costs | None:
    """``{"default": 1, "classes": {"star": 5}, "confusions": {"star->circle": 20}}`` (None: no costs)."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) - {"default", "classes", "confusions"}:
        raise ModelTestError('costs are {"default": <cost>, "classes": {label: cost}, "confusions": '
                             '{"<true label>-><predicted label>": cost}}')
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
    return Costs(default, classes, confusions)


def compare_costs(tuning: Sequence[TuningItem], new: Sequence[str | None], old: Sequence[str | None] | None,
                  costs: Costs) -> dict[str, Any]:
    """Mean cost per tuning task of the new version (and of the one in service on the same tasks), and the
    noise of their difference: one standard error of the paired per-task differences (at least one task's
    smallest non-zero cost / n, so a single differing task is never "significant" on its own)."""
    mine = np.array([costs.of(i.label, p) for i, p in zip(tuning, new)], dtype=np.float64)
    out: dict[str, Any] = {"cost": round(float(mine.mean()), 6) if len(mine) else 0.0, "tuning_tasks": len(mine),
                           "costs": costs.to_json()}
    if old is not None and len(mine):
        theirs = np.array([costs.of(i.label, p) for i, p in zip(tuning, old)], dtype=np.float64)
        diff = mine - theirs
        positive = [c for c in [costs.default, *costs.classes.values(), *costs.confusions.values()] if c > 0]
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


def check_kind(whole_image: bool, tests: Sequence[Any]) -> None:
    """Only classification versions are gated by tests (and costs) for now."""
    if tests and not whole_image:
        raise ModelTestError("model tests and costs gate classification versions only, for now (boxes and polygons: "
                             "not yet)")


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


# -- running -------------------------------------------------------------------------------------------

Predict = Callable[[list[Any]], list[str | None]]  # images (paths or BGR arrays) -> predicted labels


def in_cohort(item: TuningItem, cohort: dict[str, str]) -> bool:
    for key, value in cohort.items():
        if key == "label":
            found: Any = item.label
        else:
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


def run_suite(tests: Sequence[ModelTest], tuning: Sequence[TuningItem], predict: Predict,
              examples: dict[int, Path] | None = None) -> list[dict[str, Any]]:
    """Each test's result on ``tuning`` with ``predict`` (the version under test): passed, the value and
    its bar, the samples it saw and the failing task ids. ``examples``: the images of the tasks examples
    tests list (a task missing there fails, named)."""
    import cv2

    results = []
    cache: dict[int, str | None] = {}

    def predicted(items: Sequence[TuningItem]) -> list[str | None]:
        todo = [i for i in items if i.task_id not in cache]
        for item, label in zip(todo, predict([i.image for i in todo]) if todo else []):
            cache[item.task_id] = label
        return [cache[i.task_id] for i in items]

    for test in tests:
        if test.kind == "examples":
            known = examples or {}
            present = [t for t in test.tasks if t in known]
            labels = dict(zip(present, predict([known[t] for t in present]) if present else []))
            failing = [t for t in test.tasks if labels.get(t) != test.label]
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
        preds = predicted(cohort)
        if test.kind == "confidence":
            if test.metric == "accuracy":
                failing = [i.task_id for i, p in zip(cohort, preds) if p != i.label]
                value = 1.0 - len(failing) / len(cohort)
                samples = len(cohort)
            else:  # precision of test.label among the cohort's predictions of it
                chosen = [(i, p) for i, p in zip(cohort, preds) if p == test.label]
                failing = [i.task_id for i, _ in chosen if i.label != test.label]
                samples = len(chosen)
                if not chosen:
                    results.append(_result(test, True, None, _bar(test), 0,
                                           note=f"nothing in the cohort predicted as {test.label!r}: not judged"))
                    continue
                value = 1.0 - len(failing) / len(chosen)
            results.append(_result(test, value >= test.min - 1e-12, value, _bar(test), samples, failing))
            continue
        perturbed: list[Any] = []
        for item in cohort:
            array = cv2.imread(str(item.image), cv2.IMREAD_COLOR)
            if array is None:
                raise ModelTestError(f"cannot decode the image of task {item.task_id}")
            perturbed.append(perturb(array, test.perturbation or "", test.strength))
        changed = [i.task_id for i, before, after in zip(cohort, preds, predict(perturbed)) if before != after]
        rate = len(changed) / len(cohort)
        results.append(_result(test, rate <= test.max_change + 1e-12, rate, _bar(test), len(cohort), changed))
    return results


def describe_bar(test: ModelTest) -> str:
    """What a test asks, in words ("accuracy >= 0.8", "changed by flip_lr <= 0.1")."""
    return _bar(test)


def _bar(test: ModelTest) -> str:
    if test.kind == "confidence":
        what = f"precision of {test.label!r}" if test.metric == "precision" else "accuracy"
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
