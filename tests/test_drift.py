"""core.drift: incoming images compared with the training set's, in the served model's embedding space.

Unit tests use synthetic embeddings (a shifted batch is flagged, batches from the same distribution are
flagged no more often than the test's level); the engine test embeds real images with a real model: a
fresh batch of the same shapes is not flagged, the same batch with inverted colours is.
"""

from __future__ import annotations

import numpy as np
import pytest

from labelloop.core.drift import binomial_tail, drift_report, knn_distance


@pytest.mark.unit
def test_binomial_tail_and_knn_distance():
    assert binomial_tail(0, 10, 0.05) == 1.0
    assert binomial_tail(10, 10, 0.5) == pytest.approx(0.5**10)
    assert binomial_tail(1, 1, 0.05) == pytest.approx(0.05)
    ref = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 1.0]])
    assert knn_distance(ref, np.array([[3.0, 0.0]]), 1)[0] == pytest.approx(0.0)
    assert knn_distance(ref, np.array([[3.0, 4.0]]), 2)[0] == pytest.approx((4.0 + np.sqrt(18.0)) / 2)
    own = knn_distance(ref, ref, 1, exclude_self=True)  # each to its nearest other
    assert own == pytest.approx([1.0, 3.0, 1.0])


@pytest.mark.unit
def test_a_shifted_batch_is_flagged_and_its_farthest_listed():
    rng = np.random.default_rng(0)
    reference = rng.normal(0, 1, (300, 16)) + 3.0
    shifted = rng.normal(0, 1, (60, 16)) + 3.0
    shifted[:, :4] -= 6.0  # a new kind of image: far in a few directions
    report = drift_report(reference, shifted)
    assert report.drifted and report.share_beyond > 0.5 and report.p_value < 1e-6
    mixed = np.vstack([rng.normal(0, 1, (50, 16)) + 3.0, shifted[:10]])
    farthest = drift_report(reference, mixed).to_json(top=10, ids=list(range(100, 160)))["farthest"]
    assert {f["id"] for f in farthest} >= set(range(150, 160)) - {f["id"] for f in farthest[10:]}
    assert all(f["ratio"] > 1 for f in farthest[:8])


@pytest.mark.unit
def test_batches_from_the_same_distribution_are_rarely_flagged():
    rng = np.random.default_rng(1)
    reference = rng.normal(0, 1, (300, 16)) + 3.0
    flagged = [drift_report(reference, rng.normal(0, 1, (40, 16)) + 3.0, seed=s).drifted for s in range(40)]
    assert sum(flagged) <= 2, flagged  # the test's level is 1 %: 0.4 false alarms expected in 40 batches
    with pytest.raises(ValueError, match="at least 3 training images"):
        drift_report(reference[:2], reference)
    empty = drift_report(reference, np.zeros((0, 16)))
    assert not empty.drifted and empty.n_incoming == 0


def test_inverted_colours_drift_and_a_fresh_batch_does_not(simple_classifier, tmp_path):
    """Real images through a real model: the training images vs a fresh batch of the same generator (not
    flagged, in either view) and that batch with its colours inverted (flagged, in both)."""
    import cv2

    from labelloop.core.drift import drift_views
    from labelloop.core.predict import load_model
    from labelloop.dev.shapes import generate_shapes

    manifest, data, _ = simple_classifier
    home = tmp_path
    model = load_model(manifest.weights, manifest.version)
    fresh = generate_shapes(home / "fresh", n=40, seed=77, size=64, max_objects=1, style="simple")
    fresh_paths = [fresh.images_dir / im.file for im in fresh.images]
    inverted = []
    for path in fresh_paths:
        target = home / f"inverted-{path.name}"
        cv2.imwrite(str(target), 255 - cv2.imread(str(path)))
        inverted.append(target)
    reference = [data.images_dir / im.file for im in data.images]
    same = drift_views(model, reference, fresh_paths)
    shifted = drift_views(model, reference, inverted)
    assert not same["drifted"] and not any(v["drifted"] for v in same["views"].values()), same
    assert shifted["drifted"] and all(v["drifted"] for v in shifted["views"].values()), shifted
    assert shifted["views"]["model"]["share_beyond"] > 0.5 and shifted["views"]["pixels"]["share_beyond"] > 0.5
