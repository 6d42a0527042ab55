"""core.acquisition: uncertainty picks only once the served model's uncertainty is trusted."""

import pytest

from labelloop.core.acquisition import EXPLORE_BELOW, next_to_label, uncertainty_is_trusted

pytestmark = pytest.mark.unit


def test_a_good_model_picks_the_most_uncertain_first():
    picks, mode = next_to_label([0.1, 0.9, 0.5, 0.7], 2, tuning_accuracy=0.95)
    assert (picks, mode) == ([1, 3], "uncertainty")


def test_no_model_or_a_weak_one_explores_at_random_reproducibly():
    uncertainty = [i / 100 for i in range(100)]
    for accuracy in (None, 0.0, EXPLORE_BELOW - 0.01):
        picks, mode = next_to_label(uncertainty, 10, tuning_accuracy=accuracy, seed=3)
        assert mode == "explore" and len(set(picks)) == 10 and all(0 <= i < 100 for i in picks)
        assert picks != list(range(90, 100))[::-1], "not the uncertainty order"
        assert picks == next_to_label(uncertainty, 10, tuning_accuracy=accuracy, seed=3)[0]
    assert next_to_label(uncertainty, 10, None, seed=4)[0] != next_to_label(uncertainty, 10, None, seed=3)[0]


def test_the_threshold_and_small_pools():
    assert not uncertainty_is_trusted(None) and uncertainty_is_trusted(EXPLORE_BELOW)
    assert next_to_label([0.3, 0.2], 5, tuning_accuracy=0.9) == ([0, 1], "uncertainty")
    assert sorted(next_to_label([0.3, 0.2], 5, tuning_accuracy=0.1)[0]) == [0, 1]
    assert next_to_label([], 3, None) == ([], "explore")


def test_balanced_picks_take_turns_over_predicted_classes():
    from labelloop.core.acquisition import balanced_by_prediction

    uncertainty = [0.9, 0.8, 0.7, 0.6, 0.5, 0.1]
    predicted = ["a", "a", "a", "a", "b", "c"]
    # plain least-confidence would take four "a" first; in turns each predicted class gets its share
    assert balanced_by_prediction(uncertainty, predicted, 3) == [0, 4, 5]
    assert balanced_by_prediction(uncertainty, predicted, 6) == [0, 4, 5, 1, 2, 3]
    assert next_to_label(uncertainty, 3, 0.9, predicted=predicted) == ([0, 4, 5], "uncertainty")
    with pytest.raises(ValueError):
        balanced_by_prediction([0.1, 0.2], ["a"], 1)
