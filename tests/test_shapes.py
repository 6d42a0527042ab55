"""Tests for labelloop.dev.shapes: the synthetic dataset with exact ground truth and injected noise."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from labelloop.dev.shapes import (
    CLASSES,
    Corruption,
    ShapeImage,
    ShapesDataset,
    box_iou,
    generate_shapes,
    inject_noise,
    load_shapes,
    polygon_area,
    to_label_studio_result,
)

pytestmark = pytest.mark.unit  # pure logic, no server: `make test-fast`

SIZE = 160
VERTEX_COUNTS = {"circle": 32, "square": 4, "triangle": 3, "star": 10}


@pytest.fixture(scope="module")
def noisy_ds(tmp_path_factory: pytest.TempPathFactory) -> ShapesDataset:
    return generate_shapes(tmp_path_factory.mktemp("shapes"), n=100, seed=7, size=SIZE, noise=0.2)


def _pixels(ds: ShapesDataset, image: ShapeImage) -> np.ndarray:
    with Image.open(ds.images_dir / image.file) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32)


def _polygon_mask(polygon, size: int) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).polygon(polygon, fill=255)
    return mask


# --------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_pngs_and_json(tmp_path: Path) -> None:
    a = generate_shapes(tmp_path / "a", n=6, seed=3)
    b = generate_shapes(tmp_path / "b", n=6, seed=3, noise=0.0)
    assert (tmp_path / "a" / "shapes.json").read_bytes() == (tmp_path / "b" / "shapes.json").read_bytes()
    for im in a.images:
        assert (a.images_dir / im.file).read_bytes() == (b.images_dir / im.file).read_bytes()
    assert a.images == b.images


def test_image_i_does_not_depend_on_n(tmp_path: Path) -> None:
    small = generate_shapes(tmp_path / "small", n=5, seed=11)
    large = generate_shapes(tmp_path / "large", n=10, seed=11)
    assert large.images[:5] == small.images
    for im in small.images:
        assert (small.images_dir / im.file).read_bytes() == (large.images_dir / im.file).read_bytes()


def test_different_seed_gives_different_images(tmp_path: Path) -> None:
    a = generate_shapes(tmp_path / "a", n=5, seed=0)
    b = generate_shapes(tmp_path / "b", n=5, seed=1)
    for im_a, im_b in zip(a.images, b.images):
        assert (a.images_dir / im_a.file).read_bytes() != (b.images_dir / im_b.file).read_bytes()
    assert [im.objects for im in a.images] != [im.objects for im in b.images]


def test_progress_is_called_once_per_image(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    generate_shapes(tmp_path, n=4, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


# --------------------------------------------------------------------------- ground truth


def test_files_and_sizes(noisy_ds: ShapesDataset) -> None:
    assert len(noisy_ds.images) == 100
    assert [im.index for im in noisy_ds.images] == list(range(100))
    assert len({im.file for im in noisy_ds.images}) == 100
    for im in noisy_ds.images[:10]:
        assert im.file == f"shape_{im.index:05d}.png"
        with Image.open(noisy_ds.images_dir / im.file) as png:
            assert png.format == "PNG" and png.mode == "RGB" and png.size == (SIZE, SIZE)


def test_ground_truth_is_valid(noisy_ds: ShapesDataset) -> None:
    counts = set()
    for im in noisy_ds.images:
        assert (im.width, im.height) == (SIZE, SIZE)
        assert 1 <= len(im.objects) <= 4
        counts.add(len(im.objects))
        assert im.label == im.objects[0].label
        for obj in im.objects:
            assert obj.label in CLASSES
            assert len(obj.polygon) == VERTEX_COUNTS[obj.label]
            x, y, w, h = obj.bbox
            assert w > 0 and h > 0
            assert x >= 0 and y >= 0 and x + w <= SIZE and y + h <= SIZE
            xs = [p[0] for p in obj.polygon]
            ys = [p[1] for p in obj.polygon]
            # polygon inside the box within 1 px, and the box tight around the polygon
            assert min(xs) >= x - 1 and max(xs) <= x + w + 1 and min(ys) >= y - 1 and max(ys) <= y + h + 1
            assert min(xs) == pytest.approx(x, abs=0.011) and max(xs) == pytest.approx(x + w, abs=0.011)
            assert min(ys) == pytest.approx(y, abs=0.011) and max(ys) == pytest.approx(y + h, abs=0.011)
        dominant = polygon_area(im.objects[0].polygon)
        assert 0.29 * SIZE <= max(im.objects[0].bbox[2:]) <= 0.61 * SIZE
        for other in im.objects[1:]:
            assert dominant >= 2 * polygon_area(other.polygon)
        for a, b in itertools.combinations(im.objects, 2):
            assert box_iou(a.bbox, b.bbox) <= 0.3 + 1e-9
    assert len(counts) > 1  # the object count varies
    assert {im.label for im in noisy_ds.images} == set(CLASSES)


def test_boxes_are_tight_around_rasterized_polygons(noisy_ds: ShapesDataset) -> None:
    for im in noisy_ds.images[:40]:
        for obj in im.objects:
            ys, xs = np.nonzero(np.asarray(_polygon_mask(obj.polygon, SIZE)))
            x, y, w, h = obj.bbox
            # pixel i covers [i - 0.5, i + 0.5] when PIL draws to whole-pixel vertices
            assert abs(xs.min() - x) <= 1 and abs(xs.max() - (x + w)) <= 1
            assert abs(ys.min() - y) <= 1 and abs(ys.max() - (y + h)) <= 1


def test_shapes_are_drawn_where_ground_truth_says(noisy_ds: ShapesDataset) -> None:
    """Inside an isolated shape the colour is uniform and differs from the background around its box."""
    margin = 4
    checked = 0
    for im in noisy_ds.images:
        pixels = _pixels(noisy_ds, im)
        for k, obj in enumerate(im.objects):
            x, y, w, h = obj.bbox
            grown = (x - margin, y - margin, w + 2 * margin, h + 2 * margin)
            if any(box_iou(grown, o.bbox) > 0 for j, o in enumerate(im.objects) if j != k):
                continue  # another shape nearby would muddle the comparison
            interior = np.asarray(_polygon_mask(obj.polygon, SIZE).filter(ImageFilter.MinFilter(5))) > 0
            if interior.sum() < 9:
                continue
            inside = pixels[interior]
            x0, y0 = max(int(x) - margin, 0), max(int(y) - margin, 0)
            x1, y1 = min(int(np.ceil(x + w)) + margin + 1, SIZE), min(int(np.ceil(y + h)) + margin + 1, SIZE)
            ring = np.zeros((SIZE, SIZE), dtype=bool)
            ring[y0:y1, x0:x1] = True
            ring[max(int(y) - 1, 0) : int(np.ceil(y + h)) + 2, max(int(x) - 1, 0) : int(np.ceil(x + w)) + 2] = False
            if ring.sum() < 20:
                continue
            fill = inside.mean(axis=0)
            assert inside.std(axis=0).max() < 12, "shape interior should be one colour plus light noise"
            distance = np.linalg.norm(pixels[ring] - fill, axis=1)
            assert np.median(distance) > 40, f"image {im.index} object {k} blends into the background"
            checked += 1
    assert checked >= 30


def test_classes_subset_is_respected(tmp_path: Path) -> None:
    ds = generate_shapes(tmp_path, n=30, seed=2, noise=0.5, classes=("circle", "square"))
    assert ds.classes == ("circle", "square")
    for im in ds.images + ds.noisy:
        assert {o.label for o in im.objects} <= {"circle", "square"}


def test_invalid_arguments_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        generate_shapes(tmp_path, n=2, noise=1.0)
    with pytest.raises(ValueError):
        generate_shapes(tmp_path, n=2, classes=("circle", "hexagon"))
    with pytest.raises(ValueError):
        generate_shapes(tmp_path, n=2, max_objects=0)


# --------------------------------------------------------------------------- noise


def test_noise_rate_gives_exact_corruption_count(noisy_ds: ShapesDataset) -> None:
    assert len(noisy_ds.corruptions) == 20
    assert len({c.image for c in noisy_ds.corruptions}) == 20  # one corruption per picked image
    assert {c.kind for c in noisy_ds.corruptions} <= {"flipped_class", "dropped_box", "shifted_box"}


@pytest.mark.parametrize(("rate", "n", "expected"), [(0.25, 10, 3), (0.2, 7, 1), (0.1, 4, 0), (0.5, 9, 5)])
def test_corruption_count_rounds_half_up(rate: float, n: int, expected: int, noisy_ds: ShapesDataset) -> None:
    _, corruptions = inject_noise(noisy_ds.images[:n], rate, seed=1, classes=CLASSES)
    assert len(corruptions) == expected


def test_each_corruption_matches_clean_vs_noisy(noisy_ds: ShapesDataset) -> None:
    by_image = {c.image: c for c in noisy_ds.corruptions}
    for clean, noisy in zip(noisy_ds.images, noisy_ds.noisy):
        assert clean.index == noisy.index and clean.file == noisy.file
        c = by_image.get(clean.index)
        if c is None:
            assert noisy == clean
            continue
        k = c.object
        assert k is not None and 0 <= k < len(clean.objects)
        if c.kind == "flipped_class":
            assert c.original == clean.objects[k].label
            assert c.corrupted == noisy.objects[k].label != c.original
            assert noisy.objects[k].bbox == clean.objects[k].bbox
            assert noisy.label == (c.corrupted if k == 0 else clean.label)
            assert [o for j, o in enumerate(noisy.objects) if j != k] == [
                o for j, o in enumerate(clean.objects) if j != k
            ]
        elif c.kind == "dropped_box":
            assert len(clean.objects) >= 2
            assert len(noisy.objects) == len(clean.objects) - 1
            assert noisy.objects == clean.objects[:k] + clean.objects[k + 1 :]
            assert c.original == list(clean.objects[k].bbox)
            assert noisy.label == clean.label
        elif c.kind == "shifted_box":
            before, after = clean.objects[k], noisy.objects[k]
            assert c.original == list(before.bbox) and c.corrupted == list(after.bbox)
            assert after.bbox != before.bbox and after.label == before.label
            moves = np.asarray(after.polygon) - np.asarray(before.polygon)
            assert np.allclose(moves, moves[0], atol=0.011)  # a pure translation
            dx, dy = moves[0]
            relative = np.hypot(dx / before.bbox[2], dy / before.bbox[3])
            assert 0.05 < relative <= 0.61
            x, y, w, h = after.bbox
            assert x >= 0 and y >= 0 and x + w <= SIZE and y + h <= SIZE
            assert noisy.label == clean.label
        else:
            pytest.fail(f"unexpected kind {c.kind}")


def test_shift_is_usually_30_to_60_percent(noisy_ds: ShapesDataset) -> None:
    _, corruptions = inject_noise(noisy_ds.images, 0.9, seed=5, classes=CLASSES)
    shifts = []
    for c in corruptions:
        if c.kind == "shifted_box":
            (x0, y0, w, h), (x1, y1, _, _) = c.original, c.corrupted
            shifts.append(np.hypot((x1 - x0) / w, (y1 - y0) / h))
    assert len(shifts) >= 10
    assert np.mean([0.29 <= s <= 0.61 for s in shifts]) >= 0.9


def test_noise_is_deterministic_and_does_not_touch_input(noisy_ds: ShapesDataset) -> None:
    before = copy.deepcopy(noisy_ds.images)
    a = inject_noise(noisy_ds.images, 0.3, seed=9, classes=CLASSES)
    b = inject_noise(noisy_ds.images, 0.3, seed=9, classes=CLASSES)
    c = inject_noise(noisy_ds.images, 0.3, seed=10, classes=CLASSES)
    assert a == b
    assert a[1] != c[1]
    assert noisy_ds.images == before


def test_zero_noise_means_clean_copy(tmp_path: Path) -> None:
    ds = generate_shapes(tmp_path, n=8, seed=4, noise=0.0)
    assert ds.corruptions == []
    assert ds.noisy == ds.images
    assert ds.noisy is not ds.images and ds.noisy[0] is not ds.images[0]
    assert ds.noisy[0].objects[0] is not ds.images[0].objects[0]


# --------------------------------------------------------------------------- files


def test_load_shapes_round_trips(noisy_ds: ShapesDataset) -> None:
    loaded = load_shapes(noisy_ds.root)
    assert loaded.images == noisy_ds.images
    assert loaded.noisy == noisy_ds.noisy
    assert loaded.corruptions == noisy_ds.corruptions
    assert all(isinstance(c, Corruption) for c in loaded.corruptions)
    assert loaded.classes == noisy_ds.classes == CLASSES
    assert loaded.seed == 7
    assert loaded.root == noisy_ds.root and loaded.images_dir == noisy_ds.root / "images"
    assert isinstance(loaded.images[0].objects[0].bbox, tuple)
    assert isinstance(loaded.images[0].objects[0].polygon[0], tuple)


def test_json_layout(noisy_ds: ShapesDataset) -> None:
    payload = json.loads((noisy_ds.root / "shapes.json").read_text())
    assert set(payload) == {"seed", "size", "classes", "images", "noisy", "corruptions"}
    assert payload["size"] == SIZE and payload["seed"] == 7 and payload["classes"] == list(CLASSES)
    assert len(payload["images"]) == len(payload["noisy"]) == 100
    assert len(payload["corruptions"]) == 20
    first = payload["images"][0]
    assert set(first) == {"index", "file", "width", "height", "label", "objects"}
    assert set(first["objects"][0]) == {"label", "bbox", "polygon"}


# --------------------------------------------------------------------------- Label Studio


BASE_KEYS = {"id", "from_name", "to_name", "type", "value"}
REGION_KEYS = BASE_KEYS | {"original_width", "original_height", "image_rotation"}


def test_label_studio_classification(noisy_ds: ShapesDataset) -> None:
    im = noisy_ds.images[3]
    result = to_label_studio_result(im, "classification", from_name="choice", to_name="img")
    assert result == [
        {
            "id": "s3c",
            "from_name": "choice",
            "to_name": "img",
            "type": "choices",
            "value": {"choices": [im.label]},
        }
    ]


def test_label_studio_detection_geometry(noisy_ds: ShapesDataset) -> None:
    ids = set()
    for im in noisy_ds.images:
        result = to_label_studio_result(im, "detection")
        assert len(result) == len(im.objects)
        for k, (region, obj) in enumerate(zip(result, im.objects)):
            assert set(region) == REGION_KEYS
            assert region["type"] == "rectanglelabels"
            assert (region["from_name"], region["to_name"]) == ("label", "image")
            assert (region["original_width"], region["original_height"], region["image_rotation"]) == (SIZE, SIZE, 0)
            value = region["value"]
            assert set(value) == {"x", "y", "width", "height", "rotation", "rectanglelabels"}
            assert value["rotation"] == 0 and value["rectanglelabels"] == [obj.label]
            for key in ("x", "y", "width", "height"):
                assert 0 <= value[key] <= 100
            assert value["x"] + value["width"] <= 100 + 1e-9 and value["y"] + value["height"] <= 100 + 1e-9
            back = (
                value["x"] / 100 * im.width,
                value["y"] / 100 * im.height,
                value["width"] / 100 * im.width,
                value["height"] / 100 * im.height,
            )
            assert np.allclose(back, obj.bbox, atol=0.01)
            assert region["id"] == f"s{im.index}o{k}"
            ids.add(region["id"])
    assert len(ids) == sum(len(im.objects) for im in noisy_ds.images)


def test_label_studio_segmentation_geometry(noisy_ds: ShapesDataset) -> None:
    for im in noisy_ds.images[:30]:
        result = to_label_studio_result(im, "segmentation")
        assert len(result) == len(im.objects)
        for region, obj in zip(result, im.objects):
            assert set(region) == REGION_KEYS
            assert region["type"] == "polygonlabels"
            value = region["value"]
            assert set(value) == {"points", "closed", "polygonlabels"}
            assert value["closed"] is True and value["polygonlabels"] == [obj.label]
            points = np.asarray(value["points"])
            assert points.shape == (len(obj.polygon), 2)
            assert points.min() >= 0 and points.max() <= 100
            back = points / 100 * [im.width, im.height]
            assert np.allclose(back, obj.polygon, atol=0.01)
            json.dumps(region)  # plain JSON types only


def test_label_studio_rejects_unknown_task_type(noisy_ds: ShapesDataset) -> None:
    with pytest.raises(ValueError):
        to_label_studio_result(noisy_ds.images[0], "keypoints")
