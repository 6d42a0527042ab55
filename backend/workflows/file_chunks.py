"""Predictions of image files in chunks that any worker can run: the FiftyOne face's forward passes at size.

A FiftyOne dataset's samples are image files on a volume every labelloop process mounts (the dataset's own
media folder). Predicting 100k of them is forward passes, which more workers share; writing the labels back is
FiftyOne's part, done where the dataset is open. So the work is cut into chunks of image paths (``CHUNK``), a
chunk needs only its ``FilesContext`` (the version's weights on the model volume, the label config, the
threshold) and its paths, and it returns its predictions as JSON:

* ``run_here`` predicts the chunks one after another in this process (no worker needed);
* the Celery face (``labelloop.tasks.jobs.predict_files_on_celery``) lets every prediction worker take them.

Either way the caller receives ``(chunk index, predictions)`` as chunks finish, in any order, or ``(chunk
index, reason)`` for a chunk that failed (its samples are left as they were: running again predicts them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labelloop.core.labelconfig import parse_label_config
from labelloop.core.predict import ImagePrediction, load_model, predict_images

CHUNK = 500  # image files per chunk: a few seconds of forward passes for a 64 px model on 2 cores
MAX_CHUNK = 5000  # what a worker accepts in one message
MAX_PATH = 4096


@dataclass(frozen=True)
class FilesContext:
    """Everything a chunk needs besides its paths; JSON-able, so a worker on another machine gets it."""

    weights: str  # on the model volume every worker mounts (MODEL_DIR), or a base model's path
    version: str
    label_config: str
    threshold: float
    batch: int = 64  # images per forward pass

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FilesContext:
        threshold, batch = float(data["threshold"]), int(data.get("batch", 64))
        if not 0.0 <= threshold <= 1.0 or not 1 <= batch <= 256:
            raise ValueError(f"threshold {threshold} must be in [0, 1] and batch {batch} in [1, 256]")
        return cls(str(data["weights"]), str(data["version"]), str(data["label_config"]), threshold, batch)


# (context, chunks of image paths) -> (chunk index, its predictions in order, or why it failed), as chunks finish
FilesRunner = Callable[[FilesContext, list[list[str]]], Iterator[tuple[int, "list[ImagePrediction] | str"]]]


def checked_paths(paths: list[Any]) -> list[Path]:
    """A chunk's paths as sent to a worker: absolute file paths, bounded in number and length."""
    if not isinstance(paths, list) or len(paths) > MAX_CHUNK:
        raise ValueError(f"a chunk is a list of at most {MAX_CHUNK} image paths")
    checked = []
    for path in paths:
        if not isinstance(path, str) or not path.startswith("/") or len(path) > MAX_PATH or "\x00" in path:
            raise ValueError(f"not an absolute image path: {str(path)[:100]!r}")
        checked.append(Path(path))
    return checked


def predict_chunk(context: FilesContext, paths: list[Any]) -> list[dict[str, Any]]:
    """Predict one chunk of image files with the context's version; the predictions as JSON, in order."""
    from labelloop.workflows.pipeline import prediction_to_json  # pipeline is the one place predictions cross JSON

    files = checked_paths(paths)
    spec = parse_label_config(context.label_config)
    model = load_model(context.weights, context.version)  # cached per process: a worker loads it once
    return [prediction_to_json(p) for p in predict_images(model, files, spec, context.threshold, batch=context.batch)]


def run_here(context: FilesContext, chunks: list[list[str]]) -> Iterator[tuple[int, list[ImagePrediction] | str]]:
    """The chunks one after another in this process, lazily (memory: one chunk's predictions)."""
    spec = parse_label_config(context.label_config)
    model = load_model(context.weights, context.version)
    for index, chunk in enumerate(chunks):
        yield index, predict_images(model, checked_paths(chunk), spec, context.threshold, batch=context.batch)
