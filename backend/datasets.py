"""Label Studio annotations (export JSON) → ultralytics datasets, with a deterministic split.

The split is by task id (a hash), so a task never changes sides as the project grows: the held-out
tuning split of version n is a subset of version n+1's, and versions compare on the same tasks.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .labelconfig import ControlSpec

VAL_FRACTION = 0.2


class DatasetError(ValueError):
    """The annotations cannot make a training set (too few, no labels...); the message says why."""


def split_of(task_id: int | str, val_fraction: float = VAL_FRACTION) -> str:
    """'val' (held-out tuning split) or 'train', decided by a hash of the task id alone."""
    digest = hashlib.sha1(str(task_id).encode()).digest()
    return "val" if int.from_bytes(digest[:4], "big") / 2**32 < val_fraction else "train"


def latest_human_annotation(task: dict[str, Any]) -> dict[str, Any] | None:
    """The newest annotation that was not skipped/cancelled, or None (predictions never count)."""
    kept = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    if not kept:
        return None
    return max(kept, key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""), a.get("id") or 0))


def labeled_tasks(tasks: list[dict[str, Any]], spec: ControlSpec) -> list[tuple[dict, list[dict]]]:
    """(task, regions of our control) for every task whose latest human annotation uses our control.

    For detection/segmentation an annotation with no region of our control still counts (an image
    with nothing in it is a useful negative); for classification it needs a choice.
    """
    out = []
    for task in tasks:
        annotation = latest_human_annotation(task)
        if annotation is None:
            continue
        regions = [r for r in annotation.get("result") or [] if r.get("from_name") == spec.from_name]
        if spec.task_type == "classification" and not any(_choice(r, spec) for r in regions):
            continue
        out.append((task, regions))
    return out


def annotation_fingerprint(rows: list[tuple[dict, list[dict]]]) -> str:
    """A digest of which annotations (id, last update) a training would read: equal → nothing new."""
    items = []
    for task, _ in rows:
        annotation = latest_human_annotation(task) or {}
        items.append(f"{task.get('id')}:{annotation.get('id')}:{annotation.get('updated_at')}")
    return hashlib.sha1("\n".join(sorted(items)).encode()).hexdigest()


def first_training_minimum(spec: ControlSpec) -> int:
    """Labeled tasks needed before the first automatic training: two per class, at least eight."""
    return max(8, 2 * len(spec.labels))


def _choice(region: dict, spec: ControlSpec) -> str | None:
    choices = (region.get("value") or {}).get("choices") or []
    return next((c for c in choices if c in spec.labels), None)


def _region_label(region: dict, spec: ControlSpec) -> str | None:
    value = region.get("value") or {}
    labels = value.get(spec.result_type) or []
    return next((label for label in labels if label in spec.labels), None)


def rectangle_to_polygon(value: dict) -> list[tuple[float, float]]:
    """Corners (percent) of a possibly rotated Label Studio rectangle; rotation is about (x, y)."""
    x, y, w, h = (float(value.get(k, 0)) for k in ("x", "y", "width", "height"))
    angle = math.radians(float(value.get("rotation") or 0))
    cos, sin = math.cos(angle), math.sin(angle)
    corners = [(0, 0), (w, 0), (w, h), (0, h)]
    return [(x + dx * cos - dy * sin, y + dx * sin + dy * cos) for dx, dy in corners]


def _clip01(v: float) -> float:
    return min(1.0, max(0.0, v))


def yolo_label_lines(regions: list[dict], spec: ControlSpec, class_index: dict[str, int]) -> list[str]:
    """ultralytics txt lines for one image: 'cls cx cy w h' (detect) or 'cls x1 y1 ...' (segment)."""
    lines = []
    for region in regions:
        label = _region_label(region, spec)
        if label is None:
            continue
        value = region["value"]
        if spec.task_type == "detection":
            xs, ys = zip(*rectangle_to_polygon(value))
            x1, x2 = _clip01(min(xs) / 100), _clip01(max(xs) / 100)
            y1, y2 = _clip01(min(ys) / 100), _clip01(max(ys) / 100)
            if x2 - x1 <= 0 or y2 - y1 <= 0:
                continue
            lines.append(f"{class_index[label]} {(x1 + x2) / 2:.6f} {(y1 + y2) / 2:.6f} {x2 - x1:.6f} {y2 - y1:.6f}")
        else:
            points = value.get("points") or []
            if len(points) < 3:
                continue
            coords = " ".join(f"{_clip01(float(px) / 100):.6f} {_clip01(float(py) / 100):.6f}" for px, py in points)
            lines.append(f"{class_index[label]} {coords}")
    return lines


@dataclass
class DatasetInfo:
    root: Path
    data: str  # what ultralytics' train(data=...) takes: data.yaml (detect/segment) or the root dir (classify)
    classes: list[str]
    counts: dict[str, Any] = field(default_factory=dict)
    task_ids: dict[str, list[int]] = field(default_factory=dict)  # split -> task ids


def build_dataset(
    tasks: list[dict[str, Any]],
    spec: ControlSpec,
    image_paths: dict[int, Path],
    out: Path,
    min_train: int = 2,
) -> DatasetInfo:
    """Write an ultralytics dataset for ``spec`` from labeled tasks whose image is in ``image_paths``.

    Tasks whose image could not be fetched (absent from ``image_paths``) are left out and counted.
    Every class of the label config is a model class, in config order, so class indices are stable
    across versions even when a class has no example yet.
    """
    out.mkdir(parents=True, exist_ok=True)
    classes = list(spec.labels)
    class_index = {label: i for i, label in enumerate(classes)}
    rows = labeled_tasks(tasks, spec)
    missing = [t["id"] for t, _ in rows if t["id"] not in image_paths]
    rows = [(t, r) for t, r in rows if t["id"] in image_paths]
    splits = {"train": [], "val": []}
    for task, regions in rows:
        splits[split_of(task["id"])].append((task, regions))
    _ensure_both_splits(splits)
    if len(splits["train"]) < min_train:
        raise DatasetError(
            f"only {len(splits['train'])} labeled task(s) with images in the training split; need at least {min_train}"
        )

    per_class: Counter[str] = Counter()
    for split, items in splits.items():
        for task, regions in items:
            source = image_paths[task["id"]]
            name = f"{task['id']}{source.suffix.lower() or '.png'}"
            if spec.task_type == "classification":
                label = next(_choice(r, spec) for r in regions if _choice(r, spec))
                per_class[label] += 1
                _link(source, out / split / label / name)
            else:
                _link(source, out / "images" / split / name)
                lines = yolo_label_lines(regions, spec, class_index)
                per_class.update(classes[int(line.split()[0])] for line in lines)
                label_file = out / "labels" / split / f"{task['id']}.txt"
                label_file.parent.mkdir(parents=True, exist_ok=True)
                label_file.write_text("\n".join(lines) + ("\n" if lines else ""))

    if spec.task_type == "classification":
        for split in splits:  # ultralytics reads the class list from the folder names of each split
            for label in classes:
                (out / split / label).mkdir(parents=True, exist_ok=True)
        data = str(out)
    else:
        names = "\n".join(f"  {i}: {_yaml_str(label)}" for i, label in enumerate(classes))
        (out / "data.yaml").write_text(
            f"path: {_yaml_str(str(out))}\ntrain: images/train\nval: images/val\nnames:\n{names}\n"
        )
        data = str(out / "data.yaml")

    counts = {
        "train": len(splits["train"]),
        "val": len(splits["val"]),
        "missing_images": len(missing),
        "per_class": dict(per_class),
    }
    task_ids = {s: sorted(t["id"] for t, _ in items) for s, items in splits.items()}
    return DatasetInfo(root=out, data=data, classes=classes, counts=counts, task_ids=task_ids)


def _ensure_both_splits(splits: dict[str, list]) -> None:
    """With very few tasks the hash can put all on one side; move one so both sides exist."""
    if not splits["val"] and len(splits["train"]) >= 3:
        splits["train"].sort(key=lambda item: hashlib.sha1(str(item[0]["id"]).encode()).digest())
        splits["val"].append(splits["train"].pop(0))
    if not splits["train"] and len(splits["val"]) >= 2:
        splits["train"].append(splits["val"].pop())


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _yaml_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
