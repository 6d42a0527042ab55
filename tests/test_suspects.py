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
from labelloop.workflows.suspects import META_KEY, meta_updates, mislabel_score, rank_suspects, with_entry

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


def test_an_entry_is_set_or_removed_and_the_users_keys_stay():
    entry = {"mislabel_score": 1.2346, "mislabel_suspect": True, "version": "p1-v2"}
    assert with_entry({"source": "camera-7", META_KEY: {"old": True}}, entry) == {"source": "camera-7", META_KEY: entry}
    assert with_entry({"source": "camera-7", META_KEY: entry}, None) == {"source": "camera-7"}
    assert with_entry(None, entry) == {META_KEY: entry} and with_entry("not a dict", None) == {}


def test_only_the_tabs_tasks_carry_an_entry():
    old = {"mislabel_score": 1.5, "mislabel_suspect": True, "version": "p1-v1"}
    tasks = {1: {"id": 1},  # a new suspect
             2: {"id": 2, "meta": {"source": "cam", META_KEY: old}},  # was a suspect, the new version agrees
             3: {"id": 3, "meta": {"source": "cam", META_KEY: old}},  # was a suspect, unlabeled now
             4: {"id": 4},  # the model agrees: no entry, no write
             5: {"id": 5, "meta": {META_KEY: {**old, "mislabel_suspect": False}}},  # an earlier labelloop's entry
             6: {"id": 6, "meta": {META_KEY: {**old, "mislabel_score": 2.0, "version": "p1-v2"}}},  # already says so
             7: {"id": 7, "meta": {META_KEY: old}}}  # labeled, but this job could not score it: left alone
    scores = {1: 2.54321, 2: 0.1, 4: 0.05, 5: 0.2, 6: 2.0}
    assert meta_updates(tasks, scores, [1, 6], "p1-v2", keep={7}) == {
        1: {"mislabel_score": 2.5432, "mislabel_suspect": True, "version": "p1-v2"}, 2: None, 3: None, 5: None}


def test_a_promotion_writes_a_bounded_number_of_tasks_whatever_the_projects_size():
    """Label Studio writes task meta one PATCH at a time: the writes must not grow with the labels."""
    import random

    from labelloop.workflows.suspects import SUSPECTS_SIZE, publish_suspects

    class Recorder:
        """Label Studio's side: the tasks' meta as it holds it, the writes and the tabs."""

        def __init__(self, tasks):
            self.tasks, self.writes, self.tabs = tasks, [], {}

        def task_metas(self, project_id, task_ids):
            return {i: self.tasks[i]["meta"] for i in task_ids if i in self.tasks}

        def set_task_meta(self, task_id, meta):
            self.writes.append(task_id)
            self.tasks[task_id] = {"id": task_id, "meta": meta}

        def put_tab(self, project_id, title, task_ids):
            self.tabs[title] = list(task_ids)

    spec = parse_label_config(label_config("classification"))
    rng = random.Random(0)
    client = Recorder({i: {"id": i, "meta": {"camera": i % 3}} for i in range(5000)})
    for version in ("p1-v1", "p1-v2", "p1-v3"):
        scores = {i: rng.expovariate(1.0) for i in client.tasks}  # each version disagrees elsewhere
        scores[7] = 50.0  # always the worst: its entry is rewritten for every version
        read = {i: dict(t) for i, t in client.tasks.items()}  # what the job read ...
        client.tasks[7] = {"id": 7, "meta": {**client.tasks[7]["meta"], "checked": version}}  # ... then a user edit
        client.writes.clear()
        counts = publish_suspects(client, 1, spec, version, read, scores)
        tab = client.tabs["labelloop: mislabel suspects"]
        assert len(tab) == SUSPECTS_SIZE and counts["meta_written"] == len(client.writes) <= 2 * SUSPECTS_SIZE
        with_entries = {i for i, t in client.tasks.items() if META_KEY in t["meta"]}
        assert with_entries == set(tab)  # after every promotion the entries say exactly what the tab shows
        assert all(client.tasks[i]["meta"][META_KEY] == {"mislabel_score": round(scores[i], 4), "mislabel_suspect": True,
                                                         "version": version} for i in tab)
        assert all(t["meta"]["camera"] == i % 3 for i, t in client.tasks.items())  # the user's keys stay
        assert 7 in client.writes and client.tasks[7]["meta"]["checked"] == version  # an edit made meanwhile is kept


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
