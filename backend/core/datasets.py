"""Labeled images (``core.truth``) → ultralytics datasets, with a deterministic split.

The split is by task id (a hash), so a task never changes sides as the project grows: the held-out
tuning split of version n is a subset of version n+1's, and versions compare on the same tasks.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labelloop.core.labelconfig import ControlSpec
from labelloop.core.truth import LabeledImage, TruthRegion
from labelloop.errors import LabelloopError

VAL_FRACTION = 0.2
MAX_NAME_BYTES = 255  # NAME_MAX of Linux and macOS filesystems
# ultralytics' own layout for class names a folder cannot hold: {split}/{class index}/ folders, the
# names in this file at the dataset root (ultralytics/data/converter.py writes it, check_cls_dataset reads it)
INDEXED_NAMES_FILE = ".ndjson.yaml"


class DatasetError(LabelloopError, ValueError):
    """The annotations cannot make a training set (too few, no labels...); the message says why."""

    kind, http_status = "dataset", 422


def is_safe_name(text: str) -> bool:
    """Whether ``text`` (a label, from outside) can be one path component as it is: not empty, ``.``
    or ``..``, no separator, NUL or control character, at most MAX_NAME_BYTES in UTF-8."""
    return (isinstance(text, str) and text not in ("", ".", "..") and not re.search(r"[/\\\x00-\x1f\x7f]", text)
            and len(text.encode("utf-8", "surrogatepass")) <= MAX_NAME_BYTES)


def class_dir_names(labels: list[str] | tuple[str, ...]) -> dict[str, str]:
    """label → folder of a classification dataset.

    The label itself when every label is a safe folder name and no two differ only by case (a
    case-insensitive filesystem would merge them): the layout training always used, so nothing
    changes for ordinary labels. Otherwise every class gets its index as folder name ("0", "1", ...)
    and ``build_dataset`` writes the real labels to INDEXED_NAMES_FILE, which ultralytics reads as the
    model's class names: a label like ``../x``, ``/abs`` or ``a/b`` never becomes a path.
    """
    labels = list(labels)
    folded = [label.casefold() for label in labels if isinstance(label, str)]
    if all(is_safe_name(label) for label in labels) and len(set(folded)) == len(set(labels)):
        return {label: label for label in labels}
    return {label: str(index) for index, label in enumerate(labels)}


def _file_stem(task_id) -> str:
    """A task's file name stem: its id when it is an integer (Label Studio's), else a digest of it."""
    text = str(task_id)
    return text if re.fullmatch(r"-?[0-9]{1,30}", text) else "task-" + hashlib.sha1(text.encode()).hexdigest()[:20]


def split_of(task_id: int | str, val_fraction: float = VAL_FRACTION) -> str:
    """'val' (held-out tuning split) or 'train', decided by a hash of the task id alone."""
    digest = hashlib.sha1(str(task_id).encode()).digest()
    return "val" if int.from_bytes(digest[:4], "big") / 2**32 < val_fraction else "train"


def annotation_fingerprint(images: list[LabeledImage]) -> str:
    """A digest of which annotations (id, last update) a training would read: equal → nothing new."""
    items = sorted(f"{image.task_id}:{image.annotation}" for image in images)
    return hashlib.sha1("\n".join(items).encode()).hexdigest()


def first_training_minimum(spec: ControlSpec) -> int:
    """Labeled tasks needed before the first automatic training: two per class, at least eight."""
    return max(8, 2 * len(spec.labels))


def yolo_label_lines(regions: tuple[TruthRegion, ...], spec: ControlSpec, class_index: dict[str, int]) -> list[str]:
    """ultralytics txt lines for one image: 'cls cx cy w h' (detect) or 'cls x1 y1 ...' (segment)."""
    lines = []
    for region in regions:
        if spec.kind.polygons:
            coords = " ".join(f"{x:.6f} {y:.6f}" for x, y in region.polygon)
            lines.append(f"{class_index[region.label]} {coords}")
        else:
            x1, y1, x2, y2 = region.box
            lines.append(f"{class_index[region.label]} {(x1 + x2) / 2:.6f} {(y1 + y2) / 2:.6f} {x2 - x1:.6f} {y2 - y1:.6f}")
    return lines


@dataclass
class DatasetInfo:
    root: Path
    data: str  # what ultralytics' train(data=...) takes: data.yaml (detect/segment) or the root dir (classify)
    classes: list[str]
    counts: dict[str, Any] = field(default_factory=dict)
    task_ids: dict[str, list[int]] = field(default_factory=dict)  # split -> task ids
    class_dirs: dict[str, str] = field(default_factory=dict)  # classification: label -> folder name

    def class_dir(self, split: str, label: str) -> Path:
        """The folder of ``label``'s images in ``split`` (classification); never the label as a path."""
        return Path(self.root) / split / self.class_dirs[label]


def build_dataset(
    images: list[LabeledImage],
    spec: ControlSpec,
    image_paths: dict[int, Path],
    out: Path,
    min_train: int = 2,
    repeats: dict[str, int] | None = None,
) -> DatasetInfo:
    """Write an ultralytics dataset for ``spec`` from labeled images whose file is in ``image_paths``.

    Tasks whose image could not be fetched (absent from ``image_paths``) are left out and counted.
    Every class of the label config is a model class, in config order, so class indices are stable
    across versions even when a class has no example yet. Labels come from outside and never become
    paths as they are: classification folders are named by ``class_dir_names``, files by task id.
    ``repeats`` (label -> n, cost up-weighting): a training image of that label (boxes: its costliest
    region's) is written n times, so an epoch shows it n times; the tuning split is never repeated.
    """
    out.mkdir(parents=True, exist_ok=True)
    repeats = repeats or {}
    classes = list(spec.labels)
    class_index = {label: i for i, label in enumerate(classes)}
    dirs = class_dir_names(classes) if spec.kind.whole_image else {}
    missing = [image.task_id for image in images if image.task_id not in image_paths]
    splits: dict[str, list[LabeledImage]] = {"train": [], "val": []}
    for image in images:
        if image.task_id in image_paths:
            splits[split_of(image.task_id)].append(image)
    _ensure_both_splits(splits)
    if len(splits["train"]) < min_train:
        raise DatasetError(
            f"only {len(splits['train'])} labeled task(s) with images in the training split; need at least {min_train}"
        )

    per_class: Counter[str] = Counter()
    files = 0
    for split, items in splits.items():
        for image in items:
            source = image_paths[image.task_id]
            labels = [image.label] if spec.kind.whole_image else [r.label for r in image.regions]
            times = max([repeats.get(str(label), 1) for label in labels] + [1]) if split == "train" else 1
            if spec.kind.whole_image:
                per_class[image.label] += 1
            else:
                lines = yolo_label_lines(image.regions, spec, class_index)
                per_class.update(classes[int(line.split()[0])] for line in lines)
            for copy in range(times):
                stem = _file_stem(image.task_id) + (f"-r{copy}" if copy else "")
                name = f"{stem}{source.suffix.lower() or '.png'}"
                files += split == "train"
                if spec.kind.whole_image:
                    link_or_copy(source, out / split / dirs[image.label] / name)
                else:
                    link_or_copy(source, out / "images" / split / name)
                    label_file = out / "labels" / split / f"{stem}.txt"
                    label_file.parent.mkdir(parents=True, exist_ok=True)
                    label_file.write_text("\n".join(lines) + ("\n" if lines else ""))

    if spec.kind.whole_image:
        for split in splits:  # ultralytics reads the class list from the folder names of each split
            for label in classes:
                (out / split / dirs[label]).mkdir(parents=True, exist_ok=True)
        if any(folder != label for label, folder in dirs.items()):  # indexed folders: the names live here
            names = "\n".join(f"  {i}: {_yaml_text(label)}" for i, label in enumerate(classes))
            (out / INDEXED_NAMES_FILE).write_text(f"names:\n{names}\n", encoding="utf-8")
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
        "train_files": files,  # training images with up-weighting's repeats (= train without)
        "missing_images": len(missing),
        "per_class": dict(per_class),
    }
    task_ids = {s: sorted(image.task_id for image in items) for s, items in splits.items()}
    return DatasetInfo(root=out, data=data, classes=classes, counts=counts, task_ids=task_ids, class_dirs=dirs)


def _ensure_both_splits(splits: dict[str, list]) -> None:
    """With very few tasks the hash can put all on one side; move one so both sides exist."""
    if not splits["val"] and len(splits["train"]) >= 3:
        splits["train"].sort(key=lambda image: hashlib.sha1(str(image.task_id).encode()).digest())
        splits["val"].append(splits["train"].pop(0))
    if not splits["train"] and len(splits["val"]) >= 2:
        splits["train"].append(splits["val"].pop())


def link_or_copy(source: Path, target: Path) -> None:
    """Hard-link ``source`` at ``target`` (no bytes copied, and the file outlives ``source``'s name);
    copy where a link is impossible (another filesystem)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _yaml_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _yaml_text(text: str) -> str:
    """A YAML double-quoted scalar (JSON's escapes are YAML's): any label, newlines and NUL included,
    reads back as itself; ultralytics strips unprintable characters from a file that fails to parse."""
    return json.dumps(text, ensure_ascii=False)
