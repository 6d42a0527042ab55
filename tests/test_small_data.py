"""The small-data recipe, end to end through the engine with its own settings (nothing forced), on
the demo's data: 64 px 'simple' shapes with 10 % wrong labels, a clean held-out test set.

Asserted against plain baselines trained on the same images in the same test, with margin:
HOG + logistic regression and a plain-torch tiny CNN (``labelloop.dev.baselines``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from labelloop.core.labelconfig import parse_label_config
from labelloop.core.predict import load_model, predict_images
from labelloop.core.registry import Registry
from labelloop.dev import baselines
from labelloop.dev.shapes import flip_image_labels, generate_shapes, label_config, to_label_studio_tasks
from labelloop.labelstudio.media import LocalFileFetcher
from labelloop.workflows.pipeline import train_new_version

SEEDS = (1, 2)
LABELS = 160  # what `labelloop demo --quick` gives the model


@pytest.fixture(scope="module")
def spec():
    return parse_label_config(label_config("classification"))


@pytest.mark.slow
def test_engine_beats_plain_baselines_on_few_noisy_labels(spec, tmp_path, run_home):
    test = generate_shapes(tmp_path / "test", n=100, seed=909, size=64, max_objects=1, style="simple")
    test_paths, test_labels = [test.images_dir / im.file for im in test.images], [im.label for im in test.images]
    ours, cnn, hog = [], [], []
    for seed in SEEDS:
        pool = generate_shapes(tmp_path / f"pool{seed}", n=LABELS, seed=700 + seed, size=64, max_objects=1,
                               style="simple")
        noisy, _ = flip_image_labels(pool, 0.1, seed)
        registry = Registry(tmp_path / f"models{seed}")
        outcome = train_new_version(registry, seed, to_label_studio_tasks(pool, "classification", labels=noisy),
                                    spec, LocalFileFetcher())
        manifest = outcome.manifest
        # the architecture and schedule were chosen from the data and are recorded for the analyst
        assert manifest.settings["recipe"]["architecture"] == "labelloop-cls-small.yaml"
        assert manifest.settings["imgsz"] == 64 and manifest.calibration["on"] == "tuning split"
        model = load_model(manifest.weights, manifest.version)
        preds = predict_images(model, test_paths, spec, 0.5)
        ours.append(float(np.mean([p.regions[0].label == y for p, y in zip(preds, test_labels)])))
        paths = [pool.images_dir / im.file for im in pool.images]
        cnn.append(baselines.tiny_cnn_accuracy(paths, noisy, test_paths, test_labels, seed=seed))
        hog.append(baselines.hog_logreg_accuracy(paths, noisy, test_paths, test_labels))
    print(json.dumps({"ours": ours, "tiny_cnn": cnn, "hog_lr": hog}))
    assert min(ours) >= 0.85, f"the engine on {LABELS} noisy labels: {ours}"
    assert np.mean(ours) >= np.mean(cnn) + 0.05, f"ours {ours} vs tiny CNN {cnn}"
    assert min(ours) >= max(hog) + 0.2, f"ours {ours} vs HOG + logistic regression {hog}"


def test_calibrated_scores_are_stored_and_used(spec, tmp_path, run_home):
    """The temperature fitted on the tuning split is in the manifest and applied when the version serves."""
    pool = generate_shapes(tmp_path / "pool", n=80, seed=31, size=64, max_objects=1, style="simple")
    registry = Registry(tmp_path / "models")
    manifest = train_new_version(registry, "cal", to_label_studio_tasks(pool, "classification"), spec,
                                 LocalFileFetcher()).manifest
    calibration = manifest.calibration
    assert calibration["images"] >= 10 and 0.05 <= calibration["temperature"] <= 20
    assert calibration["nll_after"] <= calibration["nll_before"] + 1e-6
    served = load_model(manifest.weights, manifest.version)
    assert served.temperature == pytest.approx(calibration["temperature"])
    image = [pool.images_dir / pool.images[0].file]
    calibrated = predict_images(served, image, spec, 0.5)[0]
    served.temperature = 1.0
    try:
        raw = predict_images(served, image, spec, 0.5)[0]
    finally:
        served.temperature = calibration["temperature"]
    assert calibrated.regions[0].label == raw.regions[0].label  # calibration never changes the answer
    if abs(calibration["temperature"] - 1.0) > 0.05:
        assert max(abs(calibrated.class_probs[c] - raw.class_probs[c]) for c in raw.class_probs) > 1e-4
    # test-time augmentation: the mean of the calibrated probabilities over the four views
    import cv2

    original = cv2.imread(str(image[0]))
    views = [original, original[:, ::-1], original[::-1], np.rot90(original)]
    view_paths = []
    for k, view in enumerate(views):
        view_paths.append(tmp_path / f"view{k}.png")
        cv2.imwrite(str(view_paths[-1]), np.ascontiguousarray(view))
    separately = predict_images(served, view_paths, spec, 0.5)
    augmented = predict_images(served, image, spec, 0.5, tta=True)[0]
    for label in augmented.class_probs:
        expected = np.mean([p.class_probs[label] for p in separately])
        assert augmented.class_probs[label] == pytest.approx(expected, abs=1e-4)
    assert augmented.score == pytest.approx(max(augmented.class_probs.values()), abs=1e-6)
