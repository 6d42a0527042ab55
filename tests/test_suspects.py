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
from labelloop.workflows.suspects import META_KEY, meta_updates, mislabel_score, rank_suspects, task_meta

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


def test_only_the_tabs_tasks_and_those_leaving_it_are_written():
    old = {"mislabel_score": 1.5, "mislabel_suspect": True, "version": "p1-v1"}
    tasks = {1: {"id": 1},  # a new suspect
             2: {"id": 2, "meta": {"source": "cam", META_KEY: old}},  # was a suspect, the new version agrees
             3: {"id": 3, "meta": {"source": "cam", META_KEY: old}},  # was a suspect, unlabeled now
             4: {"id": 4},  # the model agrees: no entry, no write
             5: {"id": 5, "meta": {META_KEY: {**old, "mislabel_suspect": False}}},  # an old entry that says no
             6: {"id": 6, "meta": {META_KEY: {**old, "mislabel_score": 2.0, "version": "p1-v2"}}}}  # already says so
    scores = {1: 2.5, 2: 0.1, 4: 0.05, 5: 0.2, 6: 2.0}
    updates = meta_updates(tasks, scores, [1, 6], "p1-v2")
    assert updates == {
        1: {META_KEY: {"mislabel_score": 2.5, "mislabel_suspect": True, "version": "p1-v2"}},
        2: {"source": "cam", META_KEY: {"mislabel_score": 0.1, "mislabel_suspect": False, "version": "p1-v2"}},
        3: {"source": "cam"},  # labelloop's entry gone, the user's key kept
    }


def test_a_promotion_writes_a_bounded_number_of_tasks_whatever_the_projects_size():
    """Label Studio writes task meta one PATCH at a time: the writes must not grow with the labels."""
    import random

    from labelloop.workflows.suspects import SUSPECTS_SIZE, publish_suspects

    class Recorder:
        def __init__(self):
            self.metas, self.tabs = {}, {}

        def set_task_meta(self, task_id, meta):
            self.metas[task_id] = meta

        def put_tab(self, project_id, title, task_ids):
            self.tabs[title] = list(task_ids)

    spec = parse_label_config(label_config("classification"))
    rng = random.Random(0)
    tasks = {i: {"id": i} for i in range(5000)}
    client = Recorder()
    for version in ("p1-v1", "p1-v2", "p1-v3"):
        scores = {i: rng.expovariate(1.0) for i in tasks}  # each version disagrees elsewhere
        client.metas.clear()
        counts = publish_suspects(client, 1, spec, version, tasks, scores)
        tab = client.tabs["labelloop: mislabel suspects"]
        assert len(tab) == SUSPECTS_SIZE and counts["meta_written"] == len(client.metas) <= 2 * SUSPECTS_SIZE
        for task_id, meta in client.metas.items():
            tasks[task_id] = {"id": task_id, "meta": meta}
        flagged = {i for i, t in tasks.items() if (t.get("meta") or {}).get(META_KEY, {}).get("mislabel_suspect")}
        assert flagged == set(tab)  # after every promotion the flags say exactly what the tab shows
        assert all(tasks[i]["meta"][META_KEY]["version"] == version for i in tab)


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
