"""Benchmark: box / mask mAP50-95 vs labels for detection and segmentation, the small-data recipe
against the previous one, on generated shapes (several seeds, one run, same images).

* ``previous`` — the recipe before the small-data work, reproduced exactly through the environment:
  epochs = 2400 / training images (10–100), AdamW lr 0.003, no warm-up, no mosaic, linear decay.
* ``recipe``   — what ``pipeline.train_new_version`` chooses today (``recipe.py``): epochs by
  optimizer steps, cosine decay, one warm-up epoch, no mosaic.

Both train from yolov8n{,-seg}.yaml on the same labeled images (textured shapes, up to 4 objects,
160 px) and are scored on the same fixed test set of 100 images with ultralytics' validator.

Usage::

    .venv/bin/python bench/detection_recipe.py                 # detect+segment, 2 seeds, 80 and 160 labels
    .venv/bin/python bench/detection_recipe.py --quick         # detect only, 1 seed, 80 labels
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PREVIOUS_ARGS = {"optimizer": "AdamW", "lr0": 0.003, "warmup_epochs": 0, "mosaic": 0.0, "cos_lr": False}
METRIC = {"detection": "box_map50_95", "segmentation": "mask_map50_95"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="detection,segmentation")
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--budgets", default="80,160")
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks, args.seeds, args.budgets = "detection", "1", "80"
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.budgets = [int(b) for b in args.budgets.split(",") if b]
    return args


def previous_epochs(n_train: int) -> int:
    return int(min(100, max(10, math.ceil(2400 / max(1, n_train)))))


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="labelloop-bench-det-"))
    os.environ.setdefault("LABELLOOP_HOME", str(work / "home"))
    os.environ.setdefault("YOLO_CONFIG_DIR", str(Path.home() / ".cache" / "labelloop" / "ultralytics"))

    from labelloop.config import settings
    from labelloop.core.datasets import build_dataset, split_of
    from labelloop.core.labelconfig import parse_label_config
    from labelloop.core.registry import Registry
    from labelloop.core.training import evaluate
    from labelloop.dev.shapes import generate_shapes, label_config, to_label_studio_tasks
    from labelloop.labelstudio.media import LocalFileFetcher
    from labelloop.labelstudio.results import labeled_images
    from labelloop.workflows.pipeline import train_new_version

    rows = []
    started = time.perf_counter()
    test = generate_shapes(work / "test", n=args.test, seed=4242, size=args.size)
    for task_type in args.tasks:
        spec = parse_label_config(label_config(task_type))
        test_tasks = to_label_studio_tasks(test, task_type)
        # an evaluation set: every test task on the 'val' side (the split hash is ignored here)
        test_set = build_dataset(labeled_images(test_tasks, spec), spec, {t["id"]: Path(t["data"]["image"]) for t in test_tasks},
                                 work / f"testset-{task_type}", min_train=0)
        _all_to_val(test_set)
        for seed in args.seeds:
            pool = generate_shapes(work / f"pool{seed}", n=max(args.budgets), seed=600 + seed, size=args.size)
            tasks = to_label_studio_tasks(pool, task_type)
            order = np.random.default_rng([seed, 17]).permutation(len(tasks)).tolist()
            for budget in args.budgets:
                chosen = [tasks[i] for i in order[:budget]]
                n_train = sum(split_of(t["id"]) == "train" for t in chosen)
                for recipe_name in ("previous", "recipe"):
                    env = (dataclasses.replace(settings(), epochs=previous_epochs(n_train), train_args=PREVIOUS_ARGS)
                           if recipe_name == "previous" else settings())  # injected, never via os.environ
                    registry = Registry(work / f"models-{task_type}-{seed}-{budget}-{recipe_name}")
                    t0 = time.perf_counter()
                    outcome = train_new_version(registry, "bench", chosen, spec, LocalFileFetcher(), env=env)
                    seconds = time.perf_counter() - t0
                    metrics = evaluate(outcome.manifest.weights, test_set, outcome.manifest.settings["imgsz"], "cpu")
                    row = {"task": task_type, "seed": seed, "labels": budget, "recipe": recipe_name,
                           "epochs": outcome.manifest.settings["epochs"], "seconds": seconds,
                           "map50_95": metrics[METRIC[task_type]], "box_map50_95": metrics["box_map50_95"]}
                    rows.append(row)
                    print(f"{task_type} seed {seed} {budget} labels {recipe_name:<8}: {METRIC[task_type]} "
                          f"{row['map50_95']:.3f} ({row['epochs']} epochs, {seconds:.0f} s)", flush=True)
    report(args, rows, time.perf_counter() - started)
    return 0


def _all_to_val(dataset) -> None:
    """Move every image/label of an ultralytics detect/segment dataset to its val split."""
    root = Path(dataset.root)
    for kind in ("images", "labels"):
        (root / kind / "val").mkdir(parents=True, exist_ok=True)
        for path in (root / kind / "train").glob("*") if (root / kind / "train").exists() else []:
            path.rename(root / kind / "val" / path.name)


def report(args, rows, elapsed):
    lines = ["| task | labels | previous recipe: mAP50-95 mean (min–max) | small-data recipe | ratio (mean) "
             "| seconds previous / recipe |",
             "|---|---|---|---|---|---|"]
    summary = []
    for task_type in args.tasks:
        for budget in args.budgets:
            prev = [r for r in rows if r["task"] == task_type and r["labels"] == budget and r["recipe"] == "previous"]
            new = [r for r in rows if r["task"] == task_type and r["labels"] == budget and r["recipe"] == "recipe"]
            if not prev or not new:
                continue
            p, n = [r["map50_95"] for r in prev], [r["map50_95"] for r in new]
            ratio = np.mean(n) / max(1e-9, np.mean(p))
            summary.append({"task": task_type, "labels": budget, "previous": p, "recipe": n, "ratio": ratio})
            lines.append(f"| {task_type} ({METRIC[task_type]}) | {budget} | {np.mean(p):.3f} ({min(p):.3f}–{max(p):.3f}) | "
                         f"{np.mean(n):.3f} ({min(n):.3f}–{max(n):.3f}) | {ratio:.2f}× | "
                         f"{np.mean([r['seconds'] for r in prev]):.0f} / {np.mean([r['seconds'] for r in new]):.0f} |")
    table = "\n".join(lines)
    print()
    print(table)
    print(f"total {elapsed / 60:.1f} min")
    out = HERE / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"detection_recipe-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json").write_text(
        json.dumps({"rows": rows, "summary": summary, "seconds": elapsed}, indent=1))
    if not args.quick:
        md = HERE / "figures" / "detection_recipe.md"
        md.parent.mkdir(parents=True, exist_ok=True)
        with open(md, "a", encoding="utf-8") as f:
            if md.stat().st_size == 0:
                f.write("# Detection and segmentation: small-data recipe vs the previous one\n\n")
            f.write(f"## Run {dt.datetime.now():%Y-%m-%d %H:%M} ({platform.node()}, {os.cpu_count()} CPU cores, "
                    f"{elapsed / 60:.0f} min)\n\nseeds {','.join(map(str, args.seeds))}; textured shapes at {args.size} px, "
                    f"up to 4 objects; fixed test set of {args.test} images.\n\n{table}\n\n")


if __name__ == "__main__":
    sys.exit(main())
