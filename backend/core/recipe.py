"""What to train and how, chosen from the data: architecture, schedule, augmentation, regularization.

Users are data people: none of this needs a knob. The recipe as a whole is measured against plain
baselines on the small-data regime (tens to hundreds of labels, ``bench/active_learning.py``,
``bench/detection_recipe.py``; the single choices that were measured apart are in README's figures)
and is recorded in each version's manifest (``settings.recipe``) so an analyst can see why a
version learned what it learned.

* **Architecture**: images of at most ``SMALL_IMAGE`` px get labelloop's own ultralytics yaml with
  fewer stride-2 stages (``model_configs/``), so a 64 px image keeps a 4×4 feature map; larger
  images keep the standard yolov8n configs.
* **Schedule**: epochs follow optimizer *steps* (``steps_for``), not images: at least ``MIN_STEPS``,
  so 40 labels get as many updates as 120, and ``STEPS_PER_IMAGE`` per training image above that, so
  harder data with more labels gets the updates it needs to leave chance; AdamW with a cosine decay,
  a short warm-up, EMA (ultralytics' own).
* **Augmentation that keeps labels valid**: classification gets flips, 90° turns, a small shift
  and mild colour jitter — never crops that can cut the object out; detection/segmentation keep
  ultralytics' box-aware augmentation, with mosaic off for small data.
* **Which weights**: the last epoch's, not the one that scored best on a small tuning split
  (that choice selects the split's noise); from ``SELECT_BEST_EPOCH_FROM`` images on, the best.
* **Noisy labels**: label smoothing (``LABEL_SMOOTHING``) for classification, because a labeler's
  first hundreds of answers hold mistakes and a model that memorizes them ranks them as certain.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

from labelloop.core.kinds import TaskKind, kind_of

CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
SMALL_IMAGE = 96
# Optimizer steps of one training. The floor is enough for a small model to learn easy images from
# scratch on a few dozen labels (the demo's shapes: 0.99 after 500 steps). Harder images need steps
# in proportion to the labels: textured shapes with 800 noisy labels stayed at chance with 500 steps
# (0.30-0.50 over 3 seeds) and reached 0.82-0.95 with ~2,400 (bench/figures/active_learning.md).
# The ceiling keeps a CPU training within minutes; large projects still see every image a few times.
MIN_STEPS = 500
STEPS_PER_IMAGE = 4
MAX_STEPS = 3000
MIN_EPOCHS, MAX_EPOCHS = 3, 150
LABEL_SMOOTHING = 0.1
# Below this many training images: no mosaic (it shrinks the few objects there are), AdamW at a
# higher rate, a one-epoch warm-up.
SMALL_DATA = 300
SMALL_DATA_ARGS = {"optimizer": "AdamW", "lr0": 0.003, "warmup_epochs": 1, "mosaic": 0.0, "cos_lr": True}
# ultralytics' own classification augmentation (crop down to 8 % of the area, RandAugment, random
# erasing) is replaced by TurnsAndShifts below; these arguments switch it off in its reports too.
SMALL_DATA_CLASSIFY_ARGS = {"erasing": 0.0, "auto_augment": None, "scale": 0.0}
# From this many training images (a tuning split of ~200) the best epoch on the tuning split is
# worth picking (ultralytics' best.pt and early stopping); below it the last weights are kept.
SELECT_BEST_EPOCH_FROM = 800


def model_config(kind: TaskKind | str, imgsz: int) -> str:
    """The ultralytics yaml a training from scratch starts from (a path for labelloop's own)."""
    kind = kind_of(kind)
    if imgsz <= SMALL_IMAGE and kind.small_image_config:
        return str(CONFIG_DIR / kind.small_image_config)
    return kind.standard_config


def steps_for(n_train: int) -> int:
    """Optimizer steps one training on ``n_train`` images should take (see MIN_STEPS / STEPS_PER_IMAGE)."""
    return int(min(MAX_STEPS, max(MIN_STEPS, STEPS_PER_IMAGE * n_train)))


def epochs_for(n_train: int, batch: int, n_images: int | None = None) -> int:
    """Epochs that give about ``steps_for(n_images)`` optimizer steps, clamped to [MIN_EPOCHS, MAX_EPOCHS].

    ``n_train`` counts the files one epoch sees; ``n_images`` the distinct images among them (default:
    the same). They differ when a class is up-weighted by repeating its files: the repeats make each
    epoch longer, not the training.
    """
    steps_per_epoch = max(1, math.ceil(n_train / max(1, batch)))
    steps = steps_for(n_train if n_images is None else n_images)
    return int(min(MAX_EPOCHS, max(MIN_EPOCHS, math.ceil(steps / steps_per_epoch))))


def extra_args(kind: TaskKind | str, n_train: int) -> dict[str, Any]:
    """ultralytics train arguments of the recipe for ``n_train`` training images."""
    # Keep the last (EMA, cosine-annealed) weights, not the epoch that scored best on the tuning split,
    # until that split is large: picking the best of ~100 epochs on a few dozen noisy labels selects
    # noise (measured, 400 noisy labels: 0.913 held-out accuracy with ultralytics' best.pt, 0.987
    # with the last weights; 80 labels: 0.680 vs 0.833). The tuning split still scores the result.
    select = {} if n_train >= SELECT_BEST_EPOCH_FROM else {"val": False}
    if n_train >= SMALL_DATA:
        return {"cos_lr": True, **select}
    return {**SMALL_DATA_ARGS, **(SMALL_DATA_CLASSIFY_ARGS if kind_of(kind).whole_image else {}), **select}


def describe(kind: TaskKind | str, imgsz: int, n_train: int, base: str) -> dict[str, Any]:
    """The recipe in words and numbers, for the manifest."""
    kind = kind_of(kind)
    warm = Path(base).suffix == ".pt" and Path(base).parent.name == "warm-start"
    architecture = Path(model_config(kind, imgsz)).name if warm else Path(base).name
    return {
        "architecture": architecture,
        "architecture_reason": (f"images <= {SMALL_IMAGE} px: fewer stride-2 stages"
                                if architecture == kind.small_image_config else "standard"),
        "start": ("self-supervised warm start on the project's images" if warm
                  else "user weights" if Path(base).suffix == ".pt" else "from scratch"),
        "schedule": f"~{steps_for(n_train)} optimizer steps ({STEPS_PER_IMAGE} per image, {MIN_STEPS}-{MAX_STEPS}), "
                    "cosine decay, EMA",
        "weights": "best epoch on the tuning split" if n_train >= SELECT_BEST_EPOCH_FROM else "last epoch",
        "augmentation": ("flips, 90-degree turns, small shifts, mild colour jitter (no crops)" if kind.whole_image
                         else "ultralytics box-aware augmentation" + (", no mosaic" if n_train < SMALL_DATA else "")),
        "label_smoothing": LABEL_SMOOTHING if kind.whole_image else 0.0,
        "small_data": n_train < SMALL_DATA,
    }


# -- classification trainer ----------------------------------------------------------------------

class TurnsAndShifts:
    """Label-preserving augmentation for image classification, PIL image → float tensor in [0, 1].

    Resize to the training size, then a random element of the 8 flips/turns of the square, a shift
    of up to 1/8 of the side (edge pixels fill the border) and mild brightness/contrast jitter.
    Nothing is cropped away, so the object the label names stays in the picture.
    """

    def __init__(self, size: int):
        import torch
        import torchvision.transforms as T

        self.rot90 = torch.rot90
        self.size = size
        self.resize = T.Resize((size, size), interpolation=T.InterpolationMode.BILINEAR)
        self.shift = T.RandomCrop(size, padding=max(1, size // 8), padding_mode="edge")
        self.jitter = T.ColorJitter(brightness=0.2, contrast=0.2)
        self.to_tensor = T.ToTensor()

    def __call__(self, image):
        tensor = self.to_tensor(self.jitter(self.shift(self.resize(image))))
        if random.random() < 0.5:
            tensor = tensor.flip(2)
        return self.rot90(tensor, random.randrange(4), (1, 2))


class SmoothedClassificationLoss:
    """Cross-entropy with label smoothing: a mislabeled image pulls the model less far."""

    def __init__(self, smoothing: float = LABEL_SMOOTHING):
        self.smoothing = smoothing

    def __call__(self, preds, batch):
        import torch.nn.functional as F

        preds = preds[1] if isinstance(preds, (list, tuple)) else preds
        loss = F.cross_entropy(preds, batch["cls"], label_smoothing=self.smoothing)
        return loss, {"loss": loss.detach()}


def classification_trainer():
    """An ultralytics ClassificationTrainer subclass with the small-data recipe (built lazily: torch and
    ultralytics are imported only where training runs)."""
    from ultralytics.models.yolo.classify import ClassificationTrainer

    class SmallDataClassificationTrainer(ClassificationTrainer):
        """ClassificationTrainer with TurnsAndShifts on the training split and label smoothing.

        The saved weights are a plain ultralytics ClassificationModel: the loss is set on the
        training model only (ultralytics strips ``criterion`` from checkpoints).
        """

        def build_dataset(self, img_path: str, mode: str = "train", batch=None):
            dataset = super().build_dataset(img_path, mode, batch)
            if mode == "train":
                dataset.torch_transforms = TurnsAndShifts(self.args.imgsz)
            return dataset

        def _setup_train(self):
            super()._setup_train()
            self.model.criterion = SmoothedClassificationLoss()

    return SmallDataClassificationTrainer
