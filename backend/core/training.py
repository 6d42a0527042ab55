"""Training and evaluation through ultralytics, with settings chosen from the data.

Users are data people: nothing here needs a knob. Image size follows the images, epochs follow the
amount of data, the batch fits the data; every choice can be overridden by an environment variable
(LABELLOOP_EPOCHS, LABELLOOP_IMGSZ, LABELLOOP_BATCH, LABELLOOP_DEVICE, LABELLOOP_TRAIN_MINUTES).
"""

from __future__ import annotations

import logging
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from labelloop.config import Settings
from labelloop.config import settings as current_settings
from labelloop.core import recipe
from labelloop.core.datasets import DatasetInfo
from labelloop.core.kinds import TaskKind, kind_of
from labelloop.core.labelconfig import ControlSpec
from labelloop.core.safe_load import check_weights
from labelloop.core.yolo_env import import_yolo
from labelloop.errors import LabelloopError

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]



class TrainingError(LabelloopError, RuntimeError):
    """Training could not run; the message says why in words a labeler's admin can act on."""

    kind = "training"


@dataclass
class TrainSettings:
    epochs: int
    imgsz: int
    batch: int
    patience: int
    device: str
    time_hours: float | None = None
    seed: int = 0
    extra: dict = field(default_factory=dict)


def choose_settings(n_train: int, image_sides: list[int], task: TaskKind | str,
                    env: Settings | None = None, n_images: int | None = None) -> TrainSettings:
    """Settings from the data (``recipe``); each one overridable through the environment.

    ``n_train``: training files per epoch; ``n_images``: distinct images among them (see ``recipe.epochs_for``).
    """
    env = env or current_settings()
    side = statistics.median(image_sides) if image_sides else 320
    imgsz = int(min(640, max(32, math.ceil(side / 32) * 32)))
    batch = env.batch or _batch_without_single_remainder(n_train)
    settings = TrainSettings(
        epochs=env.epochs or recipe.epochs_for(n_train, batch, n_images),
        imgsz=env.imgsz or imgsz,
        batch=batch,
        patience=0,
        device=env.device or _auto_device(),
        time_hours=(env.train_minutes / 60.0) if env.train_minutes else None,
        extra={**recipe.extra_args(task, n_train), **env.train_args},
    )
    # While the last weights are kept (small data sits near chance for many epochs before it
    # learns), no early stop either.
    settings.patience = settings.epochs if n_train < recipe.SELECT_BEST_EPOCH_FROM else max(10, settings.epochs // 3)
    return settings


def _batch_without_single_remainder(n_train: int, largest: int = 16) -> int:
    """The largest batch <= 16 that does not leave a last batch of one image (BatchNorm cannot train on it)."""
    batch = int(min(largest, max(2, n_train)))
    while batch > 2 and n_train % batch == 1:
        batch -= 1
    return batch


def _auto_device() -> str:
    import torch

    return "0" if torch.cuda.is_available() else "cpu"


def image_sides(paths: list[Path], limit: int = 200) -> list[int]:
    sides = []
    for path in paths[:limit]:
        with Image.open(path) as img:
            sides.append(max(img.size))
    return sides


def choose_base(spec: ControlSpec, model_path: Path | None, env: Settings | None = None, imgsz: int = 640,
                warm_start: Callable[[str], Path | None] | None = None) -> str:
    """What training starts from: the tag's model_path, else LABELLOOP_BASE_MODEL, else LABELLOOP_MODEL_CONFIG,
    else the recipe's architecture for this image size — from the project's self-supervised warm start
    of that architecture when ``warm_start(architecture)`` has one (``pretrain.py``)."""
    env = env or current_settings()
    if model_path is not None:
        return str(model_path)
    if env.base_model:
        if not Path(env.base_model).is_file():
            raise TrainingError(f"LABELLOOP_BASE_MODEL={env.base_model} does not exist")
        return env.base_model
    if env.model_config:
        return env.model_config
    architecture = recipe.model_config(spec.kind, imgsz)
    warm = warm_start(architecture) if warm_start is not None else None
    return str(warm) if warm is not None else architecture


def train(
    dataset: DatasetInfo,
    spec: ControlSpec,
    base: str,
    train_settings: TrainSettings,
    workdir: Path,
    progress: Progress | None = None,
) -> Path:
    """Train from ``base`` (yaml config or .pt) on ``dataset``; returns the best weights file."""
    YOLO = import_yolo()
    try:
        if not base.endswith((".yaml", ".yml")):
            check_weights(base)  # a user's or registry checkpoint: refuse a malicious pickle before ultralytics unpickles it
        model = YOLO(base, task=spec.kind.ultralytics_task if base.endswith((".yaml", ".yml")) else None)
    except Exception as exc:
        raise TrainingError(f"cannot load base model {base}: {exc}") from exc
    wanted = spec.kind.ultralytics_task
    if model.task != wanted:  # (a segment model can *serve* boxes, but it cannot learn from boxes)
        raise TrainingError(f"base model {base} is a {model.task} model; training for {spec.task_type} "
                            f"needs a {wanted} model")
    total = train_settings.epochs

    def on_epoch_end(trainer) -> None:
        if progress:
            done = min(trainer.epoch + 1, total)
            progress(done / total, f"epoch {done} of {total}")

    model.add_callback("on_fit_epoch_end", on_epoch_end)
    started = time.time()
    kwargs: dict[str, Any] = dict(
        data=dataset.data,
        epochs=train_settings.epochs,
        imgsz=train_settings.imgsz,
        batch=train_settings.batch,
        patience=train_settings.patience,
        device=train_settings.device,
        seed=train_settings.seed,
        workers=0,  # no dataloader subprocesses: safe inside Celery workers and small on CPU
        plots=False,
        project=str(workdir),
        name="train",
        exist_ok=True,
        verbose=False,
        val=True,
    )
    if train_settings.time_hours:
        kwargs["time"] = train_settings.time_hours
    kwargs.update(train_settings.extra)  # LABELLOOP_TRAIN_ARGS: any ultralytics train argument
    if spec.kind.whole_image:  # the small-data recipe's augmentation and label smoothing
        kwargs["trainer"] = recipe.classification_trainer()
    try:
        model.train(**kwargs)
    except Exception as exc:
        raise TrainingError(f"ultralytics training failed: {exc}") from exc
    weights_dir = workdir / "train" / "weights"
    best = weights_dir / "best.pt"
    if not best.exists():
        best = weights_dir / "last.pt"
    if not best.exists():
        raise TrainingError(f"training produced no weights in {weights_dir}")
    log.info("trained %s in %.1f s (%d epochs)", base, time.time() - started, total)
    return best


def evaluate(weights: Path | str, dataset: DatasetInfo, imgsz: int, device: str) -> dict[str, float]:
    """Metrics of ``weights`` on the dataset's held-out tuning split (``val``)."""
    YOLO = import_yolo()
    model = YOLO(str(weights))
    with tempfile.TemporaryDirectory(prefix="labelloop-val-") as tmp:
        result = model.val(data=dataset.data, split="val", imgsz=imgsz, batch=16, device=device, workers=0,
                           plots=False, verbose=False, project=tmp, name="val", exist_ok=True)
    return metrics_of(result, model.task)


def metrics_of(result, task: TaskKind | str) -> dict[str, float]:
    """Tuning-split metrics of an ultralytics validation ``result`` for a model of ``task``."""
    kind = kind_of(task)
    if kind.whole_image:
        metrics = {"top1": float(result.top1), "top5": float(result.top5)}
    else:
        box = result.box
        metrics = {
            "box_map50": float(box.map50),
            "box_map50_95": float(box.map),
            "box_precision": float(box.mp),
            "box_recall": float(box.mr),
        }
        if kind.polygons:
            seg = result.seg
            metrics.update(mask_map50=float(seg.map50), mask_map50_95=float(seg.map),
                           mask_precision=float(seg.mp), mask_recall=float(seg.mr))
    metrics["primary"] = metrics[kind.primary_metric]
    return metrics


def settings_dict(train_settings: TrainSettings) -> dict[str, Any]:
    return asdict(train_settings)
