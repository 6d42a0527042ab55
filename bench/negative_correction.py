"""Benchmark: negative correction — do rough labels find the model's misses better than its own uncertainty?

One detector, trained by the engine (its own recipe) on ``--train`` labeled 'simple' shapes (128 px, up to 4
objects), predicts a pool of ``--pool`` unlabeled images at ``--threshold``. In each seed's copy of those
predictions, one shown box is removed from ``--inject`` of the images it had exactly right (every object,
nothing else): injected misses, on top of the model's own. A task is a **miss** when, for some label, the
model shows fewer objects than the image holds. Rankings of the pool:

* ``rough counts`` — ``core.negatives.miss_score`` with each image's object counts per label
  (the task data's ``counts``), 10 % of the images' counts off by one (rough labels are rough);
* ``rough contains`` — the same with only which labels are present (``contains``), 10 % of the images
  with one label wrongly added or dropped;
* ``uncertainty`` — the model's own: 1 - the task score (what the Data Manager sorts by);
* ``random``.

Two measures: the injected misses alone (precision@k among the images the model had right before the
injection, k = the injected ones: every miss there is injected), and every miss over the whole pool
(precision@k, k = the misses; the model's own misses included).

Usage: ``.venv/bin/python bench/negative_correction.py [--seeds 1,2,3]``; appends a table to
bench/figures/negative_correction.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--train", type=int, default=120)
    parser.add_argument("--pool", type=int, default=300)
    parser.add_argument("--inject", type=float, default=0.1)
    parser.add_argument("--rough-noise", type=float, default=0.1)
    parser.add_argument("--threshold", type=float, default=0.25,
                        help="display threshold of the regions the model shows (ultralytics' default 0.25)")
    parser.add_argument("--figures", default=str(HERE / "figures"))
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    work = Path(tempfile.mkdtemp(prefix="labelloop-bench-negatives-"))
    os.environ.setdefault("LABELLOOP_HOME", str(work / "home"))
    os.environ.setdefault("YOLO_CONFIG_DIR", str(Path.home() / ".cache" / "labelloop" / "ultralytics"))

    from labelloop.core.labelconfig import parse_label_config
    from labelloop.core.negatives import RoughLabels, miss_score
    from labelloop.core.predict import load_model, predict_images
    from labelloop.core.ranking import precision_at_k
    from labelloop.core.registry import Registry
    from labelloop.dev.shapes import CLASSES, generate_shapes, label_config, to_label_studio_tasks
    from labelloop.labelstudio.media import LocalFileFetcher
    from labelloop.workflows.pipeline import train_new_version

    started = time.perf_counter()
    spec = parse_label_config(label_config("detection"))
    train = generate_shapes(work / "train", n=args.train, seed=101, size=128, max_objects=4, style="simple")
    t0 = time.perf_counter()
    outcome = train_new_version(Registry(work / "models"), "neg", to_label_studio_tasks(train, "detection"), spec,
                                LocalFileFetcher())
    train_seconds = time.perf_counter() - t0
    print(f"detector {outcome.manifest.version}: box mAP50-95 {outcome.manifest.metrics.get('primary', 0):.3f} "
          f"on its tuning split, trained in {train_seconds:.0f} s", flush=True)
    model = load_model(outcome.manifest.weights, outcome.manifest.version)
    pool = generate_shapes(work / "pool", n=args.pool, seed=202, size=128, max_objects=4, style="simple")
    threshold = args.threshold
    preds = predict_images(model, [pool.images_dir / im.file for im in pool.images], spec, threshold)
    truth = [Counter(o.label for o in im.objects) for im in pool.images]
    shown0 = [[r.label for r in p.regions] for p in preds]
    task_scores = [p.score if p.score is not None else 0.0 for p in preds]

    rows: dict[str, list[float]] = {}
    found: dict[str, list[float]] = {}
    stats = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        shown = [list(s) for s in shown0]
        complete = [i for i, s in enumerate(shown) if s and Counter(s) == truth[i]]  # every object, nothing else
        injected = set(rng.choice(complete, size=min(len(complete), round(args.inject * len(shown))), replace=False).tolist())
        for i in injected:
            shown[i].pop(int(rng.integers(len(shown[i]))))
        missed = [any(Counter(shown[i])[k] < n for k, n in truth[i].items()) for i in range(len(shown))]
        k = sum(missed)

        def rough_counts(i: int, rng=rng) -> RoughLabels:
            counts = dict(truth[i])
            if rng.random() < args.rough_noise:  # off by one somewhere
                label = str(rng.choice(CLASSES))
                counts[label] = max(0, counts.get(label, 0) + int(rng.choice([-1, 1])))
            return RoughLabels(counts=counts)

        def rough_contains(i: int, rng=rng) -> RoughLabels:
            present = set(truth[i])
            if rng.random() < args.rough_noise:
                present ^= {str(rng.choice(CLASSES))}  # one label wrongly added or dropped
            return RoughLabels(contains=frozenset(present))

        rankings = {
            "rough counts": [miss_score(shown[i], rough_counts(i))[0] for i in range(len(shown))],
            "rough contains": [miss_score(shown[i], rough_contains(i))[0] for i in range(len(shown))],
            "uncertainty (1 - task score)": [1.0 - s for s in task_scores],
            "random": rng.random(len(shown)).tolist(),
        }
        clean = complete  # the images the model had right before the injection: their only misses are injected
        for name, scores in rankings.items():
            rows.setdefault(name, []).append(precision_at_k(scores, missed, k))
            among = [scores[i] for i in clean]
            found.setdefault(name, []).append(precision_at_k(among, [i in injected for i in clean], len(injected)))
        stats.append((k, len(injected)))
        print(f"seed {seed}: {k} misses ({len(injected)} injected) of {len(shown)}: "
              + ", ".join(f"{n} P@k {rows[n][-1]:.2f}" for n in rankings), flush=True)

    def cell(values: list[float]) -> str:
        return f"{statistics.mean(values):.2f} ({min(values):.2f}–{max(values):.2f})"

    stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    minutes = (time.perf_counter() - started) / 60
    table = [f"\n## Run {stamp} ({platform.node()}, {os.cpu_count()} CPU cores, {minutes:.0f} min)\n",
             f"Detector {outcome.manifest.version} trained by the engine on {args.train} 'simple' shapes (128 px, up to 4 "
             f"objects) in {train_seconds:.0f} s, box mAP50-95 {outcome.manifest.metrics.get('primary', 0):.3f} on its "
             f"tuning split; pool of {args.pool}, display threshold {threshold:g}; per seed "
             f"{', '.join(f'{k} misses ({j} injected)' for k, j in stats)}; rough labels {args.rough_noise:.0%} wrong. "
             f"Mean (min–max) over seeds {args.seeds}.\n",
             "| ranking | injected misses: precision@k among the images the model had right (k = injected) "
             "| every miss: precision@k over the pool (k = misses) |", "|---|---|---|"]
    table += [f"| {name} | {cell(found[name])} | {cell(rows[name])} |" for name in rows]
    table.append(f"\nReproduce: `.venv/bin/python bench/negative_correction.py --seeds {args.seeds}`")
    out = Path(args.figures) / "negative_correction.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        out.write_text("# Negative correction: rough labels against the model's own uncertainty\n")
    with out.open("a") as fh:
        fh.write("\n".join(table) + "\n")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
