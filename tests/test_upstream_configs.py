"""Upstream label configs that labelloop used to refuse (issue 11, item 2): several servable controls in one
config (each answered from its own model, one result list and one score per task).

Unit tests check the parsing and the merge rule; the service tests POST real label configs to an in-process
``/setup`` and ``/predict`` (label-studio-ml-backend's test style: compare the JSON) with models the suite
trains once (``trained``), and compare a two-control answer with the two one-control answers it is made of.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
from conftest import install_model
from fastapi.testclient import TestClient

from labelloop.config import settings
from labelloop.core.labelconfig import LabelConfigError, parse_label_config, parse_label_controls
from labelloop.dev.shapes import CLASSES
from labelloop.workflows import pipeline
from labelloop.workflows.pipeline import TaskPrediction, combined_version, predict_controls

CHOICES = "".join(f'<Choice value="{c}"/>' for c in CLASSES)
LABELS = "".join(f'<Label value="{c}"/>' for c in CLASSES)


def cfg(*controls: str) -> str:
    return '<View><Image name="image" value="$image"/>' + "".join(controls) + "</View>"


def choices(attrs: str = "") -> str:
    return f'<Choices name="kind" toName="image"{attrs}>{CHOICES}</Choices>'


def rectangles(attrs: str = "") -> str:
    return f'<RectangleLabels name="label" toName="image"{attrs}>{LABELS}</RectangleLabels>'


# -- unit: parsing and merging ------------------------------------------------------------------------


@pytest.mark.unit
def test_every_servable_control_is_parsed_in_config_order():
    specs = parse_label_controls(cfg(choices(), rectangles(' model_score_threshold="0.3"'),
                                     '<PolygonLabels name="p" toName="image" model_skip="true"><Label value="a"/>'
                                     '</PolygonLabels>'))
    assert [(s.from_name, s.task_type) for s in specs] == [("kind", "classification"), ("label", "detection")]
    assert specs[1].score_threshold == pytest.approx(0.3)


@pytest.mark.unit
def test_one_control_callers_still_get_a_clear_refusal():
    """Training, prediction jobs and FiftyOne work on one control: they keep the model_skip advice."""
    with pytest.raises(LabelConfigError, match=r"/predict answers each.*model_skip"):
        parse_label_config(cfg(choices(), rectangles()))


@pytest.mark.unit
def test_combined_version_names_each_model_once_in_control_order():
    assert combined_version(["custom-cls", "p7-v1"]) == "custom-cls+p7-v1"
    assert combined_version(["base-yolo", None, "base-yolo"]) == "base-yolo"
    assert combined_version([None, None]) is None


@pytest.mark.unit
def test_merge_keeps_every_region_with_unique_ids_and_the_lowest_score(monkeypatch):
    specs = parse_label_controls(cfg(choices(), rectangles()))
    answers = {
        "kind": [TaskPrediction(1, [{"id": "ll0", "from_name": "kind"}], 0.9, "a"),
                 TaskPrediction(2, [{"id": "ll0", "from_name": "kind"}], 0.6, "a")],
        "label": [TaskPrediction(1, [{"id": "ll0", "from_name": "label"}, {"id": "ll1", "from_name": "label"}],
                                 0.4, "b"),
                  TaskPrediction(2, [], None, "b", error="HTTP 404 fetching x", error_kind="http")],
    }
    monkeypatch.setattr(pipeline, "predict_tasks", lambda tasks, spec, model, fetcher, **kw: answers[spec.from_name])
    out = predict_controls([{"id": 1}, {"id": 2}], [(specs[0], None), (specs[1], None)], None, "a+b")
    first, second = (p.to_label_studio() for p in out)
    assert first == {"result": [{"id": "ll0-0", "from_name": "kind"}, {"id": "ll1-0", "from_name": "label"},
                                {"id": "ll1-1", "from_name": "label"}], "score": 0.4, "model_version": "a+b"}
    # a control that failed: its reason, the other control's regions, score 0 (review first)
    assert second == {"result": [{"id": "ll0-0", "from_name": "kind"}], "score": 0.0, "model_version": "a+b"}
    assert out[1].error == "label: HTTP 404 fetching x" and out[1].error_kind == "http"


# -- service: real configs through /setup and /predict -----------------------------------------------


@pytest.fixture(scope="module")
def served_home(tmp_path_factory, trained):
    """A registry where project 7 serves the suite's detector, and the suite's classifier under MODEL_ROOT."""
    home = tmp_path_factory.mktemp("upstream-configs")
    version = install_model(home / "models", 7, trained("detection"))
    (home / "weights").mkdir()
    shutil.copy(trained("classification").weights, home / "weights" / "shapes-cls.pt")
    return home, version


def client(home: Path, image_host: str, **changes) -> TestClient:
    from labelloop.service.app import create_app

    changes = {"base_model": "", **changes}
    env = dataclasses.replace(settings(), model_dir=home / "models", model_root=home / "weights",
                              allow_custom_model_path=True, allowed_hosts=(image_host.removeprefix("http://"),),
                              cache_dir=home / "cache", warm_start_steps=0, **changes)
    return TestClient(create_app(env), raise_server_exceptions=False)


def tasks_for(image_host: str, shapes_eval, n: int = 4) -> list[dict]:
    return [{"id": 100 + k, "data": {"image": f"{image_host}/{image.file}"}} for k, image in enumerate(shapes_eval.images[:n])]


def predict(app: TestClient, project, config: str, tasks: list[dict]) -> dict:
    response = app.post("/predict", json={"tasks": tasks, "project": project, "label_config": config})
    assert response.status_code == 200, response.text
    return response.json()


def test_choices_and_rectangles_on_one_image_are_both_served(served_home, image_host, shapes_eval):
    home, detector = served_home
    app = client(home, image_host)
    boxes = rectangles(' model_score_threshold="0.05"')  # the suite's 30-epoch detector is weak
    both = cfg(choices(' model_path="shapes-cls.pt"'), boxes)
    setup = app.post("/setup", json={"project": "7.1795358080", "schema": both})
    assert setup.status_code == 200, setup.text
    assert setup.json() == {
        "model_version": f"custom-shapes-cls+{detector}", "model_ready": True,
        "task_types": ["classification", "detection"],
        "controls": [{"from_name": "kind", "task_type": "classification", "model_version": "custom-shapes-cls"},
                     {"from_name": "label", "task_type": "detection", "model_version": detector}]}
    tasks = tasks_for(image_host, shapes_eval, 12)
    answer = predict(app, "7.1795358080", both, tasks)
    # the same tasks through one-control configs: the classifier alone (a project with no trained version, so
    # its model_path answers) and the project's detector alone
    alone_cls = predict(app, "8", cfg(choices(' model_path="shapes-cls.pt"')), tasks)["results"]
    alone_det = predict(app, "7", cfg(boxes), tasks)["results"]
    assert answer["model_version"] == f"custom-shapes-cls+{detector}" and "message" not in answer
    assert len(answer["results"]) == len(tasks)
    for merged, c, d in zip(answer["results"], alone_cls, alone_det):
        expected = [{**item, "id": f"ll0-{k}"} for k, item in enumerate(c["result"])] + \
                   [{**item, "id": f"ll1-{k}"} for k, item in enumerate(d["result"])]
        assert merged == {"result": expected, "score": min(c["score"], d["score"]),
                          "model_version": f"custom-shapes-cls+{detector}"}
        assert merged["result"][0]["type"] == "choices"
    assert any(r["type"] == "rectanglelabels" for merged in answer["results"] for r in merged["result"])


def test_a_control_without_a_model_is_skipped_with_a_message(served_home, image_host, shapes_eval):
    """No model_path on the Choices and no base model: the detector's boxes are served, the Choices is named
    in the message (not a 422)."""
    home, detector = served_home
    app = client(home, image_host)
    both = cfg(choices(), rectangles())
    setup = app.post("/setup", json={"project": "7", "schema": both}).json()
    assert setup["model_version"] == detector and setup["controls"][0]["model_version"] is None
    tasks = tasks_for(image_host, shapes_eval, 2)
    answer = predict(app, "7", both, tasks)
    assert answer["model_version"] == detector
    assert answer["message"].startswith('<Choices name="kind"> skipped: no model')
    alone = predict(app, "7", cfg(rectangles()), tasks)["results"]
    for merged, d in zip(answer["results"], alone):
        assert merged["result"] == [{**item, "id": f"ll1-{k}"} for k, item in enumerate(d["result"])]
        assert merged["score"] == d["score"]


def test_a_model_of_the_wrong_kind_is_skipped_and_no_model_at_all_is_an_empty_answer(served_home, image_host,
                                                                                    shapes_eval):
    home, _ = served_home
    app = client(home, image_host)
    # the classifier named on the RectangleLabels: wrong kind, skipped; nothing left to serve
    config = cfg(choices(), rectangles(' model_path="shapes-cls.pt"'))
    answer = predict(app, "9", config, tasks_for(image_host, shapes_eval, 1))
    assert answer["results"] == []
    assert '<Choices name="kind"> skipped: no model' in answer["message"]
    assert '<RectangleLabels name="label"> skipped: ' in answer["message"] and "classify model" in answer["message"]


# -- multi-label Choices (choice="multiple") ----------------------------------------------------------


@pytest.mark.unit
def test_choice_multiple_is_read_from_the_config():
    multi = parse_label_config(cfg(choices(' choice="multiple"')))
    single = parse_label_config(cfg(choices(' choice="single"')))
    assert multi.multiple and not single.multiple and not parse_label_config(cfg(rectangles())).multiple


@pytest.mark.unit
def test_multilabel_choices_every_class_over_the_threshold_at_least_the_top_one():
    from labelloop.core.scoring import multilabel_choices

    assert multilabel_choices([0.1, 0.45, 0.3, 0.15], 0.25) == [1, 2]
    assert multilabel_choices([0.1, 0.45, 0.3, 0.15], 0.5) == [1]  # none reaches it: the top one
    assert multilabel_choices([], 0.5) == []


@pytest.mark.unit
def test_multilabel_task_score_is_the_product_of_decision_correctness():
    from labelloop.core.scoring import decision_correctness, multilabel_task_score

    probs = [0.1, 0.45, 0.3, 0.15]
    # chosen 1 and 2 (right with p), left out 0 and 3 (right with 1 - p)
    assert multilabel_task_score(probs, 0.25) == pytest.approx(0.9 * 0.45 * 0.3 * 0.85)
    # the top class chosen under the threshold counts as chosen: p, not 1 - p
    assert multilabel_task_score(probs, 0.5) == pytest.approx(0.9 * 0.45 * 0.7 * 0.85)
    # the same rule as detection's keep/drop decisions
    assert multilabel_task_score([0.8, 0.2], 0.5) == pytest.approx(
        decision_correctness(0.8, 0.5) * decision_correctness(0.2, 0.5))


@pytest.mark.unit
def test_multilabel_prediction_is_one_item_choosing_every_chosen_class():
    from labelloop.core.predict import ImagePrediction, _classification_prediction
    from labelloop.labelstudio.results import prediction_result

    spec = parse_label_config(cfg(choices(' choice="multiple" model_score_threshold="0.25"')))
    labels = list(CLASSES)
    label_of = dict(enumerate(labels))
    pred = _classification_prediction(ImagePrediction(width=8, height=8), labels, [0.1, 0.45, 0.3, 0.15], label_of,
                                      multilabel=0.25)
    assert [r.label for r in pred.regions] == [labels[1], labels[2]]
    assert pred.score == pytest.approx(0.9 * 0.45 * 0.3 * 0.85)
    assert prediction_result(pred, spec) == [{"id": "ll0", "from_name": "kind", "to_name": "image", "type": "choices",
                                              "score": 0.3, "value": {"choices": [labels[1], labels[2]]}}]
    # a single-label control on the same probabilities: the top class alone, as before
    single = _classification_prediction(ImagePrediction(), labels, [0.1, 0.45, 0.3, 0.15], label_of)
    assert [r.label for r in single.regions] == [labels[1]] and single.score == pytest.approx(0.45)


@pytest.mark.unit
def test_training_a_multilabel_choices_is_refused_with_the_reason(tmp_path):
    from labelloop.core.datasets import DatasetError
    from labelloop.core.registry import Registry
    from labelloop.workflows.pipeline import train_new_version

    spec = parse_label_config(cfg(choices(' choice="multiple"')))
    with pytest.raises(DatasetError, match=r"choice=\"multiple\".*single-label"):
        train_new_version(Registry(tmp_path), 1, [], spec, None)


def test_multilabel_choices_served_through_predict(served_home, image_host, shapes_eval):
    """A real multi-label config through /predict: one item per task choosing every class at or above the
    threshold, the most likely first (the class the single-label config chooses); threshold 0 chooses all."""
    home, _ = served_home
    app = client(home, image_host)
    tasks = tasks_for(image_host, shapes_eval, 6)
    single = predict(app, "8", cfg(choices(' model_path="shapes-cls.pt"')), tasks)["results"]
    multi = predict(app, "8", cfg(choices(' model_path="shapes-cls.pt" choice="multiple" model_score_threshold="0.2"')),
                    tasks)["results"]
    for one, many in zip(single, multi):
        (item,) = many["result"]
        assert item["value"]["choices"][0] == one["result"][0]["value"]["choices"][0]  # the top class leads
        assert len(item["value"]["choices"]) >= 1 and 0.0 <= many["score"] <= 1.0
    everything = predict(app, "8", cfg(choices(' model_path="shapes-cls.pt" choice="multiple" model_score_threshold="0"')),
                         tasks)["results"]
    for many in everything:
        assert sorted(many["result"][0]["value"]["choices"]) == sorted(CLASSES)  # threshold 0: every class


# -- RectangleLabels model_obb="true": an ultralytics OBB model's rotated boxes ------------------------


def _obb_result(boxes, shape=(60, 100)):
    import numpy as np
    import torch
    from ultralytics.engine.results import Results

    return Results(np.zeros((*shape, 3), np.uint8), "x.png", dict(enumerate(CLASSES)), obb=torch.tensor(boxes))


@pytest.mark.unit
def test_model_obb_is_read_and_needs_an_obb_model():
    from labelloop.core.predict import LoadedModel, check_compatible

    spec = parse_label_config(cfg(rectangles(' model_obb="true"')))
    assert spec.oriented and not parse_label_config(cfg(rectangles())).oriented
    check_compatible(LoadedModel(None, Path("m.pt"), "base-obb", "obb", {}), spec)
    with pytest.raises(LabelConfigError, match=r"model_obb.*needs an obb model.*detect model"):
        check_compatible(LoadedModel(None, Path("m.pt"), "base-det", "detect", {}), spec)
    with pytest.raises(LabelConfigError, match=r"needs a detect or segment model"):  # and the other way round
        check_compatible(LoadedModel(None, Path("m.pt"), "base-obb", "obb", {}), parse_label_config(cfg(rectangles())))


@pytest.mark.unit
def test_rotated_boxes_become_label_studio_rectangles_with_the_same_corners():
    """Label Studio rotates a rectangle about its (x, y) corner, clockwise in image coordinates: the four
    corners it draws are the OBB model's corners (checked in pixels on a non-square image)."""
    import math

    from labelloop.core.predict import ImagePrediction, _convert_oriented
    from labelloop.labelstudio.results import prediction_result

    spec = parse_label_config(cfg(rectangles(' model_obb="true"')))
    result = _obb_result([[50.0, 30.0, 40.0, 20.0, math.radians(30), 0.9, 1.0],
                          [20.0, 20.0, 10.0, 10.0, 0.2, 0.3, 0.0]])  # the second under the 0.5 threshold
    pred = _convert_oriented(result, ImagePrediction(width=100, height=60), dict(enumerate(CLASSES)), 0.5, 0.05)
    assert [r.label for r in pred.regions] == [CLASSES[1]]
    assert pred.score == pytest.approx(0.9 * (1 - 0.3))  # keep/drop decisions, as for detection
    (item,) = prediction_result(pred, spec)
    value = item["value"]
    assert value["rotation"] == pytest.approx(30.0) and value["rectanglelabels"] == [CLASSES[1]]
    x, y = value["x"] / 100 * 100, value["y"] / 100 * 60
    w, h = value["width"] / 100 * 100, value["height"] / 100 * 60
    angle = math.radians(value["rotation"])
    drawn = [(x + dx * math.cos(angle) - dy * math.sin(angle), y + dx * math.sin(angle) + dy * math.cos(angle))
             for dx, dy in ((0, 0), (w, 0), (w, h), (0, h))]
    corners = [tuple(map(float, c)) for c in result.obb.xyxyxyxy[0].numpy()]
    for point in drawn:
        assert min(math.dist(point, c) for c in corners) < 0.05


@pytest.mark.unit
def test_training_an_obb_control_is_refused_with_the_reason(tmp_path):
    from labelloop.core.datasets import DatasetError
    from labelloop.core.registry import Registry
    from labelloop.workflows.pipeline import train_new_version

    with pytest.raises(DatasetError, match="does not train OBB models"):
        train_new_version(Registry(tmp_path), 1, [], parse_label_config(cfg(rectangles(' model_obb="true"'))), None)


def test_an_obb_base_model_answers_a_model_obb_config(tmp_path, image_host, shapes_eval):
    """An ultralytics OBB model (built from yolov8n-obb.yaml: untrained, so it may find nothing) serves a
    model_obb config through /predict as LABELLOOP_BASE_MODEL; a plain RectangleLabels is refused with it."""
    from labelloop.core.yolo_env import import_yolo

    model = import_yolo()("yolov8n-obb.yaml")
    model.model.names = dict(enumerate(CLASSES))
    model.save(str(tmp_path / "obb.pt"))
    (tmp_path / "weights").mkdir()
    app = client(tmp_path, image_host, base_model=str(tmp_path / "obb.pt"))
    tasks = tasks_for(image_host, shapes_eval, 2)
    answer = predict(app, "5", cfg(rectangles(' model_obb="true"')), tasks)
    assert answer["model_version"] == "base-obb" and len(answer["results"]) == 2
    for result in answer["results"]:
        assert "error" not in result and 0.0 <= result["score"] <= 1.0
        assert all(r["type"] == "rectanglelabels" and "rotation" in r["value"] for r in result["result"])
    refused = app.post("/predict", json={"tasks": tasks, "project": "5", "label_config": cfg(rectangles())})
    assert refused.status_code == 422 and "obb model" in refused.json()["error"]
