"""Negative correction (issue 12, item 3): rough labels in the task data held against the model's output.

Unit tests: reading rough labels from untrusted task data, the miss score, and the ranking of a project's
predicted tasks (the e2e test in test_loop.py writes the tab through a real Label Studio and worker;
bench/negative_correction.py measures precision@k against the model's own uncertainty and random order).
"""

from __future__ import annotations

import pytest

from labelloop.core.labelconfig import parse_label_config
from labelloop.core.negatives import RoughLabels, miss_score, rough_labels
from labelloop.dev.shapes import label_config
from labelloop.workflows.misses import rank_misses, shown_labels

pytestmark = pytest.mark.unit
LABELS = ("circle", "square", "triangle", "star")


def test_rough_labels_are_read_from_untrusted_task_data():
    assert rough_labels({"contains": ["star", "dog", 3], "counts": {"circle": 2, "star": -1, "square": True}}, LABELS) \
        == RoughLabels(frozenset({"star"}), {"circle": 2})
    assert rough_labels({"contains": "star, circle"}, LABELS).contains == frozenset({"star", "circle"})
    assert not rough_labels({"image": "x.png"}, LABELS).given and not rough_labels("nope", LABELS).given
    assert rough_labels({"contains": []}, LABELS).given  # "nothing of ours in it" is a rough label too
    assert len(rough_labels({"counts": {f"l{i}": 1 for i in range(10**5)}}, LABELS).counts) == 0


def test_the_miss_score_counts_what_disagrees():
    counts = RoughLabels(counts={"circle": 2, "star": 1})
    assert miss_score(["circle", "circle", "star"], counts) == (0.0, {})
    score, details = miss_score(["circle"], counts)
    assert score == 2.0 and details == {"missing": {"circle": 1, "star": 1}, "not_there": {}}
    contains = RoughLabels(contains=frozenset({"star"}))
    assert miss_score(["star", "star"], contains) == (0.0, {})  # "contains" says nothing about how many
    assert miss_score(["square"], contains)[1] == {"missing": {"star": 1}, "not_there": {"square": 1}}
    blind, near = miss_score([], contains)[0], miss_score([], contains, evidence=0.45)[0]
    assert blind > near > 0  # a miss the model nearly saw ranks below one it never saw
    assert miss_score(["star"], RoughLabels()) == (0.0, {})


def test_a_projects_misses_are_ranked_worst_first():
    spec = parse_label_config(label_config("detection"))

    def box(label):
        return {"from_name": "label", "type": "rectanglelabels", "value": {"rectanglelabels": [label]}}

    tasks = [{"id": 1, "data": {"counts": {"star": 3}}}, {"id": 2, "data": {"contains": ["circle"]}},
             {"id": 3, "data": {"contains": ["circle"]}}, {"id": 4, "data": {}}, {"id": 5, "data": {"counts": {"star": 1}}}]
    results = {1: [box("star")], 2: [box("circle")], 3: [], 4: [], 5: []}
    assert shown_labels(results[1] + [{"from_name": "other", "value": {"rectanglelabels": ["x"]}}], spec) == ["star"]
    assert [(t, s) for t, s, _ in rank_misses(tasks, results, spec)] == [(1, 2.0), (3, 1.0), (5, 1.0)]
    classification = parse_label_config(label_config("classification"))
    chose = [{"from_name": "label", "type": "choices", "value": {"choices": ["square"]}}]
    assert [t for t, _, _ in rank_misses([{"id": 9, "data": {"contains": "star"}}], {9: chose}, classification)] == [9]
