"""Learning before the first label: self-supervised pretraining of a classifier's backbone on a project's images.

SimCLR-style contrastive learning: two random views of every image (crop, flips, turns, colour
jitter, grey) should map to nearby vectors and away from the other images' views (NT-Xent loss).
No label is read, so every task image — labeled or not — can be used, as soon as it is imported.

The result is a plain ultralytics classification checkpoint of the recipe's architecture for that
image size (``recipe.model_config``); its classifier layer is a placeholder that ultralytics
replaces when a training starts from it with the project's classes, so a warm start is just
another base model.
"""

from __future__ import annotations

import datetime as dt
import math
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np

from labelloop.core import recipe
from labelloop.core.kinds import CLASSIFICATION

MAX_IMAGES = 5000  # a sample of a large project is enough for a warm start, and bounds memory
BATCH = 128
TEMPERATURE = 0.2  # NT-Xent temperature (SimCLR's range for small batches)
PROJECTION_DIM = 128


def _load(images: list[Path], size: int):
    """Images as a uint8 tensor (n, 3, size, size), RGB; undecodable files are skipped."""
    import cv2
    import torch

    arrays = []
    for path in images:
        array = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if array is None:
            continue
        array = cv2.resize(array, (size, size), interpolation=cv2.INTER_AREA)
        arrays.append(array[:, :, ::-1].transpose(2, 0, 1).copy())
    if not arrays:
        raise ValueError("no decodable image to pretrain on")
    return torch.from_numpy(np.stack(arrays))


def augment_batch(images, generator=None):
    """Two SimCLR views' worth of randomness for a uint8 batch (n, 3, s, s) → float views in [0, 1].

    One affine resampling per image does the random crop (35–100 % of the area, aspect 3:4–4:3),
    the flip and the 90° turn together; then colour jitter (p 0.8) and grey (p 0.2), per image.
    Batched tensor ops: Python-level per-image transforms made the pretraining CPU-bound on them.
    """
    import torch
    import torch.nn.functional as F

    x = images.float() / 255.0
    n = x.shape[0]
    rand = lambda *shape: torch.rand(*shape, generator=generator)
    area = 0.35 + 0.65 * rand(n)
    aspect = torch.exp((rand(n) - 0.5) * 2 * math.log(4 / 3))
    sw = torch.sqrt(area * aspect).clamp(max=1.0)
    sh = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (rand(n) * 2 - 1) * (1 - sw)
    cy = (rand(n) * 2 - 1) * (1 - sh)
    turns = torch.randint(0, 4, (n,), generator=generator).float() * (math.pi / 2)
    flip = torch.where(rand(n) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(turns), torch.sin(turns)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = sw * cos * flip, -sw * sin
    theta[:, 1, 0], theta[:, 1, 1] = sh * sin * flip, sh * cos
    theta[:, 0, 2], theta[:, 1, 2] = cx, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    jitter = (rand(n) < 0.8).float().view(n, 1, 1, 1)
    brightness = 1 + (rand(n).view(n, 1, 1, 1) * 2 - 1) * 0.4
    contrast = 1 + (rand(n).view(n, 1, 1, 1) * 2 - 1) * 0.4
    saturation = 1 + (rand(n).view(n, 1, 1, 1) * 2 - 1) * 0.4
    jittered = x * brightness
    mean = (jittered * weights).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    jittered = (jittered - mean) * contrast + mean
    grey = (jittered * weights).sum(1, keepdim=True)
    jittered = grey + (jittered - grey) * saturation
    x = jitter * jittered + (1 - jitter) * x
    to_grey = (rand(n) < 0.2).float().view(n, 1, 1, 1)
    x = to_grey * (x * weights).sum(1, keepdim=True).expand_as(x) + (1 - to_grey) * x
    return x.clamp(0.0, 1.0)


def nt_xent(z1, z2, temperature: float = TEMPERATURE):
    """SimCLR's loss: each view must pick its partner among the 2n - 1 other views of the batch."""
    import torch
    import torch.nn.functional as F

    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    similarity = z @ z.T / temperature
    similarity.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(similarity, targets)


def pretrain_classifier(images: list[Path], imgsz: int, out: Path, steps: int, seed: int = 0,
                        progress: Callable[[float, str], None] | None = None) -> Path:
    """Pretrain the recipe's classifier for ``imgsz`` on ``images``; writes an ultralytics checkpoint to ``out``.

    The checkpoint is written to a temporary name and renamed, so a reader never sees half a file.
    """
    import torch

    from labelloop.core.yolo_env import prepare

    prepare()  # ultralytics offline, in labelloop's config dir, before its first import
    from ultralytics.utils import NUM_THREADS

    # As many threads as ultralytics trains with (all cores but one): with every core, a worker that
    # shares its machine with Label Studio and the service oversubscribes it, and OpenMP's waiting
    # threads made a step ~8x slower (measured: 5.4 s vs 0.66 s per step on 2 cores).
    threads_before = torch.get_num_threads()
    torch.set_num_threads(NUM_THREADS)
    try:
        return _pretrain(images, imgsz, Path(out), steps, seed, progress)
    finally:
        torch.set_num_threads(threads_before)


def _pretrain(images: list[Path], imgsz: int, out: Path, steps: int, seed: int,
              progress: Callable[[float, str], None] | None) -> Path:
    import torch
    from torch import nn
    from ultralytics.nn.tasks import ClassificationModel

    say = progress or (lambda fraction, message: None)
    rng = random.Random(seed)
    random.seed(seed)
    torch.manual_seed(seed)
    chosen = list(images)
    if len(chosen) > MAX_IMAGES:
        chosen = rng.sample(chosen, MAX_IMAGES)
    say(0.0, f"reading {len(chosen)} images")
    data = _load(chosen, imgsz)
    config = recipe.model_config(CLASSIFICATION, imgsz)
    model = ClassificationModel(config, nc=2, verbose=False)
    layers, head = model.model[:-1], model.model[-1]
    width = head.linear.in_features
    projector = nn.Sequential(nn.Linear(width, 256), nn.BatchNorm1d(256), nn.ReLU(inplace=True),
                              nn.Linear(256, PROJECTION_DIM))

    def embed(x):
        for layer in layers:  # the recipe's configs are a plain chain (every layer reads the previous)
            x = layer(x)
        return projector(head.pool(head.conv(x)).flatten(1))

    parameters = [*model.parameters(), *projector.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=2e-3, weight_decay=1e-4)
    schedule: torch.optim.lr_scheduler.LRScheduler
    if steps >= 10:  # a 5 % warm-up of at least two steps (one step would divide by zero in OneCycleLR)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps,
                                                       pct_start=max(0.05, 2.0 / steps))
    else:  # a handful of steps (tests, smoke runs): no schedule
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    batch = min(BATCH, len(data))
    model.train()
    projector.train()
    losses = []
    for step in range(steps):
        index = torch.randint(len(data), (batch,))
        x1, x2 = augment_batch(data[index]), augment_batch(data[index])
        loss = nt_xent(embed(x1), embed(x2))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if step % 10 == 0 or step + 1 == steps:
            say((step + 1) / steps, f"pretraining step {step + 1}/{steps}: contrastive loss {np.mean(losses[-10:]):.3f}")
    if not math.isfinite(losses[-1]):
        raise ValueError("pretraining diverged (loss is not finite)")

    model.eval()
    model.names = {0: "class0", 1: "class1"}  # placeholders: training with real classes replaces the head
    final_loss = float(np.mean(losses[-10:]))
    checkpoint = {
        "model": model,
        "train_args": {"task": CLASSIFICATION.ultralytics_task, "imgsz": imgsz, "model": Path(config).name},
        "date": dt.datetime.now(dt.timezone.utc).isoformat(),
        "labelloop_pretraining": {"method": "SimCLR (NT-Xent)", "images": len(data), "steps": steps,
                                  "batch": batch, "final_loss": final_loss,
                                  "architecture": Path(config).name},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    torch.save(checkpoint, partial)
    partial.replace(out)
    say(1.0, f"pretrained on {len(data)} images, final contrastive loss {final_loss:.3f}")
    return out
