"""Forward passes over image files in chunks that any worker can run: the FiftyOne face's work at size.

A FiftyOne dataset's samples are image files on a volume every labelloop process mounts (the dataset's own
media folder). Predicting 100k of them is forward passes, which more workers share; writing the labels back is
FiftyOne's part, done where the dataset is open. So the work is cut into chunks of image paths (``CHUNK``), a
chunk needs only its ``FilesContext`` (the version's weights on the model volume, the label config, the
threshold, and what to compute: ``PREDICT`` the engine's predictions, ``EMBED`` the backbone's vectors) and its
paths, and it returns its outputs as JSON:

* ``run_here`` predicts the chunks one after another in this process (no worker needed);
* the Celery face (``labelloop.tasks.jobs.predict_files_on_celery``) lets every prediction worker take them.

The caller receives ``(chunk index, outputs)`` as chunks finish, in any order (``ImagePrediction``s, or vectors
as lists of floats, one per path in order). On workers a chunk that fails every try comes back as ``(chunk index,
reason)`` and its samples are left as they were (running again computes them); here a failure stops the run
with its error, as any local computation does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labelloop.core.labelconfig import parse_label_config
from labelloop.core.predict import embed_images, load_model, predict_images

PREDICT, EMBED = "predict", "embed"  # what a chunk computes
CHUNK = 500  # image files per chunk: a few seconds of forward passes for a 64 px model on 2 cores
MAX_CHUNK = 5000  # what a worker accepts in one message
MAX_PATH = 4096
MAX_LABEL_CONFIG = 1_000_000  # characters: a label config is a few KB


@dataclass(frozen=True)
class FilesContext:
    """Everything a chunk needs besides its paths; JSON-able, so a worker on another machine gets it."""

    weights: str  # on the model volume every worker mounts (MODEL_DIR), or a base model's path
    version: str
    label_config: str  # PREDICT: the project's (which model class is which label)
    threshold: float
    batch: int = 64  # images per forward pass
    work: str = PREDICT

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FilesContext:
        threshold, batch, work = float(data["threshold"]), int(data.get("batch", 64)), str(data.get("work") or PREDICT)
        if not 0.0 <= threshold <= 1.0 or not 1 <= batch <= 256:
            raise ValueError(f"threshold {threshold} must be in [0, 1] and batch {batch} in [1, 256]")
        if work not in (PREDICT, EMBED):
            raise ValueError(f"unknown chunk work {work!r}")
        if len(str(data["label_config"])) > MAX_LABEL_CONFIG or len(str(data["version"])) > 200:
            raise ValueError("label config or version name too long")
        return cls(str(data["weights"]), str(data["version"]), str(data["label_config"]), threshold, batch, work)


# (context, chunks of image paths) -> (chunk index, its outputs in order, or why it failed), as chunks finish
FilesRunner = Callable[[FilesContext, list[list[str]]], Iterator[tuple[int, "list[Any] | str"]]]


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


def compute(context: FilesContext, paths: list[Any]) -> list[Any]:
    """One chunk's outputs, in order: ``ImagePrediction``s (PREDICT) or vectors as lists of floats (EMBED)."""
    files = checked_paths(paths)
    for path in files:
        if not path.is_file():  # a device or a folder is no image; a missing file fails the chunk with its name
            raise ValueError(f"not an image file: {path}")
    model = load_model(context.weights, context.version)  # cached per process: a worker loads it once
    if context.work == EMBED:
        return [vector.tolist() for vector in embed_images(model, files, batch=context.batch)]
    return predict_images(model, files, parse_label_config(context.label_config), context.threshold,
                          batch=context.batch)


def run_chunk(context: FilesContext, paths: list[Any]) -> list[Any]:
    """``compute`` as JSON, for a worker's answer (``decode`` turns it back)."""
    from labelloop.workflows.pipeline import prediction_to_json  # pipeline is the one place predictions cross JSON

    outputs = compute(context, paths)
    return outputs if context.work == EMBED else [prediction_to_json(p) for p in outputs]


def decode(context: FilesContext, outputs: list[Any]) -> list[Any]:
    """What ``run_chunk`` returned, as ``compute`` returns it."""
    from labelloop.workflows.pipeline import prediction_from_json

    return outputs if context.work == EMBED else [prediction_from_json(p) for p in outputs]


def outputs_fit(chunk: list[str], outputs: list[Any] | str) -> list[Any] | str:
    """A chunk's outputs, or the reason they cannot be used: a failure's own reason, or one output per path."""
    if not isinstance(outputs, str) and len(outputs) != len(chunk):
        return f"{len(outputs)} outputs for {len(chunk)} images"
    return outputs


def closing(results: Iterator[Any]) -> Iterator[Any]:
    """A runner's results to their end, closed when the caller stops early (a failed write): the runner's
    ``finally`` then takes back the chunks no one will read."""
    try:
        yield from results
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()


def run_here(context: FilesContext, chunks: list[list[str]]) -> Iterator[tuple[int, list[Any] | str]]:
    """The chunks one after another in this process, lazily (memory: one chunk's outputs)."""
    for index, chunk in enumerate(chunks):
        yield index, compute(context, chunk)
