"""KeyPointLabels served from an ultralytics pose model, as upstream's YOLO example configures it (issue 11).

Unit tests parse upstream's attributes (``predicted_values`` + ``model_index`` per point, ``model_point_threshold``,
``model_point_size``, ``model_add_bboxes`` with the ``<name>_bbox`` rectangles) and convert a real ultralytics
``Results`` (boxes + keypoints) into Label Studio JSON, compared whole. The service test serves a real pose model
(built from ``yolov8n-pose.yaml``, its class bias raised so that it always finds objects) through ``/predict``,
and the end-to-end test imports that answer into a real Label Studio project with the same config.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from labelloop.core.labelconfig import LabelConfigError, parse_label_config, parse_label_controls
from labelloop.core.predict import ImagePrediction, LoadedModel, _convert_keypoints, check_compatible
from labelloop.labelstudio.results import prediction_result

POINTS = ('<Label value="nose" predicted_values="person" model_index="0"/>'
          '<Label value="left_eye" predicted_values="person" model_index="1"/>'
          '<Label value="right_eye" predicted_values="person" model_index="2"/>')


def keypoint_config(attrs: str = ' model_point_threshold="0.5" model_point_size="4"', boxes: bool = True,
                    points: str = POINTS) -> str:
    box_control = ('<RectangleLabels name="keypoints_bbox" toName="image"><Label value="person"/></RectangleLabels>'
                   if boxes else "")
    return (f'<View><Image name="image" value="$image"/>{box_control}'
            f'<KeyPointLabels name="keypoints" toName="image"{attrs}>{points}</KeyPointLabels></View>')


def pose_result(boxes, keypoints, shape=(100, 200)):
    import torch
    from ultralytics.engine.results import Results

    return Results(np.zeros((*shape, 3), np.uint8), "x.png", {0: "person", 1: "dog"},
                   boxes=torch.tensor(boxes, dtype=torch.float32), keypoints=torch.tensor(keypoints, dtype=torch.float32))


@pytest.mark.unit
def test_upstream_keypoint_config_is_read_with_its_box_control():
    specs = parse_label_controls(keypoint_config())
    assert len(specs) == 1  # the "<name>_bbox" rectangles go with the points, not served on their own
    spec = specs[0]
    assert (spec.task_type, spec.from_name, spec.point_threshold, spec.point_size) == ("keypoints", "keypoints", 0.5, 4.0)
    assert spec.points == (("nose", "person", 0), ("left_eye", "person", 1), ("right_eye", "person", 2))
    assert spec.boxes is not None and (spec.boxes.from_name, spec.boxes.labels) == ("keypoints_bbox", ("person",))
    assert spec.point_map({0: "person", 1: "dog"}) == {0: {0: "nose", 1: "left_eye", 2: "right_eye"}}
    assert spec.require_label_map({0: "person", 1: "dog"}) == {0: "person"}
    # training, prediction jobs and FiftyOne read it as the config's one control
    assert parse_label_config(keypoint_config()).kind.points


@pytest.mark.unit
def test_without_add_bboxes_the_box_control_is_served_on_its_own():
    specs = parse_label_controls(keypoint_config(' model_add_bboxes="false"'))
    assert [(s.from_name, s.task_type) for s in specs] == [("keypoints_bbox", "detection"), ("keypoints", "keypoints")]
    assert specs[1].boxes is None


@pytest.mark.unit
def test_a_point_without_predicted_values_maps_every_class():
    spec = parse_label_config(keypoint_config(points='<Label value="tip" model_index="3"/>', boxes=False))
    assert spec.point_map(["person", "dog"]) == {0: {3: "tip"}, 1: {3: "tip"}}


@pytest.mark.unit
@pytest.mark.parametrize("attrs, message", [
    (' model_point_threshold="2"', r"model_point_threshold must be in \[0, 1\]"),
    (' model_point_size="big"', r"model_point_size='big' is not a number"),
])
def test_bad_keypoint_attributes_are_clear_errors(attrs, message):
    with pytest.raises(LabelConfigError, match=message) as caught:
        parse_label_controls(keypoint_config(attrs))
    assert caught.value.http_status == 422


@pytest.mark.unit
@pytest.mark.parametrize("index, message", [("-1", r"model_index must be in \[0, 1000\)"),
                                            ("one", r"model_index='one' is not a whole number"),
                                            ("99999999999999999999", r"model_index must be in")])
def test_a_bad_model_index_names_the_label(index, message):
    points = f'<Label value="nose" predicted_values="person" model_index="{index}"/>'
    with pytest.raises(LabelConfigError, match=r'<Label value="nose"> of <KeyPointLabels name="keypoints">.*' + message):
        parse_label_controls(keypoint_config(points=points))


@pytest.mark.unit
def test_labels_without_model_index_say_what_to_add():
    spec = parse_label_config(keypoint_config(points='<Label value="nose"/>'))
    with pytest.raises(LabelConfigError, match=r'no <Label> maps a keypoint.*add model_index='):
        spec.require_label_map({0: "person"})


@pytest.mark.unit
def test_a_keypoint_control_needs_a_pose_model():
    spec = parse_label_config(keypoint_config())
    check_compatible(LoadedModel(None, Path("m.pt"), "base-pose", "pose", {0: "person"}), spec)
    with pytest.raises(LabelConfigError, match=r"needs a pose model, but base-det is a detect model"):
        check_compatible(LoadedModel(None, Path("m.pt"), "base-det", "detect", {0: "person"}), spec)


@pytest.mark.unit
def test_pose_results_become_points_under_a_hidden_box():
    spec = parse_label_config(keypoint_config())
    # a person kept (0.9), a person under the region threshold (0.3: hidden, still counted in the task score),
    # a dog (no point of the config belongs to it)
    boxes = [[20, 10, 60, 90, 0.9, 0], [100, 10, 140, 50, 0.3, 0], [150, 50, 190, 90, 0.8, 1]]
    points = [[[40, 20, 0.95], [35, 18, 0.4], [45, 18, 0.7]],
              [[120, 20, 0.9], [115, 18, 0.9], [125, 18, 0.9]],
              [[160, 60, 0.9], [170, 60, 0.9], [180, 60, 0.9]]]
    model_names = {0: "person", 1: "dog"}
    pred = _convert_keypoints(pose_result(boxes, points), ImagePrediction(width=200, height=100), spec,
                              spec.point_map(model_names), model_names, threshold=0.5, floor=0.05)
    assert pred.score == pytest.approx(0.9 * (1 - 0.3))  # keep/drop decisions over the mapped classes' boxes
    size = {"original_width": 200, "original_height": 100, "image_rotation": 0}
    assert prediction_result(pred, spec) == [
        {"id": "ll0", "from_name": "keypoints_bbox", "to_name": "image", "type": "rectanglelabels", "score": 0.9,
         "hidden": True, **size,
         "value": {"x": 10.0, "y": 10.0, "width": 20.0, "height": 80.0, "rotation": 0, "rectanglelabels": ["person"]}},
        {"id": "ll0-0", "from_name": "keypoints", "to_name": "image", "type": "keypointlabels", "score": 0.95, **size,
         "value": {"x": 20.0, "y": 20.0, "width": 2.0, "keypointlabels": ["nose"]}, "parentID": "ll0"},
        # left_eye (0.4) is under model_point_threshold 0.5: left out
        {"id": "ll0-1", "from_name": "keypoints", "to_name": "image", "type": "keypointlabels", "score": 0.7, **size,
         "value": {"x": 22.5, "y": 18.0, "width": 2.0, "keypointlabels": ["right_eye"]}, "parentID": "ll0"},
    ]
    # without the box control: the points alone, no parent
    bare = dataclasses.replace(spec, boxes=None)
    assert [item.get("parentID") for item in prediction_result(pred, bare)] == [None, None]


@pytest.mark.unit
def test_training_keypoints_is_refused_with_the_reason(tmp_path):
    from labelloop.core.registry import Registry
    from labelloop.workflows.pipeline import DatasetError, train_new_version

    with pytest.raises(DatasetError, match=r"serves keypoints from an ultralytics pose model.*does not train them"):
        train_new_version(Registry(tmp_path), 1, [], parse_label_config(keypoint_config()), None)


# -- a real pose model through /predict, and its answer in a real Label Studio --------------------------


@pytest.fixture(scope="module")
def pose_weights(tmp_path_factory) -> Path:
    """An ultralytics pose model (yolov8n-pose.yaml, 17 keypoints, class "person"), untrained, with the class
    bias of its coarsest scale raised so that it finds a few objects in any image (untrained, it finds none)."""
    from labelloop.core.yolo_env import import_yolo

    model = import_yolo()("yolov8n-pose.yaml")
    head = model.model.model[-1]
    for level, branch in enumerate(head.cv3):
        branch[-1].bias.data.fill_(8.0 if level == len(head.cv3) - 1 else -8.0)
    model.model.names = {0: "person"}
    path = tmp_path_factory.mktemp("pose") / "pose.pt"
    model.save(str(path))
    return path


@pytest.fixture(scope="module")
def keypoint_answers(tmp_path_factory, pose_weights, image_host, shapes_eval):
    """(config, tasks, /setup answer, /predict answers, the refused plain-rectangles answer) from an in-process
    backend whose LABELLOOP_BASE_MODEL is the pose model."""
    from fastapi.testclient import TestClient

    from labelloop.config import settings
    from labelloop.service.app import create_app

    home = tmp_path_factory.mktemp("keypoint-backend")
    env = dataclasses.replace(settings(), model_dir=home / "models", base_model=str(pose_weights),
                              allowed_hosts=(image_host.removeprefix("http://"),), cache_dir=home / "cache",
                              warm_start_steps=0)
    app = TestClient(create_app(env), raise_server_exceptions=False)
    config = keypoint_config(' model_score_threshold="0.5"')
    tasks = [{"id": 1 + k, "data": {"image": f"{image_host}/{image.file}"}} for k, image in enumerate(shapes_eval.images[:3])]
    setup = app.post("/setup", json={"project": "9", "schema": config})
    response = app.post("/predict", json={"tasks": tasks, "project": "9", "label_config": config})
    plain = ('<View><Image name="image" value="$image"/><RectangleLabels name="b" toName="image">'
             '<Label value="person"/></RectangleLabels></View>')
    refused = app.post("/predict", json={"tasks": tasks[:1], "project": "10", "label_config": plain})
    return config, tasks, setup, response, refused


def test_a_pose_base_model_answers_an_upstream_keypoint_config(keypoint_answers):
    config, tasks, setup, response, refused = keypoint_answers
    assert setup.status_code == 200, setup.text
    assert setup.json()["task_type"] == "keypoints"
    assert response.status_code == 200, response.text
    answers = response.json()["results"]
    assert len(answers) == len(tasks)
    for answer in answers:
        assert answer["model_version"] == "base-pose" and 0.0 <= answer["score"] <= 1.0
        boxes = {item["id"] for item in answer["result"] if item["type"] == "rectanglelabels"}
        points = [item for item in answer["result"] if item["type"] == "keypointlabels"]
        assert boxes and points, answer  # the raised bias makes it find people, each with its points
        assert {p["parentID"] for p in points} <= boxes
        assert {label for p in points for label in p["value"]["keypointlabels"]} <= {"nose", "left_eye", "right_eye"}
        assert all(0.0 <= p["value"][axis] <= 100.0 for p in points for axis in ("x", "y"))
    # a plain RectangleLabels is not answered from a pose model: a 422 that says why
    assert refused.status_code == 422 and "needs a detect or segment model, but base-pose is a pose model" in \
        refused.json()["error"], refused.text


def test_label_studio_stores_the_keypoint_answer(keypoint_answers, ls_api):
    """The /predict answer, imported into a real Label Studio 1.23.2 project with the same config, is stored
    as is."""
    config, tasks, _, response, _ = keypoint_answers
    answer = response.json()["results"][0]
    project = ls_api.create_project("keypoints", config)["id"]
    ls_api.request("POST", f"/api/projects/{project}/import", json=[{"data": tasks[0]["data"]}])
    task_id = ls_api.tasks(project)[0]["id"]
    assert ls_api.import_predictions(project, [{"task": task_id, "result": answer["result"], "score": answer["score"],
                                                "model_version": answer["model_version"]}]) == 1
    stored = [p for p in ls_api.predictions(project) if p["task"] == task_id]
    assert len(stored) == 1 and stored[0]["result"] == answer["result"]
    assert stored[0]["score"] == pytest.approx(answer["score"])
