"""The classification path feeds decoded batches to the model (core/predict.py ``_classify``) instead of calling
ultralytics' ``predict``: it must give the same probabilities as ``predict`` on the same files — images at the
model's size (which skip the resize), other sizes, grey and RGBA files, after an ``embed`` call (which leaves
the predictor set up for embeddings), and with the four views of test-time augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def classifier(trained, shapes_single, tmp_path_factory):
    import cv2

    from labelloop.core.labelconfig import parse_label_config
    from labelloop.core.predict import load_model
    from labelloop.dev.shapes import label_config

    model = load_model(trained("classification").weights, "direct-test")
    files = [shapes_single.images_dir / im.file for im in shapes_single.images[:20]]
    odd = tmp_path_factory.mktemp("odd-images")
    first = cv2.imread(str(files[0]))
    cv2.imwrite(str(odd / "wide.png"), cv2.resize(first, (151, 67)))
    cv2.imwrite(str(odd / "grey.png"), cv2.cvtColor(cv2.imread(str(files[1])), cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(odd / "rgba.png"), cv2.cvtColor(cv2.imread(str(files[2])), cv2.COLOR_BGR2BGRA))
    cv2.imwrite(str(odd / "photo.jpg"), cv2.imread(str(files[3])))
    others = [odd / "wide.png", odd / "grey.png", odd / "rgba.png", odd / "photo.jpg"]
    return model, parse_label_config(label_config("classification")), files, others


def _ultralytics_probs(model, spec, images) -> list[np.ndarray]:
    """What ``predict_images`` made of ultralytics' own ``predict`` before: the config's classes, renormalized,
    calibrated."""
    from labelloop.core.predict import _mapped_probs

    label_of = spec.require_label_map(model.names)
    with model.lock:
        results = model.yolo.predict([str(p) if isinstance(p, Path) else p for p in images], verbose=False,
                                     batch=len(images))
    return [_mapped_probs(r.probs.data.cpu().numpy().astype(float), label_of, model.temperature) for r in results]


def _probs(pred) -> np.ndarray:
    return np.array(list(pred.class_probs.values()))


def test_same_probabilities_as_ultralytics_predict(classifier):
    from labelloop.core.predict import embed_images, predict_images

    model, spec, files, others = classifier
    size = model.yolo.predictor.imgsz
    assert all(tuple(np.asarray(__import__("cv2").imread(str(f))).shape[:2]) == tuple(size) for f in files[:3]), \
        "the fixture's images should be at the model's size (the path that skips resizing)"
    embed_images(model, files[:4])  # leaves the predictor set up for embeddings: the direct path must not care
    for batch in (files, files[:7] + others, others):
        ours = predict_images(model, batch, spec, 0.5, batch=8)
        theirs = _ultralytics_probs(model, spec, batch)
        assert len(ours) == len(batch)
        for pred, expected in zip(ours, theirs):
            assert np.allclose(_probs(pred), expected, atol=1e-6)
            assert pred.score == pytest.approx(float(np.max(expected)), abs=1e-6)
            assert pred.regions[0].label == list(pred.class_probs)[int(np.argmax(expected))]
    wide = predict_images(model, [others[0]], spec, 0.5)[0]
    assert (wide.width, wide.height) == (151, 67)  # the original image's size, as ultralytics reports it


def test_arrays_and_tta_views_match_ultralytics(classifier):
    import cv2

    from labelloop.core.predict import TTA_VIEWS, _views, predict_images

    model, spec, files, _ = classifier
    arrays = [cv2.imread(str(f)) for f in files[:6]]
    ours = predict_images(model, arrays, spec, 0.5)  # model tests predict perturbed arrays
    for pred, expected in zip(ours, _ultralytics_probs(model, spec, arrays)):
        assert np.allclose(_probs(pred), expected, atol=1e-6)
    tta = predict_images(model, files[:6], spec, 0.5, tta=True)
    for pred, array in zip(tta, arrays):
        views = _ultralytics_probs(model, spec, _views(array))
        assert len(views) == TTA_VIEWS
        assert np.allclose(_probs(pred), np.mean(views, axis=0), atol=1e-6)


def test_a_file_opencv_cannot_read_goes_through_ultralytics(classifier, tmp_path):
    from labelloop.core.predict import predict_images

    model, spec, files, _ = classifier
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot decode image .*broken.png"):
        predict_images(model, [files[0], broken], spec, 0.5)
    assert len(predict_images(model, files[:3], spec, 0.5)) == 3  # and the model keeps serving
