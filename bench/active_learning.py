"""Benchmark: active-learning curves on generated shapes classification, and scoring throughput.

A pool of generated 'simple' shapes (one object per image) with known labels and a fixed test set.
Every strategy starts from the same random labeled set and adds ``--step`` labels per round:

* ``random``                 — random unlabeled images;
* ``uncertainty``            — highest ``scoring.least_confidence`` of the current model;
* ``uncertainty+diversity``  — ``scoring.diverse_top_k`` over the uncertainty scores, on embeddings from
                               ``predict.embed_images`` of the current model, away from the labeled ones.

Each round retrains with ``pipeline.train_new_version`` in ONE registry project per (strategy, seed),
as the product does: a round fine-tunes the version in service and the new version is promoted only
if it is not worse on the tuning split. The curve is the test accuracy of the version in service.
The reference is one model trained on the whole labeled pool (per seed); the table reports how many
labels each strategy needs to reach 95 % of it.

Also measured: ms/image of our scoring path (``predict_images`` + classification_loss + uncertainty)
against the raw ultralytics forward pass (``YOLO.predict``) on the same images.

Usage::

    .venv/bin/python bench/active_learning.py            # 2 seeds, 400 pool, 20 -> 160 labels (~20 min on 2 busy cores)
    .venv/bin/python bench/active_learning.py --quick    # 1 seed, 20 -> 80 labels; figures go to bench/out/

Full runs write bench/figures/active_learning.png and append the table to bench/figures/active_learning.md;
raw numbers go to bench/out/active_learning-<stamp>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
STRATEGIES = ("random", "uncertainty", "uncertainty+diversity")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="1,2", help="comma-separated seeds (default 1,2)")
    parser.add_argument("--pool", type=int, default=400)
    parser.add_argument("--test", type=int, default=150)
    parser.add_argument("--start", type=int, default=20, help="random labels before the first round")
    parser.add_argument("--step", type=int, default=20, help="labels added per round")
    parser.add_argument("--max-labels", type=int, default=160)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--imgsz", type=int, default=32)
    parser.add_argument("--target", type=float, default=0.95, help="share of the full-pool score to reach")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the throughput timing")
    parser.add_argument("--quick", action="store_true", help="1 seed, 20 -> 80 labels, pool 300; figures to bench/out/")
    parser.add_argument("--figures", default=None, help="where the .png/.md go (default bench/figures, quick: bench/out)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.max_labels, args.pool, args.repeats = "1", 80, 300, 2
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.strategies = [s for s in args.strategies.split(",") if s.strip()]
    unknown = set(args.strategies) - set(STRATEGIES)
    if unknown:
        parser.error(f"unknown strategies {sorted(unknown)}; choose from {STRATEGIES}")
    args.figures = Path(args.figures) if args.figures else HERE / ("out" if args.quick else "figures")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="labelloop-bench-al-"))
    os.environ.setdefault("LABELLOOP_HOME", str(work / "home"))
    os.environ.setdefault("YOLO_CONFIG_DIR", str(Path.home() / ".cache" / "labelloop" / "ultralytics"))
    os.environ["LABELLOOP_IMGSZ"] = str(args.imgsz)
    os.environ["LABELLOOP_EPOCHS"] = str(args.epochs)

    from labelloop import scoring
    from labelloop.labelconfig import parse_label_config
    from labelloop.media import LocalFileFetcher
    from labelloop.pipeline import train_new_version
    from labelloop.predict import embed_images, load_model, predict_images
    from labelloop.registry import Registry
    from labelloop.shapes import generate_shapes, label_config, to_label_studio_tasks

    spec = parse_label_config(label_config("classification"))
    fetcher = LocalFileFetcher()
    registry = Registry(work / "models")
    test = generate_shapes(work / "test", n=args.test, seed=999, max_objects=1, style="simple")
    test_paths = [test.images_dir / im.file for im in test.images]
    test_labels = [im.label for im in test.images]
    budgets = list(range(args.start, args.max_labels + 1, args.step))
    started = time.perf_counter()

    def accuracy(model) -> float:
        preds = predict_images(model, test_paths, spec, 0.5)
        return float(np.mean([p.regions[0].label == y for p, y in zip(preds, test_labels)]))

    def serving_model(project):
        manifest = registry.serving(project)
        return load_model(manifest.weights, manifest.version)

    runs, references = [], {}
    for seed in args.seeds:
        pool = generate_shapes(work / f"pool{seed}", n=args.pool, seed=500 + seed, max_objects=1, style="simple")
        paths = [pool.images_dir / im.file for im in pool.images]
        all_tasks = to_label_studio_tasks(pool, "classification")

        t0 = time.perf_counter()
        train_new_version(registry, f"full-{seed}", all_tasks, spec, fetcher)
        references[seed] = accuracy(serving_model(f"full-{seed}"))
        print(f"seed {seed}: full pool ({args.pool} labels) test accuracy {references[seed]:.3f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)

        initial = np.random.default_rng([seed, 31]).choice(args.pool, size=args.start, replace=False).tolist()
        for strategy in args.strategies:
            project = f"{strategy.replace('+', '-')}-{seed}"
            rng = np.random.default_rng([seed, 41, STRATEGIES.index(strategy)])
            labeled = list(initial)
            curve = []
            for budget in budgets:
                t0 = time.perf_counter()
                outcome = train_new_version(registry, project, [all_tasks[i] for i in labeled], spec, fetcher)
                model = serving_model(project)
                acc = accuracy(model)
                curve.append({"labels": len(labeled), "accuracy": acc, "promoted": outcome.promoted,
                              "version": outcome.manifest.version, "seconds": time.perf_counter() - t0})
                print(f"seed {seed} {strategy:<22} {len(labeled):4d} labels: test accuracy {acc:.3f} "
                      f"({'promoted' if outcome.promoted else 'kept previous'}, {curve[-1]['seconds']:.0f} s)",
                      flush=True)
                if budget == budgets[-1]:
                    break
                add = min(args.step, budgets[budgets.index(budget) + 1] - len(labeled))
                unlabeled = [i for i in range(args.pool) if i not in set(labeled)]
                if strategy == "random":
                    picked = rng.choice(unlabeled, size=add, replace=False).tolist()
                else:
                    preds = predict_images(model, [paths[i] for i in unlabeled], spec, 0.5)
                    uncertainty = [scoring.least_confidence(list(p.class_probs.values())) for p in preds]
                    if strategy == "uncertainty":
                        order = np.argsort(-np.asarray(uncertainty), kind="stable")[:add]
                    else:
                        vectors = embed_images(model, [paths[i] for i in unlabeled + labeled])
                        order = scoring.diverse_top_k(uncertainty, vectors[: len(unlabeled)], add,
                                                      avoid=vectors[len(unlabeled):])
                    picked = [unlabeled[int(j)] for j in order]
                labeled += [int(i) for i in picked]
            runs.append({"seed": seed, "strategy": strategy, "curve": curve})

    throughput = measure_throughput(args, serving_model(f"full-{args.seeds[-1]}"), test_paths, test_labels, spec)
    elapsed = time.perf_counter() - started
    report(args, runs, references, budgets, throughput, elapsed)
    return 0


def measure_throughput(args, model, paths, labels, spec):
    """ms/image: raw ultralytics forward pass vs predict_images + loss + uncertainty, same images."""
    from labelloop import scoring
    from labelloop.predict import predict_images

    strs = [str(p) for p in paths]
    model.yolo.predict(strs[:4], verbose=False)  # warm-up
    predict_images(model, paths[:4], spec, 0.5)

    def raw():
        model.yolo.predict(strs, batch=16, verbose=False)

    def ours():
        preds = predict_images(model, paths, spec, 0.5, batch=16)
        return [(scoring.classification_loss(p.class_probs, y), scoring.least_confidence(list(p.class_probs.values())),
                 scoring.entropy_uncertainty(list(p.class_probs.values()))) for p, y in zip(preds, labels)]

    preds = predict_images(model, paths, spec, 0.5, batch=16)

    def scores_only():
        return [(scoring.classification_loss(p.class_probs, y), scoring.least_confidence(list(p.class_probs.values())),
                 scoring.entropy_uncertainty(list(p.class_probs.values()))) for p, y in zip(preds, labels)]

    def timed(fn):
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1000 * statistics.median(times) / len(paths)

    out = {"images": len(paths), "raw_ms": timed(raw), "ours_ms": timed(ours), "scores_only_ms": timed(scores_only)}
    out["ratio"] = out["ours_ms"] / out["raw_ms"]
    return out


def labels_to_reach(curve, target):
    for point in curve:
        if point["accuracy"] >= target:
            return point["labels"]
    return None


def report(args, runs, references, budgets, throughput, elapsed):
    stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    summary = {}
    for strategy in args.strategies:
        mine = [r for r in runs if r["strategy"] == strategy]
        matrix = np.array([[p["accuracy"] for p in r["curve"]] for r in mine])
        reach = [labels_to_reach(r["curve"], args.target * references[r["seed"]]) for r in mine]
        summary[strategy] = {"labels": [p["labels"] for p in mine[0]["curve"]], "mean": matrix.mean(0).tolist(),
                             "min": matrix.min(0).tolist(), "max": matrix.max(0).tolist(), "reach": reach,
                             "area": float(matrix.mean())}
    ref_mean = float(np.mean(list(references.values())))

    def fmt_reach(values):
        return ", ".join(str(v) if v is not None else f">{budgets[-1]}" for v in values)

    header = "| strategy | " + " | ".join(f"{b}" for b in budgets) + f" | mean over curve | labels to {int(100 * args.target)} % of full pool (per seed) |"
    lines = [header, "|---|" + "---|" * (len(budgets) + 2)]
    for strategy, s in summary.items():
        cells = " | ".join(f"{m:.3f}" for m in s["mean"])
        lines.append(f"| {strategy} | {cells} | {s['area']:.3f} | {fmt_reach(s['reach'])} |")
    table = "\n".join(lines)
    settings = (f"seeds {','.join(map(str, args.seeds))}; pool {args.pool}, fixed test set {args.test}, 'simple' shapes, "
                f"{args.start} random labels then +{args.step} per round; train_new_version fine-tuning per round "
                f"({args.epochs} epochs at {args.imgsz} px); full-pool test accuracy per seed: "
                + ", ".join(f"{s}: {v:.3f}" for s, v in references.items()) + f" (mean {ref_mean:.3f})")
    tp = throughput
    throughput_line = (f"Scoring throughput on {tp['images']} images (batch 16, median of {args.repeats}): raw ultralytics "
                       f"predict {tp['raw_ms']:.2f} ms/image; predict_images + classification_loss + least_confidence "
                       f"+ entropy {tp['ours_ms']:.2f} ms/image (ratio {tp['ratio']:.2f}x); the scores alone "
                       f"{1000 * tp['scores_only_ms']:.1f} µs/image.")
    print()
    print(f"Test accuracy (mean over seeds) by number of labels. {settings}")
    print(table)
    print(throughput_line)
    print(f"total {elapsed / 60:.1f} min")

    out = HERE / "out"
    out.mkdir(parents=True, exist_ok=True)
    raw = out / f"active_learning-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    raw.write_text(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                               "date": stamp, "runs": runs, "references": references, "summary": summary,
                               "throughput": throughput, "seconds": elapsed}, indent=1))
    print(f"raw results: {raw}")

    args.figures.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for strategy, s in summary.items():
        line, = ax.plot(s["labels"], s["mean"], marker="o", label=strategy)
        ax.fill_between(s["labels"], s["min"], s["max"], color=line.get_color(), alpha=0.15)
    ax.axhline(ref_mean, color="gray", linestyle="--", label=f"full pool ({args.pool} labels)")
    ax.axhline(args.target * ref_mean, color="gray", linestyle=":", label=f"{int(100 * args.target)} % of full pool")
    ax.set_xlabel("labeled images")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"Active learning, shapes classification ({len(args.seeds)} seed(s), band = min/max)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    png = args.figures / "active_learning.png"
    fig.savefig(png)
    print(f"figure: {png}")
    md = args.figures / "active_learning.md"
    with open(md, "a", encoding="utf-8") as f:
        if md.stat().st_size == 0:
            f.write("# Active learning on shapes classification\n\n")
        f.write(f"## Run {stamp} ({platform.node() or 'this machine'}, {os.cpu_count()} CPU cores, "
                f"{elapsed / 60:.0f} min)\n\nTest accuracy (mean over seeds) by number of labels. {settings}.\n\n"
                f"{table}\n\n{throughput_line}\n\nReproduce: `.venv/bin/python bench/active_learning.py "
                f"--seeds {','.join(map(str, args.seeds))} --pool {args.pool} --max-labels {args.max_labels}`\n\n")
    print(f"table appended to {md}")


if __name__ == "__main__":
    sys.exit(main())
