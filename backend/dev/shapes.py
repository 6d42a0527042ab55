"""Deterministic synthetic image dataset with exact ground truth ("shapes").

Tests, the demo and the benchmarks need images whose classification label, boxes and polygons
are known exactly, plus optional label noise with a record of what was corrupted. Nothing is
downloaded: ``generate_shapes`` draws everything with numpy + PIL.

What one image is
    A ``size`` x ``size`` RGB PNG. The background is textured so the task is not trivial: a smooth
    random gradient or low-frequency colour blobs, usually overlaid with stripes or a checker
    pattern, plus pixel noise. On it lie 1..``max_objects`` shapes of the classes in ``classes``
    (any of circle, square, triangle, 5-point star), each filled with one colour chosen to stand
    out from the pixels it is drawn over.

    * The first object is the dominant one: its extent is 30-60 % of the image side and the polygon
      area of every other object is at most half of its area, so the image-level ``label``
      (= ``objects[0].label``) is unambiguous. Other objects span 12-30 % of the side (smaller
      where needed to keep the 2x area rule).
    * Objects may overlap a little: every pair of boxes has IoU <= 0.3, at most 35 % of any box is
      covered by boxes drawn after it, and later (smaller) objects are drawn on top. An object
      that cannot be placed under these rules is left out, so an image may hold fewer objects
      than drawn for.
    * Ground truth is amodal (the whole shape, even where another one covers it). ``polygon`` is
      exactly the polygon given to ``ImageDraw.polygon`` (a circle is a 32-point polygon), and
      ``bbox`` (x, y, w, h, pixels, top-left origin) is its tight bounding box, so the box is
      tight around the drawn pixels within 1 px (PIL rounds vertices to whole pixels). All
      coordinates lie in [1, size - 1] and are rounded to 0.01 px.

Label noise (``noise`` = fraction of images with exactly one corruption)
    ``round(noise * n)`` images (halves round up) are picked from ``seed``; each gets one of
    these kinds, drawn uniformly, for an object drawn uniformly:

    * ``"flipped_class"``: the object's label becomes another class of ``classes``. When the
      object is the dominant one (``object == 0``) the image ``label`` flips with it - that is the
      classification label error. ``original``/``corrupted``: old and new class names.
    * ``"dropped_box"``: the object is removed from the noisy ``objects`` list (a missed
      annotation). Only for images with >= 2 objects, otherwise ``"flipped_class"`` is used. The
      image ``label`` is not changed, even when object 0 is dropped. ``original``: the dropped
      bbox as a list, ``corrupted``: None.
    * ``"shifted_box"``: bbox and polygon are translated by 30-60 % of the object's size (distance
      measured in units of its width/height, random direction); the translation is clamped so
      the shape stays inside the image. ``original``/``corrupted``: old and new bbox as lists.

    ``"flipped_image_label"`` is a reserved kind name (see ``NOISE_KINDS``); ``inject_noise`` never
    produces it - an image-level flip is recorded as ``"flipped_class"`` with ``object == 0``.
    ``Corruption.object`` always indexes the CLEAN objects list of that image.

Determinism
    Image i is drawn from its own generator ``np.random.default_rng([seed, i])``, so it is the
    same whatever ``n`` is; the same (seed, i, size, max_objects, classes) gives a byte-identical
    PNG and identical ground truth. The choice of corrupted images depends on (seed, n); the
    corruption given to a chosen image depends only on (seed, image index).

Output of ``generate_shapes(out, ...)``: ``out/images/shape_00012.png`` ... and ``out/shapes.json``
with ``{"seed", "size", "classes", "images", "noisy", "corruptions"}``; ``load_shapes(out)``
reads it back. ``to_label_studio_result`` turns one image's ground truth into a Label Studio
annotation ``result`` list.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star")  # model class-index order
NOISE_KINDS: tuple[str, ...] = ("flipped_class", "dropped_box", "shifted_box", "flipped_image_label")
TASK_TYPES: tuple[str, ...] = ("classification", "detection", "segmentation")
JSON_NAME = "shapes.json"
IMAGES_DIRNAME = "images"

CIRCLE_POINTS = 32
DOMINANT_EXTENT = (0.30, 0.60)  # fraction of the image side
OTHER_EXTENT = (0.12, 0.30)
MAX_AREA_FRACTION_OF_DOMINANT = 0.5
MAX_BOX_IOU = 0.3
MAX_BOX_COVERED = 0.35  # fraction of a box that boxes drawn later may cover
PLACEMENT_TRIES = 40
COLOR_CANDIDATES = 64
GOOD_CONTRAST = 110.0  # RGB distance of the fill colour to most pixels it covers
SHIFT_FRACTION = (0.30, 0.60)
_NOISE_STREAM = 0x5E1EC7  # keeps the noise generator's stream apart from the image generators'

Progress = Callable[[int, int], object]
Point = tuple[float, float]


@dataclass
class ShapeObject:
    label: str
    bbox: tuple[float, float, float, float]  # x, y, w, h in pixels, top-left origin, amodal
    polygon: list[tuple[float, float]]  # pixel coords outlining the whole shape


@dataclass
class ShapeImage:
    index: int
    file: str  # relative to the images dir, e.g. "shape_00012.png"
    width: int
    height: int
    label: str  # class of the dominant object (objects[0])
    objects: list[ShapeObject]


@dataclass
class Corruption:
    image: int  # ShapeImage.index
    kind: str  # one of NOISE_KINDS
    object: int | None  # index into the CLEAN objects list of that image (None: image-level)
    original: str | list | None
    corrupted: str | list | None


@dataclass
class ShapesDataset:
    root: Path
    images_dir: Path
    images: list[ShapeImage]  # clean ground truth
    noisy: list[ShapeImage]  # labels after noise (deep copy of images when noise == 0)
    corruptions: list[Corruption]
    classes: tuple[str, ...]
    seed: int


# --------------------------------------------------------------------------- geometry helpers


def image_file_name(index: int) -> str:
    return f"shape_{index:05d}.png"


def polygon_area(polygon: Sequence[Point]) -> float:
    """Shoelace area of a simple polygon."""
    pts = np.asarray(polygon, dtype=np.float64)
    x, y = pts[:, 0], pts[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2.0)


def bbox_of(polygon: Sequence[Point]) -> tuple[float, float, float, float]:
    xs = [p[0] for p in polygon]
    ys = [p[1] for p in polygon]
    x0, y0 = min(xs), min(ys)
    return (x0, y0, round(max(xs) - x0, 2), round(max(ys) - y0, 2))


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    inter = box_intersection(a, b)
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def box_intersection(a: Sequence[float], b: Sequence[float]) -> float:
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(w, 0.0) * max(h, 0.0)


def _rounded_points(pts: np.ndarray) -> list[Point]:
    # Rounded once, here, so what is drawn, stored and reloaded is the very same polygon.
    return [(round(float(x), 2), round(float(y), 2)) for x, y in pts]


# --------------------------------------------------------------------------- shape outlines


def _unit_outline(shape: str, rng: np.random.Generator) -> np.ndarray:
    """Outline of one shape around the origin, any scale; y points down as in images."""
    if shape == "circle":
        angles = np.arange(CIRCLE_POINTS) * (2 * np.pi / CIRCLE_POINTS)
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if shape == "square":
        corners = np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
        # Half of the squares are slightly rotated so boxes are not always the outline itself.
        tilt = rng.uniform(-np.pi / 9, np.pi / 9) if rng.random() < 0.5 else 0.0
        return corners @ _rotation(tilt).T
    if shape == "triangle":
        jitter = rng.uniform(-0.25, 0.25, size=2)
        angles = rng.uniform(0, 2 * np.pi) + np.array([0.0, 2 * np.pi / 3 + jitter[0], 4 * np.pi / 3 + jitter[1]])
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if shape == "star":
        inner = rng.uniform(0.38, 0.50)
        angles = rng.uniform(0, 2 * np.pi) + np.arange(10) * (np.pi / 5)
        radii = np.where(np.arange(10) % 2 == 0, 1.0, inner)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(CLASSES)}")


def _rotation(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]])


def _scaled_outline(shape: str, extent: float, rng: np.random.Generator) -> np.ndarray:
    """Outline whose larger bbox side is ``extent`` pixels, top-left corner at the origin."""
    pts = _unit_outline(shape, rng)
    pts = pts - pts.min(axis=0)
    return pts * (extent / float(pts.max()))


# --------------------------------------------------------------------------- background


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Float RGB texture: smooth base + optional stripes/checker + pixel noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if rng.random() < 0.5:
        c0, c1 = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
        angle = rng.uniform(0, 2 * np.pi)
        t = np.cos(angle) * xx + np.sin(angle) * yy
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        base = c0 + (c1 - c0) * t[..., None]
    else:
        cells = int(rng.integers(2, 6))
        grid = rng.uniform(0, 255, size=(cells, cells, 3)).astype(np.uint8)
        blobs = Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC)
        base = np.asarray(blobs, dtype=np.float32)

    if rng.random() < 0.75:
        period = rng.uniform(6, 24)
        if rng.random() < 0.5:
            angle = rng.uniform(0, np.pi)
            phase = rng.uniform(0, 2 * np.pi)
            mask = np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * (2 * np.pi / period) + phase) > 0
        else:
            ox, oy = rng.uniform(0, period, size=2)
            mask = (np.floor((xx + ox) / period) + np.floor((yy + oy) / period)) % 2 == 0
        color = rng.uniform(0, 255, size=3).astype(np.float32)
        alpha = rng.uniform(0.15, 0.45)
        weight = (alpha * mask.astype(np.float32))[..., None]
        base = base * (1 - weight) + color * weight

    base = base + rng.normal(0, rng.uniform(3, 12), size=base.shape).astype(np.float32)
    return np.clip(base, 0, 255)


def _contrasting_color(rng: np.random.Generator, canvas: np.ndarray, bbox: Sequence[float]) -> tuple[int, int, int]:
    """Fill colour far (in RGB) from most pixels under the shape's box, so the shape is visible."""
    x, y, w, h = bbox
    region = canvas[int(y) : int(math.ceil(y + h)) + 1, int(x) : int(math.ceil(x + w)) + 1]
    stride = max(1, math.ceil(math.sqrt(region.shape[0] * region.shape[1] / 400)))  # ~400 samples suffice
    pixels = region[::stride, ::stride].reshape(-1, 3).astype(np.float32)
    candidates = rng.integers(0, 256, size=(COLOR_CANDIDATES, 3)).astype(np.float32)
    distances = np.sqrt(((candidates[:, None, :] - pixels[None, :, :]) ** 2).sum(axis=2))
    # A low percentile, not the mean: the mean of two stripe colours can be far from a fill that
    # matches one of the stripes, and the shape would vanish against that stripe.
    scores = np.percentile(distances, 10, axis=1)
    good = np.flatnonzero(scores >= GOOD_CONTRAST)
    best = int(good[0]) if good.size else int(np.argmax(scores))
    return tuple(int(c) for c in candidates[best])  # type: ignore[return-value]


# --------------------------------------------------------------------------- one image


def _place_outline(rng: np.random.Generator, outline: np.ndarray, size: int) -> np.ndarray:
    """Random translation keeping the whole outline in [1, size - 1]."""
    lo, hi = 1.0, size - 1.0
    span = outline.max(axis=0)
    offset = rng.uniform(lo, np.maximum(hi - span, lo))
    return outline + offset


def _overlap_ok(box: Sequence[float], placed: list[tuple[float, float, float, float]], covered: list[float]) -> bool:
    for other, already in zip(placed, covered):
        if box_iou(box, other) > MAX_BOX_IOU:
            return False
        if already + box_intersection(box, other) / (other[2] * other[3]) > MAX_BOX_COVERED:
            return False
    return True


def _layout_objects(
    rng: np.random.Generator, size: int, max_objects: int, classes: Sequence[str]
) -> list[ShapeObject]:
    """Choose classes, sizes and positions; the first object is the dominant one."""
    wanted = int(rng.integers(1, max_objects + 1))
    objects: list[ShapeObject] = []
    covered: list[float] = []  # fraction of each placed box covered by later boxes
    dominant_area = 0.0
    for k in range(wanted):
        label = classes[int(rng.integers(len(classes)))]
        extent_range = DOMINANT_EXTENT if k == 0 else OTHER_EXTENT
        outline = _scaled_outline(label, rng.uniform(*extent_range) * size, rng)
        if k == 0:
            dominant_area = polygon_area(outline)
        else:
            limit = MAX_AREA_FRACTION_OF_DOMINANT * dominant_area * 0.97  # margin for rounding
            area = polygon_area(outline)
            if area > limit:
                outline = outline * math.sqrt(limit / area)
        for _ in range(PLACEMENT_TRIES):
            polygon = _rounded_points(_place_outline(rng, outline, size))
            box = bbox_of(polygon)
            if _overlap_ok(box, [o.bbox for o in objects], covered):
                break
        else:
            continue  # no room: fewer objects in this image
        for j, other in enumerate(objects):
            covered[j] += box_intersection(box, other.bbox) / (other.bbox[2] * other.bbox[3])
        objects.append(ShapeObject(label=label, bbox=box, polygon=polygon))
        covered.append(0.0)
    return objects


STYLES = ("textured", "simple")


def _simple_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A dark, nearly flat background: the 'simple' style, learnable from scratch from ~100 images."""
    return np.full((size, size, 3), rng.uniform(0, 60, size=3), dtype=np.float32)


def render_shape_image(
    index: int, seed: int = 0, size: int = 160, max_objects: int = 4, classes: Sequence[str] = CLASSES,
    style: str = "textured",
) -> tuple[Image.Image, ShapeImage]:
    """Draw image ``index`` of the dataset ``seed`` in memory: (PIL image, ground truth).

    ``style="simple"`` draws light shapes on a dark flat background: a model trained from scratch
    on a hundred such images learns them, which the textured default does not allow (it needs
    more data or pretrained weights); quality tests and benchmarks that measure *scoring* use it.
    """
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    rng = np.random.default_rng([seed, index])
    background = _background(rng, size) if style == "textured" else _simple_background(rng, size)
    canvas = Image.fromarray(background.astype(np.uint8), "RGB")
    objects = _layout_objects(rng, size, max_objects, classes)
    draw = ImageDraw.Draw(canvas)
    for obj in objects:  # in order: smaller, later objects end up on top
        color = (_contrasting_color(rng, np.asarray(canvas), obj.bbox) if style == "textured"
                 else tuple(int(v) for v in rng.uniform(170, 255, size=3)))
        draw.polygon(obj.polygon, fill=color)
    # Light noise over everything so shapes are not perfectly flat either.
    pixels = np.asarray(canvas, dtype=np.float32)
    pixels = pixels + rng.normal(0, rng.uniform(2, 5), size=pixels.shape).astype(np.float32)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    truth = ShapeImage(
        index=index,
        file=image_file_name(index),
        width=size,
        height=size,
        label=objects[0].label,
        objects=objects,
    )
    return image, truth


# --------------------------------------------------------------------------- noise


def _corruption_count(rate: float, n: int) -> int:
    return int(math.floor(rate * n + 0.5))  # round half up, unlike round()'s half-to-even


def inject_noise(
    images: list[ShapeImage], rate: float, seed: int, classes: Sequence[str]
) -> tuple[list[ShapeImage], list[Corruption]]:
    """Return (noisy deep copy of ``images``, corruptions); exactly one corruption per picked image.

    ``round(rate * len(images))`` images (halves up) are picked with a generator seeded from
    ``seed``; see the module docstring for what each kind does.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"noise rate must be in [0, 1), got {rate}")
    noisy = copy.deepcopy(images)
    count = _corruption_count(rate, len(images))
    if count == 0:
        return noisy, []
    picker = np.random.default_rng([seed, _NOISE_STREAM])
    picked = sorted(int(p) for p in picker.choice(len(images), size=count, replace=False))
    corruptions = [_corrupt_one(noisy[pos], seed, classes) for pos in picked]
    return noisy, corruptions


def _corrupt_one(image: ShapeImage, seed: int, classes: Sequence[str]) -> Corruption:
    """Corrupt ``image`` in place (it is already the noisy copy)."""
    # Per-image generator: the corruption an image gets does not depend on which others were picked.
    rng = np.random.default_rng([seed, _NOISE_STREAM, image.index])
    kinds = ["flipped_class", "dropped_box", "shifted_box"]
    kind = kinds[int(rng.integers(len(kinds)))]
    k = int(rng.integers(len(image.objects)))
    if kind == "dropped_box" and len(image.objects) < 2:
        kind = "flipped_class"
    if kind == "flipped_class" and len(classes) < 2:
        kind = "shifted_box"  # nothing to flip to

    obj = image.objects[k]
    if kind == "flipped_class":
        others = [c for c in classes if c != obj.label]
        new_label = others[int(rng.integers(len(others)))]
        original, obj.label = obj.label, new_label
        if k == 0:
            image.label = new_label
        return Corruption(image.index, kind, k, original, new_label)
    if kind == "dropped_box":
        del image.objects[k]
        return Corruption(image.index, kind, k, list(obj.bbox), None)
    original_box = list(obj.bbox)
    dx, dy = _shift_vector(rng, obj, image.width, image.height)
    obj.polygon = [(round(x + dx, 2), round(y + dy, 2)) for x, y in obj.polygon]
    obj.bbox = bbox_of(obj.polygon)
    return Corruption(image.index, kind, k, original_box, list(obj.bbox))


def _shift_vector(rng: np.random.Generator, obj: ShapeObject, width: int, height: int) -> tuple[float, float]:
    """Translation of 30-60 % of the object's size that keeps it inside the image."""
    x, y, w, h = obj.bbox
    # Whole-pixel bounds (shrunk by 0.01) so rounding the shifted coordinates cannot leave them.
    dx_range = (1.0 - x + 0.01, width - 1.0 - (x + w) - 0.01)
    dy_range = (1.0 - y + 0.01, height - 1.0 - (y + h) - 0.01)
    best: tuple[float, float] = (0.0, 0.0)
    best_len = -1.0
    for _ in range(16):
        angle = rng.uniform(0, 2 * np.pi)
        fraction = rng.uniform(*SHIFT_FRACTION)
        dx, dy = fraction * w * math.cos(angle), fraction * h * math.sin(angle)
        clamped = (min(max(dx, dx_range[0]), dx_range[1]), min(max(dy, dy_range[0]), dy_range[1]))
        if clamped == (dx, dy):
            return round(dx, 2), round(dy, 2)
        length = math.hypot(clamped[0] / w, clamped[1] / h)
        if length > best_len:
            best, best_len = clamped, length
    return round(best[0], 2), round(best[1], 2)


# --------------------------------------------------------------------------- files


def generate_shapes(
    out: str | Path,
    n: int,
    seed: int = 0,
    size: int = 160,
    noise: float = 0.0,
    max_objects: int = 4,
    classes: tuple[str, ...] = CLASSES,
    progress: Progress | None = None,
    style: str = "textured",
) -> ShapesDataset:
    """Write ``n`` images to ``out/images`` and ground truth to ``out/shapes.json``; return the dataset."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if size < 32:
        raise ValueError(f"size must be >= 32 pixels, got {size}")
    if max_objects < 1:
        raise ValueError(f"max_objects must be >= 1, got {max_objects}")
    if not 0.0 <= noise < 1.0:
        raise ValueError(f"noise must be in [0, 1), got {noise}")
    classes = tuple(classes)
    unknown = [c for c in classes if c not in CLASSES]
    if not classes or unknown:
        raise ValueError(f"classes must be a non-empty subset of {CLASSES}, got {classes}")

    root = Path(out)
    images_dir = root / IMAGES_DIRNAME
    images_dir.mkdir(parents=True, exist_ok=True)
    images: list[ShapeImage] = []
    for i in range(n):
        picture, truth = render_shape_image(i, seed=seed, size=size, max_objects=max_objects, classes=classes,
                                            style=style)
        picture.save(images_dir / truth.file, format="PNG")
        images.append(truth)
        if progress is not None:
            progress(i + 1, n)

    noisy, corruptions = inject_noise(images, noise, seed, classes)
    dataset = ShapesDataset(
        root=root,
        images_dir=images_dir,
        images=images,
        noisy=noisy,
        corruptions=corruptions,
        classes=classes,
        seed=seed,
    )
    payload = {
        "seed": seed,
        "size": size,
        "classes": list(classes),
        "images": [asdict(im) for im in images],
        "noisy": [asdict(im) for im in noisy],
        "corruptions": [asdict(c) for c in corruptions],
    }
    (root / JSON_NAME).write_text(json.dumps(payload, separators=(",", ":")) + "\n", encoding="utf-8")
    return dataset


def load_shapes(root: str | Path) -> ShapesDataset:
    """Read a dataset written by ``generate_shapes`` back into the dataclasses."""
    root = Path(root)
    payload = json.loads((root / JSON_NAME).read_text(encoding="utf-8"))
    return ShapesDataset(
        root=root,
        images_dir=root / IMAGES_DIRNAME,
        images=[_image_from_json(d) for d in payload["images"]],
        noisy=[_image_from_json(d) for d in payload["noisy"]],
        corruptions=[Corruption(**d) for d in payload["corruptions"]],
        classes=tuple(payload["classes"]),
        seed=int(payload["seed"]),
    )


def _image_from_json(data: dict) -> ShapeImage:
    objects = [
        ShapeObject(
            label=o["label"],
            bbox=tuple(float(v) for v in o["bbox"]),  # type: ignore[arg-type]
            polygon=[(float(x), float(y)) for x, y in o["polygon"]],
        )
        for o in data["objects"]
    ]
    return ShapeImage(
        index=int(data["index"]),
        file=data["file"],
        width=int(data["width"]),
        height=int(data["height"]),
        label=data["label"],
        objects=objects,
    )


# --------------------------------------------------------------------------- Label Studio


def to_label_studio_result(
    image: ShapeImage, task_type: str, from_name: str = "label", to_name: str = "image"
) -> list[dict]:
    """Ground truth of one image as a Label Studio annotation ``result`` list (coordinates in %)."""
    if task_type == "classification":
        return [
            {
                "id": f"s{image.index}c",
                "from_name": from_name,
                "to_name": to_name,
                "type": "choices",
                "value": {"choices": [image.label]},
            }
        ]
    if task_type not in TASK_TYPES:
        raise ValueError(f"task_type must be one of {TASK_TYPES}, got {task_type!r}")

    sx, sy = 100.0 / image.width, 100.0 / image.height
    results: list[dict] = []
    for k, obj in enumerate(image.objects):
        region = {
            "id": f"s{image.index}o{k}",
            "from_name": from_name,
            "to_name": to_name,
            "original_width": image.width,
            "original_height": image.height,
            "image_rotation": 0,
        }
        if task_type == "detection":
            x, y, w, h = obj.bbox
            region["type"] = "rectanglelabels"
            region["value"] = {
                "x": x * sx,
                "y": y * sy,
                "width": w * sx,
                "height": h * sy,
                "rotation": 0,
                "rectanglelabels": [obj.label],
            }
        else:
            region["type"] = "polygonlabels"
            region["value"] = {
                "points": [[px * sx, py * sy] for px, py in obj.polygon],
                "closed": True,
                "polygonlabels": [obj.label],
            }
        results.append(region)
    return results


# -- Label Studio side of the embedded data ------------------------------------------------------

TAGS = {"detection": ("RectangleLabels", "Label"), "segmentation": ("PolygonLabels", "Label"),
        "classification": ("Choices", "Choice")}


def label_config(task_type: str, classes=CLASSES, threshold: float | None = None) -> str:
    """A Label Studio label config for the shapes classes (what a user pastes into their project)."""
    tag, child = TAGS[task_type]
    extra = f' model_score_threshold="{threshold}"' if threshold is not None else ""
    labels = "".join(f'<{child} value="{c}"/>' for c in classes)
    return f'<View><Image name="image" value="$image"/><{tag} name="label" toName="image"{extra}>{labels}</{tag}></View>'


def to_label_studio_tasks(dataset, task_type: str, url_of=None, noisy: bool = False, start_id: int = 1,
                          labels: Sequence[str] | None = None, indices: Sequence[int] | None = None) -> list[dict]:
    """Label Studio tasks with one annotation each, from the generator's (clean or noisy) labels.

    ``labels`` (classification) replaces the image labels, e.g. by ``flip_image_labels``' noisy ones;
    ``indices`` picks which images become tasks (default all); task ids are ``start_id + index``.
    """
    images = dataset.noisy if noisy else dataset.images
    url_of = url_of or (lambda image: str(dataset.images_dir / image.file))
    tasks = []
    for k in (range(len(images)) if indices is None else indices):
        result = to_label_studio_result(images[k], task_type)
        if labels is not None:
            result[0]["value"]["choices"] = [labels[k]]
        tasks.append({"id": start_id + k, "data": {"image": url_of(images[k])},
                      "annotations": [{"id": start_id + k, "result": result}]})
    return tasks


def flip_image_labels(dataset: ShapesDataset, rate: float, seed: int) -> tuple[list[str], list[int]]:
    """Image-level (classification) label noise: ``rate`` of the images get another class.

    Returns (noisy label per image, indices of the flipped images). Independent of ``inject_noise``,
    whose corruptions are mostly per-object and rarely change the image label.
    """
    rng = np.random.default_rng([seed, 7919])
    n = len(dataset.images)
    flipped = sorted(rng.choice(n, size=int(math.floor(rate * n + 0.5)), replace=False).tolist()) if n else []
    labels = [image.label for image in dataset.images]
    for i in flipped:
        others = [c for c in dataset.classes if c != labels[i]]
        labels[i] = others[int(rng.integers(len(others)))]
    return labels, flipped
