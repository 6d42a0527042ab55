"""workflows.suspects: the served version's mislabel score of each human label, the task meta entry and the
suspects tab's choice (pure logic; tests/test_loop.py checks them in a real Label Studio, tests/test_demo.py
their quality on injected mistakes)."""

from __future__ import annotations

import math

import pytest

from labelloop.core import scoring
from labelloop.core.labelconfig import parse_label_config
from labelloop.core.predict import ImagePrediction, Region
from labelloop.core.truth import LabeledImage, TruthRegion
from labelloop.dev.shapes import label_config
from labelloop.workflows.suspects import META_KEY, mislabel_score, rank_suspects, task_meta

pytestmark = pytest.mark.unit


def test_classification_score_is_the_loss_of_the_human_label():
    spec = parse_label_config(label_config("classification"))
    pred = ImagePrediction(class_probs={"circle": 0.7, "square": 0.2, "triangle": 0.05, "star": 0.05})
    agrees, _ = mislabel_score(LabeledImage(1, "a", label="circle"), pred, spec)
    disagrees, _ = mislabel_score(LabeledImage(2, "a", label="square"), pred, spec)
    assert agrees == pytest.approx(-math.log(0.7)) and disagrees == pytest.approx(-math.log(0.2))
    # the cutoff: the model gives the human label less than one chance in two
    assert agrees < scoring.suspect_cutoff(True, 0.5) < disagrees


def test_detection_score_flags_a_wrong_class_in_image_fractions():
    spec = parse_label_config(label_config("detection"))
    # a 200 x 100 image: the human box (fractions) and the model's box (pixels) describe the same object
    truth = LabeledImage(1, "a", regions=(TruthRegion("square", (0.1, 0.2, 0.3, 0.6)),))
    seen = Region("circle", 0.9, 0, bbox=(20.0, 20.0, 40.0, 40.0))
    pred = ImagePrediction(width=200, height=100, candidates=[seen])
    score, flags = mislabel_score(truth, pred, spec, threshold=0.5)
    assert score == pytest.approx(0.9) and [f["kind"] for f in flags] == ["wrong_class"]
    agreeing = ImagePrediction(width=200, height=100, candidates=[Region("square", 0.9, 1, bbox=(20.0, 20.0, 40.0, 40.0))])
    assert mislabel_score(truth, agreeing, spec, threshold=0.5) == (0.0, [])


def test_suspects_are_above_the_cutoff_worst_first_and_bounded():
    spec = parse_label_config(label_config("classification"))
    scores = {10: 0.1, 11: 2.0, 12: 0.9, 13: math.log(2.0), 14: 0.5}
    assert rank_suspects(scores, spec) == [11, 12, 13]
    assert rank_suspects(scores, spec, size=2) == [11, 12]
    assert rank_suspects({}, spec) == []


def test_meta_keeps_the_users_keys_and_is_written_only_when_it_changes():
    task = {"id": 1, "meta": {"source": "camera-7", "labelloop": {"old": True}}}
    meta = task_meta(task, "p1-v2", 1.23456, True)
    assert meta == {"source": "camera-7", META_KEY: {"mislabel_score": 1.2346, "mislabel_suspect": True, "version": "p1-v2"}}
    assert task_meta({**task, "meta": meta}, "p1-v2", 1.23456, True) is None
    assert task_meta({"id": 2}, "p1-v2", 0.0, False) == {META_KEY: {"mislabel_score": 0.0, "mislabel_suspect": False,
                                                                    "version": "p1-v2"}}
    assert task_meta({"id": 3, "meta": "not a dict"}, "v", 0.0, False) == {META_KEY: {"mislabel_score": 0.0,
                                                                                      "mislabel_suspect": False,
                                                                                      "version": "v"}}


def test_a_human_label_survives_the_trip_to_another_worker():
    """Score chunks carry each task's truth as JSON to whichever worker takes them: it must come back equal."""
    import json

    from labelloop.core.truth import truth_from_json, truth_to_json

    region = TruthRegion("star", (0.1, 0.2, 0.3, 0.4), ((0.1, 0.2), (0.3, 0.2), (0.2, 0.4)))
    for truth in (LabeledImage(7, "11:2026-12-07T10:00:00Z", label="circle"),
                  LabeledImage(8, "12:2026-12-07T10:00:00Z", regions=(region, TruthRegion("square", (0.5, 0.5, 0.9, 0.9)))),
                  LabeledImage(9, "13:x", regions=())):
        assert truth_from_json(json.loads(json.dumps(truth_to_json(truth)))) == truth


def test_scores_leave_out_tasks_that_could_not_be_predicted():
    from labelloop.workflows.suspects import score_labeled

    spec = parse_label_config(label_config("classification"))
    probs = {"circle": 0.9, "square": 0.05, "triangle": 0.03, "star": 0.02}
    labeled = [({"id": i}, LabeledImage(i, "a", label=label)) for i, label in ((1, "circle"), (2, "star"), (3, "circle"))]
    scores = score_labeled(labeled, [ImagePrediction(class_probs=probs), ImagePrediction(class_probs=probs),
                                     ImagePrediction(error="image unreadable")], spec)
    assert scores == pytest.approx({1: -math.log(0.9), 2: -math.log(0.02)})
