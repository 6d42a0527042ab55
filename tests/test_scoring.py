"""Task scores: what a number means (see scoring.py)."""

import pytest

from labelloop.core import scoring

pytestmark = pytest.mark.unit  # pure logic, no server: `make test-fast`


def test_hidden_doubtful_box_lowers_the_score():
    # Upstream averages shown boxes only: both images would score 0.95. Ours sees the hidden 0.45.
    confident_only = scoring.detection_task_score([0.95], threshold=0.5)
    with_hidden_doubt = scoring.detection_task_score([0.95, 0.45], threshold=0.5)
    assert confident_only == pytest.approx(0.95)
    assert with_hidden_doubt == pytest.approx(0.95 * 0.55)
    assert with_hidden_doubt < confident_only


def test_confidently_absent_candidates_barely_matter_and_empty_is_certain():
    assert scoring.detection_task_score([], threshold=0.5) == 1.0
    assert scoring.detection_task_score([0.01, 0.02], threshold=0.5) == 1.0  # under the floor
    assert scoring.detection_task_score([0.06], threshold=0.5) == pytest.approx(0.94)


def test_threshold_decides_which_side_is_right():
    # At threshold 0.25 a 0.3 box is kept: right with probability 0.3, not 0.7.
    assert scoring.detection_task_score([0.3], threshold=0.25) == pytest.approx(0.3)
    assert scoring.detection_task_score([0.3], threshold=0.5) == pytest.approx(0.7)


def test_classification_scores_and_uncertainties():
    assert scoring.classification_task_score([0.7, 0.2, 0.1]) == pytest.approx(0.7)
    assert scoring.classification_task_score([2, 1, 1]) == pytest.approx(0.5)  # renormalized
    assert scoring.least_confidence([0.7, 0.2, 0.1]) == pytest.approx(0.3)
    assert scoring.margin_uncertainty([0.5, 0.5]) == pytest.approx(1.0)
    assert scoring.margin_uncertainty([0.9, 0.1]) == pytest.approx(0.2)
    assert scoring.entropy_uncertainty([0.25] * 4) == pytest.approx(1.0)
    assert scoring.entropy_uncertainty([1.0, 0.0, 0.0]) == pytest.approx(0.0)
    ordered = sorted([[0.9, 0.1], [0.6, 0.4], [0.5, 0.5]], key=scoring.entropy_uncertainty)
    assert ordered == [[0.9, 0.1], [0.6, 0.4], [0.5, 0.5]]

