"""Label Studio annotations → labeled images → ultralytics datasets; the deterministic split."""

from pathlib import Path

import pytest
from PIL import Image

from labelloop.core.datasets import DatasetError, build_dataset, split_of
from labelloop.core.labelconfig import parse_label_config
from labelloop.dev.shapes import label_config
from labelloop.labelstudio.results import labeled_images, latest_human_annotation, rectangle_to_polygon

pytestmark = pytest.mark.unit  # pure logic, no server: `make test-fast`


def test_split_is_stable_and_about_one_fifth():
    first = [split_of(i) for i in range(1, 2001)]
    assert first == [split_of(i) for i in range(1, 2001)]
    share = first.count("val") / len(first)
    assert 0.17 < share < 0.23
    # growing the project never moves an existing task
    assert [split_of(i) for i in range(1, 101)] == first[:100]


def test_latest_annotation_wins_and_cancelled_ones_are_ignored():
    task = {"annotations": [
        {"id": 1, "updated_at": "2026-01-01T00:00:00Z", "result": ["old"]},
        {"id": 2, "updated_at": "2026-02-01T00:00:00Z", "result": ["new"]},
        {"id": 3, "updated_at": "2026-03-01T00:00:00Z", "result": [], "was_cancelled": True},
    ]}
    assert latest_human_annotation(task)["id"] == 2
    assert latest_human_annotation({"annotations": [{"id": 4, "was_cancelled": True}]}) is None


def test_rotated_rectangle_corners():
    corners = rectangle_to_polygon({"x": 10, "y": 10, "width": 20, "height": 10, "rotation": 90})
    assert corners[0] == pytest.approx((10, 10))
    assert corners[1] == pytest.approx((10, 30))
    assert corners[2] == pytest.approx((0, 30))


@pytest.fixture
def images(tmp_path):
    paths = {}
    for task_id in range(1, 21):
        path = tmp_path / "src" / f"{task_id}.png"
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (100, 50)).save(path)
        paths[task_id] = path
    return paths


def rect(label, x, y, w, h, rotation=0):
    return {"from_name": "label", "to_name": "image", "type": "rectanglelabels",
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": rotation, "rectanglelabels": [label]}}


def test_detection_dataset_files(tmp_path, images):
    spec = parse_label_config(label_config("detection", classes=("cat", "dog")))
    tasks = [{"id": i, "data": {"image": f"/data/upload/1/{i}.png"},
              "annotations": [{"id": i, "result": [rect("dog", 10, 20, 30, 40)]}]} for i in images]
    tasks.append({"id": 99, "data": {"image": "x"}, "annotations": []})  # unlabeled: left out
    tasks.append({"id": 98, "data": {"image": "x"}, "annotations": [{"id": 5, "result": []}]})  # no image fetched
    info = build_dataset(labeled_images(tasks, spec), spec, images, tmp_path / "ds")
    assert info.counts["train"] + info.counts["val"] == 20
    assert info.counts["val"] >= 1 and info.counts["per_class"] == {"dog": 20}
    assert set(info.task_ids["val"]) == {i for i in images if split_of(i) == "val"} or len(info.task_ids["val"]) == 1
    some_id = info.task_ids["train"][0]
    line = (tmp_path / "ds" / "labels" / "train" / f"{some_id}.txt").read_text().split()
    assert line[0] == "1"  # dog is class 1 in config order
    assert [float(v) for v in line[1:]] == pytest.approx([0.25, 0.40, 0.30, 0.40])
    assert (tmp_path / "ds" / "images" / "train" / f"{some_id}.png").exists()
    assert "names:\n  0: 'cat'\n  1: 'dog'" in Path(info.data).read_text()


def test_segmentation_and_classification_layouts(tmp_path, images):
    seg = parse_label_config(label_config("segmentation", classes=("cat", "dog")))
    poly = {"from_name": "label", "to_name": "image", "type": "polygonlabels",
            "value": {"points": [[10, 10], [50, 10], [50, 60]], "polygonlabels": ["cat"]}}
    tasks = [{"id": i, "data": {}, "annotations": [{"id": i, "result": [poly]}]} for i in images]
    info = build_dataset(labeled_images(tasks, seg), seg, images, tmp_path / "seg")
    some_id = info.task_ids["train"][0]
    values = (tmp_path / "seg" / "labels" / "train" / f"{some_id}.txt").read_text().split()
    assert values[0] == "0" and [float(v) for v in values[1:]] == pytest.approx([0.1, 0.1, 0.5, 0.1, 0.5, 0.6])

    cls = parse_label_config(label_config("classification", classes=("cat", "dog")))
    choice = lambda label: {"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [label]}}
    tasks = [{"id": i, "data": {}, "annotations": [{"id": i, "result": [choice("cat" if i % 2 else "dog")]}]}
             for i in images]
    info = build_dataset(labeled_images(tasks, cls), cls, images, tmp_path / "cls")
    for split in ("train", "val"):
        assert {p.name for p in (tmp_path / "cls" / split).iterdir()} == {"cat", "dog"}
    assert sum(info.counts["per_class"].values()) == 20


def test_too_few_labels_is_a_clear_error(tmp_path, images):
    spec = parse_label_config(label_config("detection", classes=("cat",)))
    tasks = [{"id": 1, "data": {}, "annotations": [{"id": 1, "result": []}]}]
    with pytest.raises(DatasetError, match="need at least 2"):
        build_dataset(labeled_images(tasks, spec), spec, images, tmp_path / "ds")


def test_costly_classes_are_repeated_in_training_only(tmp_path, images):
    """Up-weighting (costs with ``upweight``): a costly label's training images are written that many times,
    the tuning split once; boxes take their costliest region's repeat."""
    from labelloop.core import modeltests

    costs = modeltests.parse_costs({"classes": {"dog": 10, "cat": 2}, "confusions": {"cat->dog": 3}},
                                   ("cat", "dog", "fox"))
    assert modeltests.training_repeats(costs, ("cat", "dog", "fox")) == {"cat": 3, "dog": 4}  # 10x capped at 4
    off = modeltests.parse_costs({"classes": {"dog": 10}, "upweight": False})
    assert modeltests.training_repeats(off, ("cat", "dog")) == {} and off.to_json()["upweight"] is False
    assert modeltests.training_repeats(modeltests.parse_costs({"default": 3}), ("cat", "dog")) == {}
    cls = parse_label_config(label_config("classification", classes=("cat", "dog")))
    choice = lambda label: {"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [label]}}
    tasks = [{"id": i, "data": {}, "annotations": [{"id": i, "result": [choice("cat" if i % 2 else "dog")]}]}
             for i in images]
    info = build_dataset(labeled_images(tasks, cls), cls, images, tmp_path / "cls", repeats={"dog": 3})
    train_dogs = [i for i in info.task_ids["train"] if i % 2 == 0]
    assert len(list((tmp_path / "cls" / "train" / "dog").iterdir())) == 3 * len(train_dogs)
    val_dogs = [i for i in info.task_ids["val"] if i % 2 == 0]
    assert len(list((tmp_path / "cls" / "val" / "dog").iterdir())) == len(val_dogs)
    assert info.counts["train_files"] == info.counts["train"] + 2 * len(train_dogs)
    assert info.counts["per_class"] == {"cat": 10, "dog": 10}  # labels counted once

    det = parse_label_config(label_config("detection", classes=("cat", "dog")))
    tasks = [{"id": i, "data": {}, "annotations": [{"id": i, "result": [rect("cat", 1, 1, 5, 5)] +
                                                    ([rect("dog", 50, 20, 30, 40)] if i % 2 == 0 else [])}]}
             for i in images]
    info = build_dataset(labeled_images(tasks, det), det, images, tmp_path / "det", repeats={"dog": 2})
    some_dog = next(i for i in info.task_ids["train"] if i % 2 == 0)
    assert (tmp_path / "det" / "labels" / "train" / f"{some_dog}-r1.txt").read_text() == \
        (tmp_path / "det" / "labels" / "train" / f"{some_dog}.txt").read_text()
    assert info.counts["train_files"] == info.counts["train"] + sum(1 for i in info.task_ids["train"] if i % 2 == 0)
