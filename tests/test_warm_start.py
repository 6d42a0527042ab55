"""Learning before the first label: the self-supervised warm start (pretrain.py) and its use by training.

Whether it helps is a benchmark question (bench/pretraining.py, figures in README); here: the pieces
do what they say, and a training of the project starts from the warm start once it exists.
"""

from __future__ import annotations

from pathlib import Path

import torch

from labelloop.core import pretrain
from labelloop.core.labelconfig import parse_label_config
from labelloop.core.registry import Registry
from labelloop.core.yolo_env import import_yolo
from labelloop.dev.shapes import generate_shapes, label_config, to_label_studio_tasks
from labelloop.labelstudio.media import LocalFileFetcher
from labelloop.workflows.pipeline import build_warm_start, train_new_version


def test_contrastive_loss_rewards_finding_the_partner_view():
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(32, 16, generator=g)
    partners = z1 + 0.05 * torch.randn(32, 16, generator=g)
    strangers = torch.randn(32, 16, generator=g)
    assert pretrain.nt_xent(z1, partners) < pretrain.nt_xent(z1, strangers) - 1.0


def test_views_are_random_crops_turns_and_colours_in_range():
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    a = pretrain.augment_batch(images, torch.Generator().manual_seed(1))
    b = pretrain.augment_batch(images, torch.Generator().manual_seed(2))
    again = pretrain.augment_batch(images, torch.Generator().manual_seed(1))
    assert a.shape == (8, 3, 32, 32) and a.dtype == torch.float32
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert torch.equal(a, again)  # the randomness is the generator's: reproducible
    assert (a - b).abs().mean() > 0.02  # two draws are two different views


def test_a_training_starts_from_the_projects_warm_start(tmp_path, run_home):
    spec = parse_label_config(label_config("classification"))
    pool = generate_shapes(tmp_path / "pool", n=40, seed=5, size=64, max_objects=1, style="simple")
    tasks = to_label_studio_tasks(pool, "classification")
    registry = Registry(tmp_path / "models")
    messages = []
    built = build_warm_start(registry, "p", tasks, spec, LocalFileFetcher(), steps=4,
                             progress=lambda fraction, message: messages.append(message))
    assert built["built"] and built["images"] == 40 and built["imgsz"] == 64
    assert any("contrastive loss" in m for m in messages)
    checkpoint = registry.warm_start("p", "labelloop-cls-small.yaml")
    assert checkpoint is not None and import_yolo()(str(checkpoint)).task == "classify"
    # the same images again: nothing to rebuild
    again = build_warm_start(registry, "p", tasks, spec, LocalFileFetcher(), steps=4)
    assert again["skipped"].startswith("up to date")

    outcome = train_new_version(registry, "p", tasks, spec, LocalFileFetcher())
    recipe = outcome.manifest.settings["recipe"]
    assert recipe["start"] == "self-supervised warm start on the project's images"
    assert recipe["architecture"] == "labelloop-cls-small.yaml"
    assert outcome.manifest.base == str(checkpoint)
    assert sorted(outcome.manifest.classes) == sorted(spec.labels)


def test_no_warm_start_where_it_does_not_apply(tmp_path, run_home, monkeypatch):
    registry = Registry(tmp_path / "models")
    boxes = parse_label_config(label_config("detection"))
    pool = generate_shapes(tmp_path / "pool", n=40, seed=6, size=64, max_objects=2, style="simple")
    assert "detection" in build_warm_start(registry, "d", to_label_studio_tasks(pool, "detection"), boxes,
                                           LocalFileFetcher(), steps=2)["skipped"]
    spec = parse_label_config(label_config("classification"))
    few = to_label_studio_tasks(pool, "classification")[:10]
    assert "at least" in build_warm_start(registry, "c", few, spec, LocalFileFetcher(), steps=2)["skipped"]
    monkeypatch.setenv("LABELLOOP_MODEL_CONFIG", "yolov8n-cls.yaml")
    tasks = to_label_studio_tasks(pool, "classification")
    assert "user's" in build_warm_start(registry, "c", tasks, spec, LocalFileFetcher(), steps=2)["skipped"]
    assert registry.warm_start("c", "labelloop-cls-small.yaml") is None


def test_any_step_count_pretrains(tmp_path, run_home):
    """A warm start of 20 steps (a smoke-test setting) divided by zero in its learning-rate schedule: a 5 %
    warm-up of exactly one step. Every small count works now."""
    pool = generate_shapes(tmp_path / "pool", n=8, seed=6, size=64, max_objects=1, style="simple")
    paths = [pool.images_dir / im.file for im in pool.images]
    for steps in (3, 20):
        out = pretrain.pretrain_classifier(paths, 64, tmp_path / f"warm-{steps}.pt", steps=steps)
        assert Path(out).is_file()
