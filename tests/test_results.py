"""Label Studio result JSON ⇄ the engine's labels (labelloop.labelstudio.results): what we write reads
back as the same regions, percent ⇄ fraction in one place, and foreign or broken items are left out."""

from __future__ import annotations

import pytest

from labelloop.core.labelconfig import parse_label_config
from labelloop.core.predict import ImagePrediction, Region
from labelloop.dev.shapes import label_config
from labelloop.labelstudio.results import labeled_image, labeled_images, prediction_result

pytestmark = pytest.mark.unit  # pure logic, no server: `make test-fast`


def as_annotated(result, task_id=1, annotation_id=9):
    return {"id": task_id, "annotations": [{"id": annotation_id, "updated_at": "2026-11-23T00:00:00Z", "result": result}]}


def test_a_box_we_write_reads_back_as_the_same_box():
    spec = parse_label_config(label_config("detection"))
    pred = ImagePrediction(width=200, height=100, regions=[Region(spec.labels[0], 0.8, 0, bbox=(20.0, 10.0, 50.0, 40.0))])
    result = prediction_result(pred, spec)
    assert result[0]["type"] == "rectanglelabels" and result[0]["value"]["x"] == 10.0 and result[0]["value"]["height"] == 40.0
    truth = labeled_image(as_annotated(result), spec)
    assert truth.annotation == "9@2026-11-23T00:00:00Z"
    (region,) = truth.regions
    assert region.label == spec.labels[0]
    assert region.box == pytest.approx((0.10, 0.10, 0.35, 0.50))


def test_a_polygon_we_write_reads_back_in_image_fractions():
    spec = parse_label_config(label_config("segmentation"))
    outline = [(10.0, 10.0), (90.0, 10.0), (50.0, 80.0)]
    region = Region(spec.labels[1], 0.7, 1, bbox=(10, 10, 80, 70), polygon=outline)
    pred = ImagePrediction(width=100, height=100, regions=[region])
    (region,) = labeled_image(as_annotated(prediction_result(pred, spec)), spec).regions
    assert [c for point in region.polygon for c in point] == pytest.approx([0.1, 0.1, 0.9, 0.1, 0.5, 0.8])
    assert region.box == pytest.approx((0.1, 0.1, 0.9, 0.8))


def test_classification_reads_our_choice_and_skips_tasks_without_one():
    spec = parse_label_config(label_config("classification"))
    pred = ImagePrediction(width=64, height=64, regions=[Region(spec.labels[2], 0.9, 2)])
    tasks = [as_annotated(prediction_result(pred, spec), task_id=1),
             as_annotated([{"from_name": spec.from_name, "value": {"choices": ["not a label"]}}], task_id=2),
             {"id": 3, "annotations": []}]
    images = labeled_images(tasks, spec)
    assert [(i.task_id, i.label) for i in images] == [(1, spec.labels[2])]


def test_foreign_and_degenerate_regions_are_left_out_but_the_image_still_counts():
    spec = parse_label_config(label_config("detection"))
    result = [
        {"from_name": "another_control", "value": {"x": 1, "y": 1, "width": 5, "height": 5, "rectanglelabels": [spec.labels[0]]}},
        {"from_name": spec.from_name, "value": {"x": 1, "y": 1, "width": 5, "height": 5, "rectanglelabels": ["unknown"]}},
        {"from_name": spec.from_name, "value": {"x": 120, "y": 1, "width": 5, "height": 5, "rectanglelabels": [spec.labels[0]]}},
    ]
    truth = labeled_image(as_annotated(result), spec)
    assert truth is not None and truth.regions == ()  # an image with nothing of ours in it: a negative


def test_first_label_reads_the_controls_own_result_type():
    from labelloop.core.labelconfig import parse_label_config
    from labelloop.dev.shapes import label_config
    from labelloop.labelstudio.results import first_label

    boxes = parse_label_config(label_config("detection"))
    result = [{"type": "rectanglelabels", "value": {"x": 1, "y": 1, "width": 5, "height": 5,
                                                    "rectanglelabels": ["star"]}}]
    assert first_label(result, boxes) == "star"
    assert first_label([], boxes) == "" and first_label(None, boxes) == ""
    choices = parse_label_config(label_config("classification"))
    assert first_label(result, choices) == ""  # another control's regions are not this one's
    assert first_label([{"value": {"choices": ["circle"]}}], choices) == "circle"
