"""Model tests as promotion gates (issue 12, item 1): a project's confidence, invariance and example tests run
on the tuning split of every new version; a failing required test keeps the version out with the failing
tasks named.

Unit tests check the suite's validation (it comes from HTTP or a file), the perturbations and each kind's
verdict on known predictions. The gate tests train real versions: a planted regression (a version trained
on labels where every star was called a circle) is kept out by a confidence test on stars while the good
version passes it, and a classifier that reads the shape's side of the image (trained without flips on
data where that side decides the label) fails a flip-invariance test that the engine's version passes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from labelloop.core import modeltests
from labelloop.core.modeltests import (
    ModelTestError,
    TuningItem,
    parse_suite,
    perturb,
    run_suite,
)

LABELS = ("circle", "square", "triangle", "star")


# -- unit: the suite from outside ---------------------------------------------------------------------


@pytest.mark.unit
def test_a_suite_of_each_kind_round_trips():
    raw = {"tests": [
        {"name": "stars", "kind": "confidence", "cohort": {"label": "star"}, "min": 0.6},
        {"name": "night precision", "kind": "confidence", "cohort": {"meta.source": "night"}, "metric": "precision",
         "label": "circle", "min": 0.5, "required": False},
        {"name": "flip", "kind": "invariance", "perturbation": "flip_lr", "max_change": 0.05, "sample": 20},
        {"name": "dim", "kind": "invariance", "perturbation": "brightness", "strength": 0.7},
        {"name": "these are stars", "kind": "examples", "tasks": [3, 4, 3], "label": "star", "min_pass": 0.5},
    ]}
    tests = parse_suite(raw, LABELS)
    assert [t.kind for t in tests] == ["confidence", "confidence", "invariance", "invariance", "examples"]
    assert tests[4].tasks == (3, 4) and tests[3].strength == 0.7 and not tests[1].required
    assert parse_suite(modeltests.suite_json(tests), LABELS) == tests


@pytest.mark.unit
@pytest.mark.parametrize("raw, message", [
    ({"tests": "x"}, r"a list of tests"),
    ([{"name": "a", "kind": "confidence", "min": 0.5}] * 2, r"names must be unique"),
    ([{"name": "a/../b;rm", "kind": "confidence", "min": 0.5}], r"needs a name"),
    ([{"name": "a", "kind": "guess", "min": 0.5}], r"kind must be one of"),
    ([{"name": "a", "kind": "confidence"}], r"needs min"),
    ([{"name": "a", "kind": "confidence", "min": 1.5}], r"min must be in \[0, 1\]"),
    ([{"name": "a", "kind": "confidence", "min": float("nan")}], r"min must be a number"),
    ([{"name": "a", "kind": "confidence", "min": 0.5, "cohort": {"label": "dog"}}], r"'dog' is not one of"),
    ([{"name": "a", "kind": "confidence", "min": 0.5, "cohort": {"data.x; drop": "1"}}], r"cohort key"),
    ([{"name": "a", "kind": "confidence", "min": 0.5, "metric": "recall", "label": "dog"}], r"'dog' is not one of"),
    ([{"name": "a", "kind": "confidence", "min": 0.5, "metric": "f1"}], r"metric must be one of"),
    ([{"name": "a", "kind": "confidence", "min": 0.5, "perturbation": "flip_lr"}], r"unknown key\(s\) \['perturbation'\]"),
    ([{"name": "a", "kind": "invariance", "perturbation": "melt"}], r"perturbation must be one of"),
    ([{"name": "a", "kind": "invariance", "perturbation": "flip_lr", "strength": 2}], r"flip_lr takes no strength"),
    ([{"name": "a", "kind": "invariance", "perturbation": "blur", "strength": 99}], r"strength must be in"),
    ([{"name": "a", "kind": "invariance", "perturbation": "blur", "sample": 10**9}], r"sample must be in"),
    ([{"name": "a", "kind": "examples", "tasks": [], "label": "star"}], r"1-1000 Label Studio task ids"),
    ([{"name": "a", "kind": "examples", "tasks": list(range(1, 1002)), "label": "star"}], r"1-1000"),
    ([{"name": "a", "kind": "examples", "tasks": [True], "label": "star"}], r"task ids"),
    ([{"name": f"t{i}", "kind": "confidence", "min": 0.1} for i in range(51)], r"at most 50 tests"),
])
def test_a_bad_suite_is_refused_with_the_reason(raw, message):
    with pytest.raises(ModelTestError, match=message) as caught:
        parse_suite(raw, LABELS)
    assert caught.value.http_status == 422


@pytest.mark.unit
def test_the_suite_file_is_written_whole_and_read_back(tmp_path):
    tests = parse_suite([{"name": "stars", "kind": "confidence", "cohort": {"label": "star"}, "min": 0.6}], LABELS)
    path = modeltests.save_suite(tmp_path / "p1", tests)
    assert modeltests.load_suite(tmp_path / "p1", LABELS) == tests and not list(path.parent.glob("*.tmp"))
    assert modeltests.load_suite(tmp_path / "none") == []
    path.write_text("{not json")
    with pytest.raises(ModelTestError, match="not readable JSON"):
        modeltests.load_suite(tmp_path / "p1")


@pytest.mark.unit
def test_every_trained_kind_is_gated_and_a_served_only_one_is_refused():
    from labelloop.core.kinds import CLASSIFICATION, DETECTION, KEYPOINTS, SEGMENTATION

    tests = parse_suite([{"name": "a", "kind": "confidence", "min": 0.5}], LABELS)
    for kind in (CLASSIFICATION, DETECTION, SEGMENTATION):
        modeltests.check_kind(kind, tests)
    modeltests.check_kind(KEYPOINTS, [])
    with pytest.raises(ModelTestError, match="keypoints is served from your own model, not trained"):
        modeltests.check_kind(KEYPOINTS, tests)


@pytest.mark.unit
def test_costs_are_read_bounded_and_priced():
    costs = modeltests.parse_costs({"default": 1, "classes": {"star": 5}, "confusions": {"star -> circle": 20}}, LABELS)
    assert (costs.of("star", "star"), costs.of("star", "circle"), costs.of("star", "square"), costs.of("circle", None)) \
        == (0.0, 20.0, 5.0, 1.0)
    assert modeltests.parse_costs(costs.to_json(), LABELS) == costs and modeltests.parse_costs(None) is None
    for raw, message in [({"classes": {"dog": 1}}, "'dog' is not one of"), ({"default": -1}, r"default must be in"),
                         ({"confusions": {"star": 1}}, "must read '<true label>-><predicted label>'"),
                         ({"weights": {}}, "costs are"), ({"classes": {f"c{i}": 1 for i in range(1001)}}, "at most 1000")]:
        with pytest.raises(ModelTestError, match=message):
            modeltests.parse_costs(raw, LABELS if "dog" in str(raw) else None)


@pytest.mark.unit
def test_costs_compare_versions_on_the_same_tasks_with_their_noise(tmp_path):
    tuning = [TuningItem(k, label, tmp_path / f"{k}.png") for k, label in enumerate(["star"] * 10 + ["circle"] * 40)]
    costs = modeltests.parse_costs({"classes": {"star": 10}}, LABELS)
    # the new version misses 5 stars (10 each); the old one misses 8 circles (1 each): plain accuracy says
    # the new one is better (0.90 vs 0.84), what the errors cost says it is worse
    new = ["circle"] * 5 + ["star"] * 5 + ["circle"] * 40
    old = ["star"] * 10 + ["square"] * 8 + ["circle"] * 32
    out = modeltests.compare_costs(tuning, new, old, costs)
    assert (out["cost"], out["serving_cost"]) == (pytest.approx(1.0), pytest.approx(0.16))
    diff = np.array([10.0] * 5 + [0.0] * 5 + [-1.0] * 8 + [0.0] * 32)
    assert out["tolerance"] == pytest.approx(diff.std(ddof=1) / np.sqrt(50), abs=1e-6)
    assert out["cost"] > out["serving_cost"] + out["tolerance"]
    one_miss = modeltests.compare_costs(tuning, ["circle"] + ["star"] * 9 + ["circle"] * 40, ["star"] * 10 + ["circle"] * 40,
                                        costs)
    assert one_miss["cost"] <= one_miss["serving_cost"] + one_miss["tolerance"]  # one task is within the noise
    assert "serving_cost" not in modeltests.compare_costs(tuning, new, None, costs)


# -- unit: perturbations and verdicts -------------------------------------------------------------------


@pytest.mark.unit
def test_perturbations_keep_the_shape_and_change_what_they_say():
    image = np.zeros((8, 10, 3), np.uint8)
    image[1, 2] = 200
    assert perturb(image, "flip_lr")[1, 7, 0] == 200 and perturb(image, "flip_ud")[6, 2, 0] == 200
    assert perturb(image, "rotate90").shape == (10, 8, 3)
    assert perturb(image, "brightness", 1.2)[1, 2, 0] == 240 and perturb(image, "brightness", 2.0)[1, 2, 0] == 255
    for name in ("contrast", "blur", "noise", "shift"):
        out = perturb(image, name)
        assert out.shape == image.shape and out.dtype == np.uint8 and not np.array_equal(out, image), name
    assert perturb(image, "shift", 0.2)[3, 4, 0] == 200  # 2 px right, 2 px down (0.2 of 10 and 8, rounded)


def items(labels: list[str], tmp_path: Path, meta=None) -> list[TuningItem]:
    import cv2

    out = []
    for k, label in enumerate(labels):
        path = tmp_path / f"{k}.png"
        image = np.zeros((16, 16, 3), np.uint8)
        image[:, : 4 + k % 8] = 255  # asymmetric: a flip changes it
        cv2.imwrite(str(path), image)
        out.append(TuningItem(100 + k, label, path, {"camera": str(k % 2)}, (meta or {})))
    return out


@pytest.mark.unit
def test_confidence_tests_judge_their_cohort_and_name_the_failures(tmp_path):
    tuning = items(["star", "star", "star", "circle"], tmp_path)
    answers = {100: "star", 101: "circle", 102: "circle", 103: "circle"}
    predict = lambda images: [answers[int(Path(p).stem) + 100] for p in images]
    tests = parse_suite([
        {"name": "stars", "kind": "confidence", "cohort": {"label": "star"}, "min": 0.5},
        {"name": "camera 1", "kind": "confidence", "cohort": {"data.camera": "1"}, "min": 0.5},
        {"name": "circle precision", "kind": "confidence", "metric": "precision", "label": "circle", "min": 0.5},
        {"name": "empty", "kind": "confidence", "cohort": {"meta.source": "night"}, "min": 0.9},
    ], LABELS)
    stars, camera, precision, empty = run_suite(tests, tuning, predict)
    third = pytest.approx(1 / 3, abs=1e-4)
    assert (stars["passed"], stars["value"], stars["failing"], stars["samples"]) == (False, third, [101, 102], 3)
    assert (camera["passed"], camera["value"], camera["failing"]) == (True, 0.5, [101])  # tasks 101 (wrong), 103
    assert (precision["passed"], precision["value"], precision["failing"]) == (False, pytest.approx(1 / 3, abs=1e-4), [101, 102])
    assert empty["passed"] and empty["samples"] == 0 and "not judged" in empty["note"]
    assert [r["name"] for r in modeltests.failed_required([stars, camera, precision, empty])] == ["stars", "circle precision"]
    assert "'stars' 0.333, needs accuracy >= 0.5 (tasks 101, 102)" in modeltests.describe_failures([stars])


@pytest.mark.unit
def test_invariance_counts_changed_predictions_and_examples_their_label(tmp_path):
    tuning = items(["star"] * 4, tmp_path)

    def by_left_edge(images):  # "star" when the white band is on the left: not flip-invariant
        out = []
        for image in images:
            array = image if isinstance(image, np.ndarray) else __import__("cv2").imread(str(image))
            out.append("star" if array[:, 0].mean() > 127 else "circle")
        return out

    tests = parse_suite([{"name": "flip", "kind": "invariance", "perturbation": "flip_lr", "max_change": 0.5},
                         {"name": "bright", "kind": "invariance", "perturbation": "brightness", "max_change": 0.0},
                         {"name": "known stars", "kind": "examples", "tasks": [100, 101, 999], "label": "star",
                          "min_pass": 0.6}], LABELS)
    flip, bright, examples = run_suite(tests, tuning, by_left_edge, {t.task_id: t.image for t in tuning})
    assert (flip["passed"], flip["value"], flip["failing"]) == (False, 1.0, [100, 101, 102, 103])
    assert bright["passed"] and bright["value"] == 0.0
    assert (examples["passed"], examples["failing"]) == (True, [999]) and "no image" in examples["note"]
    assert examples["value"] == pytest.approx(2 / 3, abs=1e-4)


# -- unit: boxes and polygons ----------------------------------------------------------------------------

COLOUR = {"star": (0, 0, 255), "circle": (0, 255, 0)}  # BGR: a red block is a star, a green one a circle


def box_items(tmp_path: Path, layouts: list[list[tuple[str, tuple[float, float, float, float]]]]) -> list[TuningItem]:
    """Tuning tasks whose images hold coloured blocks at the given boxes (fractions), the blocks as truth."""
    import cv2

    from labelloop.core.truth import TruthRegion

    out = []
    for k, layout in enumerate(layouts):
        image = np.zeros((60, 80, 3), np.uint8)
        for label, (x1, y1, x2, y2) in layout:
            image[round(y1 * 60):round(y2 * 60), round(x1 * 80):round(x2 * 80)] = COLOUR[label]
        path = tmp_path / f"boxes-{k}.png"
        cv2.imwrite(str(path), image)
        regions = tuple(TruthRegion(label, box) for label, box in layout)
        out.append(TuningItem(200 + k, None, path, {"camera": str(k % 2)}, {}, regions))
    return out


def block_detector(skip: str | None = None, by_side: bool = False):
    """Finds the coloured blocks (boxes in fractions); ``skip`` one label (a detector blind to it), or ``by_side``:
    calls a block on the left half a star whatever its colour (not flip-invariant)."""
    import cv2

    from labelloop.core.truth import TruthRegion

    def predict(images):
        answers = []
        for image in images:
            array = image if isinstance(image, np.ndarray) else cv2.imread(str(image))
            h, w = array.shape[:2]
            found = []
            for label, colour in COLOUR.items():
                mask = np.all(np.abs(array.astype(int) - colour) < 60, axis=2).astype(np.uint8)
                count, _, stats, _ = cv2.connectedComponentsWithStats(mask)
                for x, y, bw, bh, area in stats[1:count]:
                    if area < 4:
                        continue
                    box = (x / w, y / h, (x + bw) / w, (y + bh) / h)
                    named = ("star" if (box[0] + box[2]) / 2 < 0.5 else "circle") if by_side else label
                    if named != skip:
                        found.append(TruthRegion(named, box))
            answers.append(tuple(found))
        return answers

    return predict


@pytest.mark.unit
def test_regions_move_with_the_image():
    """A block's box after each geometric perturbation is where the perturbed image shows it."""
    from labelloop.core.truth import TruthRegion

    image = np.zeros((60, 80, 3), np.uint8)
    image[6:18, 8:32] = 255  # rows 6-17, columns 8-31: box (0.1, 0.1, 0.4, 0.3)
    region = (TruthRegion("star", (0.1, 0.1, 0.4, 0.3)),)
    for name, strength in [("flip_lr", None), ("flip_ud", None), ("rotate90", None), ("shift", 0.2), ("blur", None)]:
        out = perturb(image, name, strength)
        ys, xs = np.nonzero(out[:, :, 0] > 127)
        h, w = out.shape[:2]
        seen = (xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h)
        moved = modeltests.move_regions(region, name, strength, image.shape[:2])
        assert len(moved) == 1 and moved[0].box == pytest.approx(seen, abs=0.03), (name, moved, seen)
    gone = modeltests.move_regions((TruthRegion("star", (0.85, 0.1, 1.0, 0.3)),), "shift", 0.1, (60, 80))
    assert gone == ()  # shifted more than half out of the image: not judged


@pytest.mark.unit
def test_regions_pair_up_by_overlap_and_label():
    from labelloop.core.truth import TruthRegion

    truth = (TruthRegion("star", (0.1, 0.1, 0.4, 0.4)), TruthRegion("circle", (0.5, 0.5, 0.9, 0.9)))
    said = (TruthRegion("circle", (0.52, 0.5, 0.9, 0.9)), TruthRegion("circle", (0.1, 0.1, 0.4, 0.38)),
            TruthRegion("star", (0.0, 0.8, 0.1, 1.0)))
    found = modeltests.match_regions(truth, said)
    assert found.pairs == ((0, 1), (1, 0)) and found.missed == () and found.extra == (2,)
    assert not modeltests.same_answer(truth, said) and modeltests.same_answer(truth, tuple(reversed(truth)))
    item = TuningItem(1, None, Path("x.png"), regions=truth)
    assert not modeltests.is_right(item, said) and modeltests.is_right(item, truth)
    costs = modeltests.parse_costs({"default": 1, "classes": {"circle": 3}, "confusions": {"star->circle": 7},
                                    "false_positive": 0.5}, LABELS)
    assert costs.of_answer(item, said) == 7 + 0.5  # the star called a circle, one box matching nothing
    assert costs.of_answer(item, ()) == 1 + 3 and costs.of_answer(item, truth) == 0


@pytest.mark.unit
def test_box_tests_catch_a_blind_detector_and_one_that_reads_the_side(tmp_path):
    """On blocks where colour decides the label: the right detector passes every test; one blind to stars fails
    star recall, accuracy on the star cohort and the examples test, not precision; one that names blocks by the
    half of the image they are in fails flip invariance (boxes mirrored before comparing), not brightness."""
    layouts = [[("star", (0.1, 0.1, 0.3, 0.4)), ("circle", (0.6, 0.5, 0.9, 0.9))],
               [("circle", (0.1, 0.2, 0.4, 0.5))],
               [("star", (0.55, 0.1, 0.8, 0.3))],
               [("star", (0.05, 0.6, 0.3, 0.95)), ("star", (0.6, 0.1, 0.95, 0.4))],
               []]
    tuning = box_items(tmp_path, layouts)
    tests = parse_suite([
        {"name": "stars found", "kind": "confidence", "metric": "recall", "label": "star", "min": 0.9},
        {"name": "star tasks right", "kind": "confidence", "cohort": {"label": "star"}, "min": 0.9},
        {"name": "no false boxes", "kind": "confidence", "metric": "precision", "min": 0.9},
        {"name": "flip", "kind": "invariance", "perturbation": "flip_lr", "max_change": 0.0},
        {"name": "turn", "kind": "invariance", "perturbation": "rotate90", "max_change": 0.0},
        {"name": "shift", "kind": "invariance", "perturbation": "shift", "max_change": 0.0},
        {"name": "bright", "kind": "invariance", "perturbation": "brightness", "strength": 1.1, "max_change": 0.0},
        {"name": "these show stars", "kind": "examples", "tasks": [200, 202, 203], "label": "star"},
    ], LABELS)
    examples = {t.task_id: t.image for t in tuning}
    right = {r["name"]: r for r in run_suite(tests, tuning, block_detector(), examples)}
    assert all(r["passed"] for r in right.values()), right
    assert right["stars found"]["samples"] == 4 and right["star tasks right"]["samples"] == 3
    assert right["no false boxes"]["samples"] == 6 and right["flip"]["samples"] == 5

    blind = {r["name"]: r for r in run_suite(tests, tuning, block_detector(skip="star"), examples)}
    assert (blind["stars found"]["passed"], blind["stars found"]["value"]) == (False, 0.0)
    assert blind["stars found"]["failing"] == [200, 202, 203]
    assert not blind["star tasks right"]["passed"] and not blind["these show stars"]["passed"]
    assert blind["no false boxes"]["passed"] and blind["no false boxes"]["value"] == 1.0  # what it shows is right
    assert blind["flip"]["passed"]

    sided = {r["name"]: r for r in run_suite(tests, tuning, block_detector(by_side=True), examples)}
    assert not sided["flip"]["passed"] and sided["flip"]["failing"] == [200, 201, 202, 203], sided["flip"]
    assert sided["bright"]["passed"] and sided["shift"]["passed"]  # the shift keeps every block on its side

    costs = modeltests.parse_costs({"classes": {"star": 10}}, LABELS)
    priced = modeltests.compare_costs(tuning, block_detector(skip="star")([t.image for t in tuning]),
                                      block_detector()([t.image for t in tuning]), costs)
    assert priced["cost"] == pytest.approx(40 / 5) and priced["serving_cost"] == 0.0
    assert priced["cost"] > priced["tolerance"]


# -- the gate, on real trainings -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted(tmp_path_factory, run_home):
    """Project 77 with a confidence test on stars and an advisory flip test, whose first version the engine
    trained on 160 correctly labeled 'simple' shapes (the demo's kind of data, 64 px)."""
    from labelloop.core.labelconfig import parse_label_config
    from labelloop.core.registry import Registry
    from labelloop.dev.shapes import generate_shapes, label_config, to_label_studio_tasks
    from labelloop.labelstudio.media import LocalFileFetcher
    from labelloop.workflows.pipeline import train_new_version

    home = tmp_path_factory.mktemp("model-tests")
    registry = Registry(home / "models")
    modeltests.save_suite(registry.project_dir("77"), parse_suite([
        {"name": "stars are stars", "kind": "confidence", "cohort": {"label": "star"}, "min": 0.5},
        {"name": "flip invariance", "kind": "invariance", "perturbation": "flip_lr", "max_change": 0.2,
         "required": False},
    ], LABELS))
    data = generate_shapes(home / "shapes", n=160, seed=41, size=64, max_objects=1, style="simple")
    spec = parse_label_config(label_config("classification"))
    first = train_new_version(registry, "77", to_label_studio_tasks(data, "classification"), spec, LocalFileFetcher())
    return registry, first, data, spec


def test_the_first_version_passes_its_tests_and_serves(planted):
    registry, first, _, _ = planted
    results = {r["name"]: r for r in first.manifest.model_tests["results"]}
    assert first.promoted and registry.serving("77").version == first.manifest.version, first.reason
    assert results["stars are stars"]["passed"] and results["stars are stars"]["samples"] > 0, results
    assert "serving" not in first.manifest.model_tests and first.manifest.changes == {}  # nothing served before it


def test_a_planted_regression_is_kept_out_by_a_confidence_test(planted):
    """A version trained where every star of the training split was labeled "circle" fails "stars are stars"
    on the tuning split and stays out of service; the version in service passes it, shown beside."""
    import dataclasses

    from labelloop.config import settings
    from labelloop.core.datasets import split_of
    from labelloop.dev.shapes import to_label_studio_tasks
    from labelloop.labelstudio.media import LocalFileFetcher
    from labelloop.workflows.pipeline import train_new_version

    registry, first, data, spec = planted
    good = first.manifest.version
    tasks = to_label_studio_tasks(data, "classification")
    for task in tasks:  # the planted regression: one class's training labels wrong, the tuning split's right
        value = task["annotations"][0]["result"][0]["value"]
        if value["choices"] == ["star"] and split_of(task["id"]) == "train":
            value["choices"] = ["circle"]
    env = dataclasses.replace(settings(), label_studio_url="http://studio.example:8080")
    outcome = train_new_version(registry, "77", tasks, spec, LocalFileFetcher(), env=env)
    assert not outcome.promoted and "kept out: 1 required model test(s) failed" in outcome.reason, outcome.reason
    assert "'stars are stars'" in outcome.reason and registry.serving("77").version == good
    tests = outcome.manifest.model_tests
    mine = {r["name"]: r for r in tests["results"]}
    beside = {r["name"]: r for r in tests["serving"]["results"]}
    assert tests["serving"]["version"] == good and tests["tuning_tasks"] > 0
    assert not mine["stars are stars"]["passed"] and mine["stars are stars"]["failing"], mine
    assert beside["stars are stars"]["passed"], beside
    assert set(mine["stars are stars"]["failing"]) <= {t["id"] for t in tasks}
    # traceable: the tuning tasks the serving version got right and this one gets wrong, in the reason too
    changes = outcome.manifest.changes
    assert changes["compared_with"] == good and changes["regressed_count"] >= 1, changes
    assert set(changes["regressed"]) & set(mine["stars are stars"]["failing"])
    assert f"tuning task(s) it gets wrong that {good} got right" in outcome.reason
    assert changes["links"][0] == f"http://studio.example:8080/projects/77/data?task={changes['regressed'][0]}"
    # the manifest on disk says the same (what /versions, the CLI and an analyst read)
    on_disk = json.loads((Path(outcome.manifest.path) / "manifest.json").read_text())
    assert on_disk["model_tests"]["results"] == tests["results"]


def test_the_cli_shows_each_version_beside_the_tests(planted, tmp_path):
    """`labelloop model-tests` prints the tests and the newest versions' verdicts side by side; --set refuses
    a bad file with the reason (exit 1) and keeps the stored suite."""
    import os
    import subprocess
    import sys

    registry = planted[0]
    env = {**os.environ, "MODEL_DIR": str(registry.root)}
    shown = subprocess.run([sys.executable, "-m", "labelloop.cli", "model-tests", "--project", "77"], env=env,
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    header, stars, flip = shown.stdout.splitlines()[:3]
    assert "p77-v2" in header and "p77-v1" in header and header.index("p77-v2") < header.index("p77-v1")
    assert stars.startswith("stars are stars") and stars.split()[-4::2] == ["FAIL", "ok"]  # v2 failed, v1 passed
    assert "(advisory)" in flip
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"tests": [{"name": "x", "kind": "confidence", "min": 7}]}))
    refused = subprocess.run([sys.executable, "-m", "labelloop.cli", "model-tests", "--project", "77", "--set", str(bad),
                              "--no-check"], env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "min must be in [0, 1]" in refused.stderr, (refused.returncode, refused.stderr)
    assert [t.name for t in modeltests.load_suite(registry.project_dir("77"))] == ["stars are stars", "flip invariance"]


def test_costs_keep_out_a_version_whose_errors_cost_more(planted):
    """With stars priced 20 times other errors (and the tests advisory), the planted regression is kept out by
    its mean cost per tuning task, the plain metrics reported beside; the costs stay in the manifest."""
    from labelloop.core.datasets import split_of
    from labelloop.dev.shapes import to_label_studio_tasks
    from labelloop.labelstudio.media import LocalFileFetcher
    from labelloop.workflows.pipeline import train_new_version

    registry, first, data, spec = planted
    folder = registry.project_dir("77")
    advisory = [dataclasses.replace(t, required=False) for t in modeltests.load_suite(folder)]
    modeltests.save_suite(folder, advisory, modeltests.parse_costs({"classes": {"star": 20}}, LABELS))
    tasks = to_label_studio_tasks(data, "classification")
    for task in tasks:
        value = task["annotations"][0]["result"][0]["value"]
        if value["choices"] == ["star"] and split_of(task["id"]) == "train":
            value["choices"] = ["circle"]
    outcome = train_new_version(registry, "77", tasks, spec, LocalFileFetcher())
    costs = outcome.manifest.model_tests["costs"]
    assert not outcome.promoted and "mean cost" in outcome.reason and "plain " in outcome.reason, outcome.reason
    assert costs["cost"] > costs["serving_cost"] + costs["tolerance"] and outcome.manifest.metrics["cost"] == costs["cost"]
    assert registry.serving("77").version == first.manifest.version


def test_a_box_version_runs_its_tests_region_by_region_beside_the_serving_one(trained, shapes_train, tmp_path):
    """A detection project's suite and costs run on a new version's tuning split region by region, and on the
    version in service beside it; a required star-recall bar that a two-epoch version cannot reach keeps it
    out with the test named; the regression trace and the costs compare the two on the same tasks."""
    from labelloop.config import settings
    from labelloop.core.datasets import split_of
    from labelloop.core.labelconfig import parse_label_config
    from labelloop.core.registry import Registry
    from labelloop.dev.shapes import label_config, to_label_studio_tasks
    from labelloop.labelstudio.media import LocalFileFetcher
    from labelloop.workflows.pipeline import train_new_version

    served = trained("detection")
    registry = Registry(tmp_path / "models")
    filled_here = {"version", "project", "created_at", "weights_sha256", "weights", "path"}
    serving = registry.add_version("88", served.weights, {k: v for k, v in served.manifest.items() if k not in filled_here})
    registry.promote("88", serving.version)
    tasks = to_label_studio_tasks(shapes_train, "detection")
    tuning_ids = [t["id"] for t in tasks if split_of(t["id"]) == "val"]
    modeltests.save_suite(registry.project_dir("88"), parse_suite([
        {"name": "stars found", "kind": "confidence", "metric": "recall", "label": "star", "min": 0.99},
        {"name": "flip", "kind": "invariance", "perturbation": "flip_lr", "max_change": 1.0, "required": False},
        {"name": "shows a circle", "kind": "examples", "tasks": tuning_ids[:3], "label": "circle", "required": False},
    ], LABELS), modeltests.parse_costs({"classes": {"star": 5}, "false_positive": 0.5}, LABELS))
    env = dataclasses.replace(settings(), epochs=2, warm_start_steps=0)
    outcome = train_new_version(registry, "88", tasks, parse_label_config(label_config("detection")),
                                LocalFileFetcher(), env=env)
    tests = outcome.manifest.model_tests
    mine = {r["name"]: r for r in tests["results"]}
    beside = {r["name"]: r for r in tests["serving"]["results"]}
    assert not outcome.promoted and "'stars found'" in outcome.reason, outcome.reason
    assert registry.serving("88").version == serving.version and tests["serving"]["version"] == serving.version
    assert set(mine) == set(beside) == {"stars found", "flip", "shows a circle"}
    truth_stars = sum(1 for t in tasks if t["id"] in tuning_ids for r in t["annotations"][0]["result"]
                      if r["value"]["rectanglelabels"] == ["star"])
    assert truth_stars > 0 and mine["stars found"]["samples"] == beside["stars found"]["samples"] == truth_stars
    assert mine["flip"]["samples"] == tests["tuning_tasks"] == len(tuning_ids) and mine["flip"]["passed"]
    assert mine["shows a circle"]["samples"] == 3
    costs = tests["costs"]
    assert costs["compared_with"] == serving.version and outcome.manifest.metrics["cost"] == costs["cost"]
    assert costs["costs"]["false_positive"] == 0.5 and costs["cost"] >= 0 and costs["serving_cost"] >= 0
    assert outcome.manifest.settings["upweighted"] == {"star": 4}  # stars cost 5x: their images seen 4x in training
    changes = outcome.manifest.changes
    assert changes["compared_with"] == serving.version and changes["tuning_tasks"] == len(tuning_ids)
    assert changes["regressed_count"] + changes["fixed_count"] <= len(tuning_ids)


def side_images(folder: Path, n: int, seed: int, label_by_side: bool) -> list[tuple[Path, str]]:
    """Light discs on a dark ground at random places; labeled by the side they sit on (circle left, square
    right), or all "circle" (what they are: labels a left-right flip does not change)."""
    import cv2

    rng = np.random.default_rng(seed)
    out = []
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        image = np.full((64, 64, 3), 30, np.uint8)
        left = bool(k % 2)
        cv2.circle(image, (int(rng.integers(6, 22)) if left else int(rng.integers(42, 58)), int(rng.integers(8, 56))),
                   6, (220, 220, 220), -1)
        label = ("circle" if left else "square") if label_by_side else "circle"
        path = folder / f"{k}.png"
        cv2.imwrite(str(path), image)
        out.append((path, label))
    return out


def test_a_classifier_that_reads_the_side_fails_flip_invariance(tmp_path):
    """Trained without flips on images whose label is the side the disc sits on, a classifier is not
    flip-invariant: on discs labeled as what they are (flip-invariant data) its predictions change under a
    left-right flip and the invariance test fails, naming them; an up-down flip (the side stays) passes."""
    import shutil

    from labelloop.core.labelconfig import parse_label_config
    from labelloop.core.predict import load_model, predict_images
    from labelloop.core.yolo_env import import_yolo
    from labelloop.dev.shapes import label_config

    spec = parse_label_config(label_config("classification"))
    data = tmp_path / "sides"
    for split, n in (("train", 64), ("val", 8)):
        for name in LABELS:
            (data / split / name).mkdir(parents=True, exist_ok=True)
        for path, label in side_images(tmp_path / f"raw-{split}", n, seed=len(split), label_by_side=True):
            shutil.copy(path, data / split / label / path.name)
    model = import_yolo()(str(Path(modeltests.__file__).parent / "model_configs" / "labelloop-cls-small.yaml"))
    model.train(data=str(data), epochs=15, imgsz=64, batch=16, fliplr=0.0, erasing=0.0, scale=0.0, auto_augment=None,
                device="cpu", workers=0, project=str(tmp_path / "run"), name="sides", plots=False, val=False,
                verbose=False, seed=0)
    loaded = load_model(tmp_path / "run" / "sides" / "weights" / "last.pt", "sides")

    def predict(batch):
        return [p.regions[0].label for p in predict_images(loaded, batch, spec, 0.5)]

    tuning = [TuningItem(k, label, path)
              for k, (path, label) in enumerate(side_images(tmp_path / "discs", 30, seed=9, label_by_side=False))]
    tests = parse_suite([{"name": "left-right", "kind": "invariance", "perturbation": "flip_lr", "max_change": 0.1},
                         {"name": "up-down", "kind": "invariance", "perturbation": "flip_ud", "max_change": 0.1}], LABELS)
    left_right, up_down = run_suite(tests, tuning, predict)
    assert not left_right["passed"] and left_right["value"] > 0.5, left_right
    assert left_right["failing_count"] == round(left_right["value"] * left_right["samples"])
    assert up_down["passed"] and up_down["value"] <= 0.1, up_down
    assert "'left-right'" in modeltests.describe_failures([left_right, up_down])


# -- the suite over HTTP (what the FiftyOne App and scripts call) -------------------------------------------


def test_model_tests_are_set_and_read_over_http(tmp_path):
    import dataclasses

    from fastapi.testclient import TestClient

    from labelloop.config import settings
    from labelloop.dev.shapes import label_config
    from labelloop.service.app import create_app

    env = dataclasses.replace(settings(), model_dir=tmp_path / "models", base_model="", warm_start_steps=0)
    app = TestClient(create_app(env), raise_server_exceptions=False)
    suite = {"tests": [{"name": "stars are stars", "kind": "confidence", "cohort": {"label": "star"}, "min": 0.8}]}
    assert app.get("/projects/3/model-tests").json() == {"project": "3", "tests": []}
    put = app.put("/projects/3/model-tests", json=suite)
    assert put.status_code == 200, put.text
    expected = {"project": "3", "tests": [{**suite["tests"][0], "required": True, "metric": "accuracy"}]}
    assert put.json() == expected and app.get("/projects/3.1700000000/model-tests").json() == expected
    assert (tmp_path / "models" / "projects" / "3" / modeltests.SUITE_FILE).is_file()
    # refused with the reason, the stored suite untouched
    for body, message in [({"tests": [{"name": "x", "kind": "confidence", "min": 2}]}, "min must be in"),
                          ({"tests": [], "extra": 1}, "nothing else"),
                          ({"tests": [{"name": "x", "kind": "invariance", "perturbation": "melt"}]}, "perturbation")]:
        bad = app.put("/projects/3/model-tests", json=body)
        assert bad.status_code == 422 and message in bad.json()["error"], bad.text
    assert app.get("/projects/3/model-tests").json() == expected
    assert app.put("/projects/..%2F..%2Fetc/model-tests", json=suite).status_code in (404, 422)
    # once Label Studio has connected the project, labels are checked against its config (boxes too)
    assert app.post("/setup", json={"project": "4", "schema": label_config("classification")}).status_code == 200
    unknown = app.put("/projects/4/model-tests", json={"tests": [{**suite["tests"][0], "cohort": {"label": "dog"}}]})
    assert unknown.status_code == 422 and "'dog' is not one of the project's labels" in unknown.json()["error"]
    assert app.post("/setup", json={"project": "5", "schema": label_config("detection")}).status_code == 200
    boxes = app.put("/projects/5/model-tests", json={"tests": [{**suite["tests"][0], "metric": "recall"}]})
    assert boxes.status_code == 200 and boxes.json()["tests"][0]["metric"] == "recall", boxes.text
    # costs beside the tests: checked like them, read back
    priced = app.put("/projects/4/model-tests", json={"tests": [], "costs": {"classes": {"star": 5}}})
    assert priced.status_code == 200 and app.get("/projects/4/model-tests").json()["costs"] == \
        {"default": 1.0, "classes": {"star": 5.0}, "confusions": {}}
    wrong = app.put("/projects/4/model-tests", json={"tests": [], "costs": {"confusions": {"star->dog": 5}}})
    assert wrong.status_code == 422 and "'dog' is not one of" in wrong.json()["error"]
    boxes_priced = app.put("/projects/5/model-tests", json={"tests": [], "costs": {"default": 2, "false_positive": 0.5}})
    assert boxes_priced.status_code == 200 and boxes_priced.json()["costs"]["false_positive"] == 0.5
    negative = app.put("/projects/5/model-tests", json={"tests": [], "costs": {"false_positive": -1}})
    assert negative.status_code == 422 and "false_positive must be in" in negative.json()["error"]


@pytest.mark.unit
def test_training_reads_the_unlabeled_tasks_its_tests_name_by_id(tmp_path):
    """Training reads only the labeled tasks; an examples test may name tasks nobody labeled, and those (only
    those) are read by id through the Data Manager's list — a deleted one is skipped, the test then reports its
    example missing."""
    from labelloop.core.labelconfig import parse_label_config
    from labelloop.core.registry import Registry
    from labelloop.dev.shapes import label_config
    from labelloop.labelstudio.client import StudioProject
    from labelloop.workflows.pipeline import _tasks_named_by_tests

    spec = parse_label_config(label_config("classification"))
    registry = Registry(tmp_path)
    labeled = [{"id": 1, "data": {"image": "a"}}, {"id": 2, "data": {"image": "b"}}]
    project = StudioProject(7, {}, spec, labeled)

    class Client:
        read: list[list[int]] = []

        def select_tasks(self, project_id, task_ids, full=False):
            assert project_id == 7 and full
            self.read.append(sorted(task_ids))
            return [{"id": t, "data": {"image": f"img{t}"}} for t in sorted(task_ids) if t != 9]  # 9 was deleted

    client = Client()
    assert _tasks_named_by_tests(client, registry, 7, project) == [] and client.read == []  # no suite
    modeltests.save_suite(registry.project_dir(7), modeltests.parse_suite(
        [{"name": "stars", "kind": "examples", "tasks": [2, 5, 9, 5], "label": "star"}], spec.labels))
    assert _tasks_named_by_tests(client, registry, 7, project) == [{"id": 5, "data": {"image": "img5"}}]
    assert client.read == [[5, 9]]
