"""Benchmark: cost up-weighting in training (issue 12, value-aligned metrics) — does showing a costly class's
images more often cut what the errors cost, and what does it cost the plain accuracy?

Per seed: a pool of the demo's 'simple' shapes (64 px, one per image) whose classes are skewed 10:1 (the
rarest rotates with the seed, as in ``active_learning.py``), 10 % of the labels wrong; the rarest class is
also the costly one: a miss of it costs 10, any other miss 1. The engine trains on the first ``--budgets``
labels of one random order twice, from the same tasks, with its own settings: costs that only judge
(``"upweight": false``) and costs that also weigh the training (the default, ``core/modeltests.training_repeats``:
the costly class's training images shown up to 4 times as often, the same optimizer steps). Both are scored
on the clean, balanced test set (150 images): mean cost per image, accuracy, recall and precision of the
costly class.

Usage: ``.venv/bin/python bench/cost_weighted.py [--seeds 1,2,3] [--budgets 80,160]``; appends a table to
bench/figures/cost_weighted.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

ARMS = ("judge only", "upweight")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--budgets", default="80,160")
    parser.add_argument("--pool", type=int, default=400)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--imbalance", type=float, default=10.0)
    parser.add_argument("--cost", type=float, default=10.0, help="what a miss of the rarest class costs (others 1)")
    parser.add_argument("--figures", type=Path, default=HERE / "figures")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
    work = Path(tempfile.mkdtemp(prefix="labelloop-bench-cost-"))
    os.environ.setdefault("LABELLOOP_HOME", str(work / "home"))
    os.environ.setdefault("YOLO_CONFIG_DIR", str(Path.home() / ".cache" / "labelloop" / "ultralytics"))
    os.environ["LABELLOOP_WARM_START_STEPS"] = "0"  # both arms from the recipe's architecture, no warm start

    from active_learning import imbalanced_subset
    from shapes_setup import classification_bench

    from labelloop.core import modeltests
    from labelloop.core.predict import load_model, predict_images
    from labelloop.dev.shapes import flip_image_labels, generate_shapes, to_label_studio_tasks
    from labelloop.workflows.pipeline import train_new_version

    bench = classification_bench(work, 64, 150)
    rows = []
    started = time.perf_counter()
    for seed in seeds:
        pool = generate_shapes(work / f"pool{seed}", n=3 * args.pool, seed=700 + seed, size=64, max_objects=1,
                               style="simple")
        pool = imbalanced_subset(pool, args.pool, args.imbalance, seed)
        counts = {c: sum(im.label == c for im in pool.images) for c in pool.classes}
        costly = min(counts, key=counts.get)
        noisy, _ = flip_image_labels(pool, args.noise, seed)
        tasks = to_label_studio_tasks(pool, "classification", labels=noisy)
        order = np.random.default_rng([seed, 47]).permutation(len(tasks)).tolist()
        for budget in budgets:
            chosen = [tasks[i] for i in order[:budget]]
            for arm in ARMS:
                project = f"{arm.replace(' ', '-')}-{seed}-{budget}"
                costs = modeltests.parse_costs({"classes": {costly: args.cost}, "upweight": arm == "upweight"})
                modeltests.save_suite(bench.registry.project_dir(project), [], costs)
                t0 = time.perf_counter()
                outcome = train_new_version(bench.registry, project, chosen, bench.spec, bench.fetcher)
                seconds = time.perf_counter() - t0
                model = load_model(outcome.manifest.weights, outcome.manifest.version)
                said = [p.regions[0].label if p.regions else None
                        for p in predict_images(model, bench.test_paths, bench.spec, 0.5)]
                truth = bench.test_labels
                cost = float(np.mean([costs.of(t, s) for t, s in zip(truth, said)]))
                hits = sum(t == s == costly for t, s in zip(truth, said))
                rows.append({"seed": seed, "budget": budget, "arm": arm, "costly": costly,
                             "costly_labels": sum(noisy[i] == costly for i in order[:budget]),
                             "cost": cost, "accuracy": float(np.mean([t == s for t, s in zip(truth, said)])),
                             "recall": hits / max(1, sum(t == costly for t in truth)),
                             "precision": hits / max(1, sum(s == costly for s in said)),
                             "seconds": seconds, "repeats": (outcome.manifest.settings or {}).get("upweighted", {})})
                r = rows[-1]
                print(f"seed {seed} {budget:>4} labels {arm:<10} costly {costly:<8} ({r['costly_labels']} labels) "
                      f"cost {r['cost']:.3f} acc {r['accuracy']:.3f} recall {r['recall']:.2f} "
                      f"precision {r['precision']:.2f} {seconds:.0f} s", flush=True)
    report(args, seeds, budgets, rows, time.perf_counter() - started)
    return 0


def _cell(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def report(args, seeds, budgets, rows, seconds) -> None:
    from figures_log import append_run

    lines = [f"\n## {dt.date.today()} — {platform.machine()}, {os.cpu_count()} CPU cores, {seconds / 60:.1f} min",
             "", f"Seeds {','.join(map(str, seeds))}; pool {args.pool} 'simple' shapes at 64 px, classes skewed "
             f"{args.imbalance:g}:1, {args.noise:.0%} wrong labels; the rarest class costs {args.cost:g} per miss, "
             "others 1; clean balanced test set of 150. Mean over seeds (min–max).", "",
             "| labels | training | mean cost per test image | accuracy | costly class recall | costly class precision "
             "| seconds per training |", "|---|---|---|---|---|---|---|"]
    for budget in budgets:
        for arm in ARMS:
            chosen = [r for r in rows if r["budget"] == budget and r["arm"] == arm]
            lines.append(f"| {budget} | {arm} | {_cell([r['cost'] for r in chosen])} | "
                         f"{_cell([r['accuracy'] for r in chosen])} | {_cell([r['recall'] for r in chosen])} | "
                         f"{_cell([r['precision'] for r in chosen])} | {np.mean([r['seconds'] for r in chosen]):.0f} |")
    lines.append("")
    lines.append("Per seed (costly class, its labels among the budget, repeats): " + "; ".join(
        f"{r['seed']}/{r['budget']}: {r['costly']} ({r['costly_labels']}) {r['repeats']}"
        for r in rows if r["arm"] == "upweight"))
    append_run(args.figures, "cost_weighted.md", "Cost up-weighting in training (`bench/cost_weighted.py`)",
               "\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
