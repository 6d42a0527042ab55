"""The promotion gate: a drop inside the tuning split's noise promotes, a larger one keeps the version out."""

import math

import pytest

from labelloop.core import gate

pytestmark = pytest.mark.unit  # pure logic, no server: `make test-fast`


def test_one_image_worse_on_a_small_split_is_noise():
    # 40 tuning images, 0.975 in service: one image fewer right (0.95) is within noise.
    assert gate.should_promote(0.95, 0.975, 40)


def test_a_clear_drop_keeps_the_new_version_out():
    assert not gate.should_promote(0.85, 0.975, 40)
    assert not gate.should_promote(0.70, 0.80, 40)


def test_tolerance_shrinks_with_the_split_and_is_capped():
    small, large = gate.tolerance(0.9, 40), gate.tolerance(0.9, 4000)
    assert small > large
    assert large == pytest.approx(math.sqrt(0.9 * 0.1 / 4000))
    assert gate.tolerance(0.5, 10) == gate.MAX_TOLERANCE
    # a perfect old version still tolerates one image (a tie in all but one item)
    assert gate.tolerance(1.0, 50) == pytest.approx(1 / 50)


def test_no_tuning_images_means_no_tolerance():
    assert gate.tolerance(0.9, 0) == 0.0
    assert gate.should_promote(0.9, 0.9, 0)
    assert not gate.should_promote(0.89, 0.9, 0)


def test_better_or_equal_always_promotes():
    for n in (1, 10, 1000):
        assert gate.should_promote(0.9, 0.9, n)
        assert gate.should_promote(0.95, 0.9, n)
