"""Benchmark: does a self-supervised warm start on the project's own images help at 40–160 labels?

For each seed, the demo's data (400 'simple' shapes at 64 px, 10 % wrong labels, fixed clean test
set of 150): ``pretrain.pretrain_classifier`` on all 400 pool images (no labels read), then the
engine (``pipeline.train_new_version``) on random subsets of each budget, once from scratch and
once from the warm start — same labels, same recipe, same test set.

Usage::

    .venv/bin/python bench/pretraining.py                 # 3 seeds, 40/80/160 labels (~25 min on 2 cores)
    .venv/bin/python bench/pretraining.py --seeds 1 --budgets 40,80

Raw numbers go to bench/out/pretraining-<stamp>.json; the table is appended to bench/figures/pretraining.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--budgets", default="40,80,160")
    parser.add_argument("--pool", type=int, default=400)
    parser.add_argument("--test", type=int, default=150)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=None, help="contrastive steps (default LABELLOOP_WARM_START_STEPS, 300)")
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/figures/pretraining.md")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    budgets = [int(b) for b in args.budgets.split(",") if b.strip()]

    work = Path(tempfile.mkdtemp(prefix="labelloop-bench-pretrain-"))
    os.environ.setdefault("LABELLOOP_HOME", str(work / "home"))
    os.environ.setdefault("YOLO_CONFIG_DIR", str(Path.home() / ".cache" / "labelloop" / "ultralytics"))

    from shapes_setup import classification_bench  # bench/ is on sys.path when run as a script

    from labelloop.core import pretrain, recipe
    from labelloop.core.predict import load_model, predict_images
    from labelloop.dev.shapes import flip_image_labels, generate_shapes, to_label_studio_tasks
    from labelloop.workflows.pipeline import train_new_version

    bench = classification_bench(work, args.size, args.test)
    spec, fetcher, registry = bench.spec, bench.fetcher, bench.registry
    test_paths, test_labels = bench.test_paths, bench.test_labels
    started = time.perf_counter()
    results: dict[str, dict[int, list[float]]] = {"scratch": {b: [] for b in budgets}, "warm start": {b: [] for b in budgets}}
    pretrain_seconds = []
    from labelloop.config import settings

    steps = args.steps or settings().warm_start_steps

    for seed in seeds:
        pool = generate_shapes(work / f"pool{seed}", n=args.pool, seed=500 + seed, size=args.size, max_objects=1,
                               style="simple")
        paths = [pool.images_dir / im.file for im in pool.images]
        noisy, _ = flip_image_labels(pool, args.noise, seed)
        tasks = to_label_studio_tasks(pool, "classification", labels=noisy)
        order = np.random.default_rng([seed, 31]).permutation(args.pool).tolist()
        architecture = recipe.model_config("classify", args.size)
        t0 = time.perf_counter()
        checkpoint = pretrain.pretrain_classifier(paths, args.size, work / f"warm-{seed}.pt", steps=steps, seed=seed,
                                                  progress=lambda f, m: print(m, flush=True)
                                                  if f in (0.0, 1.0) or "00/" in m else None)
        pretrain_seconds.append(time.perf_counter() - t0)
        print(f"seed {seed}: pretrained in {pretrain_seconds[-1]:.0f} s", flush=True)
        for budget in budgets:
            for start in ("scratch", "warm start"):
                project = f"{start.replace(' ', '-')}-{seed}-{budget}"
                if start == "warm start":
                    target = registry.warm_start_path(project, architecture)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(checkpoint.read_bytes())
                outcome = train_new_version(registry, project, [tasks[i] for i in order[:budget]], spec, fetcher)
                assert outcome.manifest.settings["recipe"]["start"] == (
                    "self-supervised warm start on the project's images" if start == "warm start" else "from scratch")
                model = load_model(outcome.manifest.weights, outcome.manifest.version)
                preds = predict_images(model, test_paths, spec, 0.5)
                acc = float(np.mean([p.regions[0].label == y for p, y in zip(preds, test_labels)]))
                results[start][budget].append(acc)
                print(f"seed {seed} {start:<10} {budget:4d} labels: test accuracy {acc:.3f}", flush=True)

    elapsed = time.perf_counter() - started
    lines = ["| start | " + " | ".join(f"{b} labels" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for start, by_budget in results.items():
        cells = [f"{np.mean(v):.3f} ({min(v):.2f}–{max(v):.2f})" for v in by_budget.values()]
        lines.append(f"| {start} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    gains = {b: float(np.mean(results["warm start"][b]) - np.mean(results["scratch"][b])) for b in budgets}
    summary = ("Warm start minus scratch (means): " + ", ".join(f"{b}: {g:+.3f}" for b, g in gains.items())
               + f". Pretraining {steps} steps: {np.mean(pretrain_seconds):.0f} s mean per project.")
    print(table)
    print(summary)
    out = HERE / "out"
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now()
    (out / f"pretraining-{stamp:%Y%m%d-%H%M%S}.json").write_text(json.dumps(
        {"args": vars(args), "results": {k: {str(b): v for b, v in r.items()} for k, r in results.items()},
         "gains": gains, "pretrain_seconds": pretrain_seconds, "seconds": elapsed}, indent=1))
    if not args.no_record:
        md = HERE / "figures" / "pretraining.md"
        md.parent.mkdir(parents=True, exist_ok=True)
        with open(md, "a", encoding="utf-8") as f:
            if md.stat().st_size == 0:
                f.write("# Self-supervised warm start on the project's images\n\n")
            f.write(f"## Run {stamp:%Y-%m-%d %H:%M} ({platform.node() or 'this machine'}, {os.cpu_count()} CPU cores, "
                    f"{elapsed / 60:.0f} min)\n\nTest accuracy, mean (min–max) over seeds {args.seeds}; pool {args.pool} "
                    f"'simple' shapes at {args.size} px, {int(100 * args.noise)} % wrong labels, random picks, clean test "
                    f"set {args.test}.\n\n{table}\n\n{summary}\n\nReproduce: `.venv/bin/python bench/pretraining.py "
                    f"--seeds {args.seeds} --budgets {args.budgets}`\n\n")
    print(f"total {elapsed / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
