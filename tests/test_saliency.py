"""core.saliency: EigenCAM maps of the served version, where it looked.

The projection is checked on constructed activations; on real images the maps of a classifier the engine
trained on the demo's shapes put most of their mass on the shape (its box), far above a uniform map's share
(the box's area) and above a centre prior's; a detector's maps come back at each image's size.
"""

from __future__ import annotations

import numpy as np
import pytest

from labelloop.core.saliency import eigen_projection, saliency_maps, share_inside


@pytest.mark.unit
def test_the_projection_lights_the_active_place_whatever_the_components_sign():
    rng = np.random.default_rng(0)
    activations = rng.normal(0, 0.05, (8, 6, 6))
    activations[:, 1:3, 3:5] += rng.uniform(1.0, 2.0, (8, 1, 1))  # one region fires on every channel
    for sign in (1.0, -1.0):
        cam = eigen_projection(sign * activations if sign > 0 else activations * 1.0)
        assert cam.shape == (6, 6) and cam.max() == pytest.approx(1.0) and cam.min() >= 0.0
        inside = cam[1:3, 3:5].mean()
        assert inside > 5 * np.delete(cam.reshape(-1), [9, 10, 15, 16]).mean()
    assert not eigen_projection(np.ones((4, 3, 3))).any()
    assert share_inside(np.ones((10, 10), np.float32), (0.0, 0.0, 0.5, 0.5)) == pytest.approx(0.25)


def test_maps_of_a_trained_classifier_fall_on_the_shape(simple_classifier, tmp_path):
    from labelloop.core.predict import load_model
    from labelloop.dev.shapes import generate_shapes

    manifest, _, _ = simple_classifier
    model = load_model(manifest.weights, manifest.version)
    test = generate_shapes(tmp_path / "test", n=40, seed=91, size=64, max_objects=1, style="simple")
    maps = saliency_maps(model, [test.images_dir / im.file for im in test.images])
    assert len(maps) == 40 and all(m.shape == (64, 64) and m.dtype == np.float32 for m in maps)
    boxes = []
    for image in test.images:
        x, y, w, h = image.objects[0].bbox
        boxes.append((x / 64, y / 64, (x + w) / 64, (y + h) / 64))
    inside = np.array([share_inside(m, b) for m, b in zip(maps, boxes)])
    area = np.array([(b[2] - b[0]) * (b[3] - b[1]) for b in boxes])
    centre = np.zeros((64, 64), np.float32)
    centre[16:48, 16:48] = 1.0  # a centre prior: where objects tend to be
    prior = np.array([share_inside(centre, b) for b in boxes])
    print(f"mass on the shape: {inside.mean():.2f} (uniform {area.mean():.2f}, centre prior {prior.mean():.2f})")
    assert inside.mean() >= 2 * area.mean() and inside.mean() > prior.mean(), (inside.mean(), area.mean(),
                                                                                      prior.mean())


def test_a_detectors_maps_come_back_at_each_images_size(trained, shapes_eval):
    from labelloop.core.predict import load_model

    model = load_model(trained("detection").weights, "suite-detector")
    paths = [shapes_eval.images_dir / im.file for im in shapes_eval.images[:3]]
    maps = saliency_maps(model, paths, batch=2)
    assert [m.shape for m in maps] == [(im.height, im.width) for im in shapes_eval.images[:3]]
    assert all(0.0 <= m.min() and m.max() <= 1.0 for m in maps)
