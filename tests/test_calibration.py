"""Temperature scaling (pure numpy): recovers a known temperature, never changes the top class."""

import numpy as np
import pytest

from labelloop.core.calibration import (
    MIN_IMAGES,
    apply_temperature,
    calibration_report,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
)

pytestmark = pytest.mark.unit  # pure logic, no server: `make test-fast`


def _miscalibrated(distortion: float, n: int = 2000, k: int = 4, seed: int = 0):
    """Labels drawn from softmax(z); the model reports softmax(z * distortion) (> 1: overconfident)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, k)) * 2.0
    true = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(k, p=p) for p in true])
    reported = np.exp(logits * distortion)
    return reported / reported.sum(1, keepdims=True), labels


@pytest.mark.parametrize("distortion", [0.5, 1.0, 2.5])
def test_fit_recovers_the_temperature_and_lowers_nll(distortion):
    probs, labels = _miscalibrated(distortion)
    fitted = fit_temperature(probs, labels)
    assert fitted == pytest.approx(distortion, rel=0.15)  # softmax(log p / T) undoes the distortion
    report = calibration_report(probs, labels)
    assert report["nll_after"] <= report["nll_before"] + 1e-9
    if distortion != 1.0:  # a miscalibrated model gets visibly better calibrated
        assert report["ece_after"] < report["ece_before"] - 0.02


def test_temperature_never_changes_the_top_class():
    probs, _ = _miscalibrated(3.0, n=300)
    for t in (0.1, 0.7, 4.0):
        assert (apply_temperature(probs, t).argmax(1) == probs.argmax(1)).all()
    assert np.allclose(apply_temperature(probs, 1.0), probs, atol=1e-6)


def test_too_few_images_leave_the_model_as_it_is():
    probs, labels = _miscalibrated(3.0, n=MIN_IMAGES - 1)
    assert fit_temperature(probs, labels) == 1.0


def test_measures_mean_what_they_say():
    perfect = np.eye(3)[[0, 1, 2, 0]]
    assert negative_log_likelihood(perfect, [0, 1, 2, 0]) == pytest.approx(0.0, abs=1e-6)
    assert negative_log_likelihood(np.full((2, 4), 0.25), [0, 3]) == pytest.approx(np.log(4))
    assert expected_calibration_error(perfect, [0, 1, 2, 0]) == pytest.approx(0.0, abs=1e-6)
    assert expected_calibration_error(perfect, [1, 1, 2, 0]) == pytest.approx(0.25)
