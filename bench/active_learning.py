"""Benchmark: accuracy vs labels on the demo's data — our engine (random and uncertainty picking)
against a plain-torch tiny CNN and HOG + logistic regression, on the same images, several seeds.

The data is what ``labelloop demo`` labels: 'simple' shapes at 64 px, a pool of 400 images whose
labels are 10 % wrong (the simulated labeler's mistakes), and a fixed, correctly labeled test set
of 150 images. For each seed:

* ``random``      — the engine trained on a random subset of each budget (nested subsets);
* ``uncertainty`` — the loop: the first budget random, then each round the most uncertain
                    (``scoring.least_confidence`` of the calibrated probabilities of the version
                    in service) unlabeled images;
* ``uncertainty-tta`` — the same, with probabilities averaged over four label-preserving views
                    (``predict_images(tta=True)``: the image, two flips, a 90° turn);
* ``uncertainty-tta-explore`` — the same, but a round's picks stay random (the random strategy's order)
                    until ``acquisition.uncertainty_is_trusted``: the version in service is right on
                    ``acquisition.EXPLORE_BELOW`` of its tuning split;
* ``uncertainty-tta-balanced`` — what the product's "label next" tab does: explore as above, then
                    ``acquisition.next_to_label`` with the predicted labels (least confident in
                    turns over the predicted classes);
* ``uncertainty-tta-diverse`` — the same scores, then ``scoring.diverse_top_k`` on the served model's
                    embeddings (k-center greedy among the 4k most uncertain, away from the labeled ones);
* ``typical-uncertainty`` — the first budget from ``typical_first`` (below) on the warm start's
                    embeddings (one typical image per k-means cluster: what to label before any
                    model), then uncertainty as above;
* ``random-scratch`` — random picks without the self-supervised warm start (every other strategy
                    starts each training from the warm start pretrained once per seed on the pool's
                    images, as the product does once a project's tasks are imported);
* ``tiny-cnn``    — ``baselines.tiny_cnn_accuracy`` (fixed recipe: 60 epochs, AdamW 3e-3, flips and
                    90° turns) on the random strategy's labeled images of that budget;
* ``hog-lr``      — ``baselines.hog_logreg_accuracy`` on the same images.

Every engine round calls ``pipeline.train_new_version`` in one registry project per (strategy,
seed), as the product does (promotion only when not worse on the tuning split); the curve is the
test accuracy of the version in service. "Full pool" is the random strategy's last budget (every
label in the pool); the table gives the labels each strategy needs to reach 95 % of it.

Usage::

    .venv/bin/python bench/active_learning.py            # 3 seeds, 40 -> 400 labels (~45 min on 2 cores)
    .venv/bin/python bench/active_learning.py --quick    # 1 seed, 40 -> 160 labels; figures go to bench/out/

Full runs write bench/figures/active_learning.png and append the table to bench/figures/active_learning.md;
raw numbers go to bench/out/active_learning-<stamp>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
STRATEGIES = ("random", "uncertainty", "uncertainty-tta", "uncertainty-tta-explore", "uncertainty-tta-balanced",
              "uncertainty-tta-diverse",
              "typical-uncertainty",
              "random-scratch", "random-pseudo", "uncertainty-tta-pseudo", "disagreement-tta")
# uncertainty-tta-diverse: the TTA least-confidence scores, then scoring.diverse_top_k (what the FiftyOne
# operator's diversity option runs): k-center greedy on the served model's embeddings among the 4k most
# uncertain, away from the labeled images, so a round's budget does not go to near-duplicates
# disagreement-tta (measured, not in the product): BALD-like — the mutual information between the label
# and the view, H(mean of the four views' probabilities) - mean of their entropies: high where the
# views disagree (what the model has not learned), low where all agree on an ambiguous image
# -pseudo (measured, not in the product): each round also trains on the unlabeled images the last version
# predicts with TTA probability >= PSEUDO_CONFIDENCE, labeled with that prediction (CEAL-style)
PSEUDO_CONFIDENCE = 0.95
EXPLORING = ("uncertainty-tta-explore", "uncertainty-tta-balanced")  # random picks until uncertainty is trusted
BASELINES = ("tiny-cnn", "hog-lr")

# -- measured and not kept in the product: typical-first picks ------------------------------------

TYPICALITY_NEIGHBOURS = 20


def typical_first(embeddings: np.ndarray, k: int, seed: int = 0) -> list[int]:
    """k indices to label first when no model exists yet: one *typical* sample per region of the data.

    The embeddings (e.g. the project's self-supervised warm start, ``pretrain.py``) are cut into k
    clusters (k-means); in each, the sample with the highest typicality — the inverse of its mean
    distance to its nearest neighbours — is taken, largest clusters first. With few labels a model
    learns more from representative samples than from outliers or the random tail (the low-budget
    finding of TypiClust, Hacohen et al. 2022); uncertainty takes over once a model exists.
    Measured here (seed 1): 0.70 / 0.80 / 0.95 after 40 / 80 / 120 labels vs random 0.74 / 0.91 / 0.94
    from the same warm start, so the product does not use it.
    """
    from sklearn.cluster import KMeans

    vectors = np.asarray(embeddings, dtype=np.float64)
    n = len(vectors)
    k = min(k, n)
    if k <= 0:
        return []
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    clusters = KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(vectors)
    picks = []
    for cluster in sorted(range(k), key=lambda c: -int(np.sum(clusters == c))):
        members = np.flatnonzero(clusters == cluster)
        if len(members) == 1:
            picks.append(int(members[0]))
            continue
        inside = vectors[members]
        distances = np.linalg.norm(inside[:, None, :] - inside[None, :, :], axis=2)
        neighbours = min(TYPICALITY_NEIGHBOURS, len(members) - 1)
        mean_nearest = np.sort(distances, axis=1)[:, 1 : neighbours + 1].mean(axis=1)
        picks.append(int(members[int(np.argmin(mean_nearest))]))
    return picks



def imbalanced_subset(dataset, n: int, ratio: float, seed: int):
    """``n`` images of ``dataset`` whose classes are skewed as a real project's are.

    Class shares fall geometrically from the first class to the last, the commonest ``ratio`` times
    the rarest (ratio 10 with four classes: 54 / 25 / 12 / 5 %); which class is rarest rotates with the
    seed. A random pick of 40 labels then sees ~2 images of the rarest class; picks that find it
    sooner (uncertainty) have something to gain, as in real projects where one class dominates.
    """
    import dataclasses

    classes = list(dataset.classes)
    shift = seed % len(classes)
    classes = classes[shift:] + classes[:shift]
    weights = np.array([ratio ** (-k / (len(classes) - 1)) for k in range(len(classes))])
    counts = np.floor(n * weights / weights.sum()).astype(int)
    counts[0] += n - counts.sum()
    chosen: list[int] = []
    for label, count in zip(classes, counts):
        members = [i for i, im in enumerate(dataset.images) if im.label == label][:count]
        if len(members) < count:
            raise ValueError(f"only {len(members)} '{label}' images to draw {count} from: generate more")
        chosen += members
    chosen.sort()  # generator order, so the pool's random order stays seed-driven
    return dataclasses.replace(dataset, images=[dataset.images[i] for i in chosen],
                               noisy=[dataset.noisy[i] for i in chosen], corruptions=[])


def view_disagreement(model, spec, paths, folder: Path) -> list[float]:
    """Mutual information between label and view over the image, two flips and a 90° turn (nats)."""
    from PIL import Image

    from labelloop.core.predict import predict_images

    views = []
    for name, op in (("id", None), ("lr", Image.Transpose.FLIP_LEFT_RIGHT), ("ud", Image.Transpose.FLIP_TOP_BOTTOM),
                     ("rot", Image.Transpose.ROTATE_90)):
        out = []
        for path in paths:
            target = folder / name / Path(path).name
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                with Image.open(path) as im:
                    (im.copy() if op is None else im.transpose(op)).save(target)
            out.append(target)
        views.append([list(p.class_probs.values()) for p in predict_images(model, out, spec, 0.5)])
    probs = np.clip(np.asarray(views, dtype=np.float64), 1e-12, 1.0)  # (views, images, classes)
    mean = probs.mean(axis=0)
    entropy_of_mean = -(mean * np.log(mean)).sum(axis=1)
    mean_entropy = -(probs * np.log(probs)).sum(axis=2).mean(axis=0)
    return (entropy_of_mean - mean_entropy).tolist()


def pseudo_tasks(model, spec, paths, all_tasks, labeled) -> list[dict]:
    """``model``'s confident TTA predictions on the unlabeled pool, written as annotations (measured only)."""
    from labelloop.core.predict import predict_images

    taken = set(labeled)
    rest = [i for i in range(len(paths)) if i not in taken]
    out = []
    for i, pred in zip(rest, predict_images(model, [paths[i] for i in rest], spec, 0.5, tta=True)):
        label, prob = max(pred.class_probs.items(), key=lambda item: item[1])
        if prob >= PSEUDO_CONFIDENCE:
            result = [{**all_tasks[i]["annotations"][0]["result"][0], "value": {"choices": [label]}}]
            out.append({**all_tasks[i], "annotations": [{"id": all_tasks[i]["id"], "result": result}]})
    return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (default 1,2,3)")
    parser.add_argument("--pool", type=int, default=400)
    parser.add_argument("--test", type=int, default=150)
    parser.add_argument("--size", type=int, default=64, help="image side in px (the demo's: 64)")
    parser.add_argument("--noise", type=float, default=0.1, help="share of wrong labels in the pool")
    parser.add_argument("--style", default="simple", choices=("simple", "textured"),
                        help="the demo's 'simple' shapes (light on dark), or 'textured' (shapes on textured "
                             "backgrounds in contrasting colours: harder, so more labels are needed)")
    parser.add_argument("--budgets", default="40,80,120,160,240,320,400")
    parser.add_argument("--baseline-budgets", default="80,160,400")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--baselines", default=",".join(BASELINES))
    parser.add_argument("--imbalance", type=float, default=1.0,
                        help="commonest / rarest class share in the pool (1: balanced, as the demo; 10: a skewed "
                             "project); the test set stays balanced, so accuracy weighs every class alike")
    parser.add_argument("--target", type=float, default=0.95, help="share of the full-pool score to reach")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the throughput timing")
    parser.add_argument("--warm-starts", default=None,
                        help="a folder with warm-<seed>.pt from an earlier run on the same pools (skips pretraining)")
    parser.add_argument("--quick", action="store_true", help="1 seed, 40 -> 160 labels, pool 160; figures to bench/out/")
    parser.add_argument("--figures", default=None, help="where the .png/.md go (default bench/figures, quick: bench/out)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.budgets, args.baseline_budgets, args.pool, args.repeats = "1", "40,80,160", "160", 160, 2
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
    args.baseline_budgets = [int(b) for b in args.baseline_budgets.split(",") if b.strip()]
    args.strategies = [s for s in args.strategies.split(",") if s.strip()]
    args.baselines = [s for s in args.baselines.split(",") if s.strip()]
    unknown = (set(args.strategies) - set(STRATEGIES)) | (set(args.baselines) - set(BASELINES))
    if unknown:
        parser.error(f"unknown strategies/baselines {sorted(unknown)}; choose from {STRATEGIES} and {BASELINES}")
    if max(args.budgets) > args.pool or sorted(args.budgets) != args.budgets:
        parser.error("budgets must increase and stay within the pool")
    args.figures = Path(args.figures) if args.figures else HERE / ("out" if args.quick else "figures")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="labelloop-bench-al-"))
    os.environ.setdefault("LABELLOOP_HOME", str(work / "home"))
    os.environ.setdefault("YOLO_CONFIG_DIR", str(Path.home() / ".cache" / "labelloop" / "ultralytics"))

    from shapes_setup import classification_bench  # bench/ is on sys.path when run as a script

    from labelloop.config import settings
    from labelloop.core import acquisition, pretrain, recipe, scoring
    from labelloop.core.kinds import kind_of
    from labelloop.core.predict import embed_images, load_model, predict_images
    from labelloop.dev import baselines
    from labelloop.dev.shapes import flip_image_labels, generate_shapes, to_label_studio_tasks
    from labelloop.workflows.pipeline import train_new_version

    bench = classification_bench(work, args.size, args.test, args.style)
    recipe_kind_metric = kind_of("classification").primary_metric
    spec, fetcher, registry = bench.spec, bench.fetcher, bench.registry
    test_paths, test_labels = bench.test_paths, bench.test_labels
    started = time.perf_counter()

    def accuracy(model) -> float:
        preds = predict_images(model, test_paths, spec, 0.5)
        return float(np.mean([p.regions[0].label == y for p, y in zip(preds, test_labels)]))

    def serving_model(project):
        manifest = registry.serving(project)
        return load_model(manifest.weights, manifest.version)

    runs = []
    pretrain_seconds: list[float] = []
    for seed in args.seeds:
        candidates = args.pool if args.imbalance <= 1 else int(3 * args.pool)
        pool = generate_shapes(work / f"pool{seed}", n=candidates, seed=500 + seed, size=args.size, max_objects=1,
                               style=args.style)
        if args.imbalance > 1:
            pool = imbalanced_subset(pool, args.pool, args.imbalance, seed)
        paths = [pool.images_dir / im.file for im in pool.images]
        noisy, flipped = flip_image_labels(pool, args.noise, seed)
        all_tasks = to_label_studio_tasks(pool, "classification", labels=noisy)
        order = np.random.default_rng([seed, 31]).permutation(args.pool).tolist()
        random_sets: dict[int, list[int]] = {}
        warm = None
        if args.warm_starts and (Path(args.warm_starts) / f"warm-{seed}.pt").is_file():
            warm = Path(args.warm_starts) / f"warm-{seed}.pt"
            print(f"seed {seed}: warm start reused from {warm}", flush=True)
        elif any(s != "random-scratch" for s in args.strategies):
            t0 = time.perf_counter()
            warm = pretrain.pretrain_classifier(paths, args.size, work / f"warm-{seed}.pt",
                                                steps=settings().warm_start_steps, seed=seed)
            pretrain_seconds.append(time.perf_counter() - t0)
            print(f"seed {seed}: warm start pretrained on {len(paths)} images in {pretrain_seconds[-1]:.0f} s", flush=True)
        for strategy in args.strategies:
            project = f"{strategy}-{seed}"
            if strategy != "random-scratch":
                target = registry.warm_start_path(project, recipe.model_config("classify", args.size))
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(warm.read_bytes())
            labeled = order[: args.budgets[0]]
            if strategy == "typical-uncertainty":
                embeddings = embed_images(load_model(warm, "warm-start"), paths)
                labeled = [int(i) for i in typical_first(embeddings, args.budgets[0], seed=seed)]
            curve = []
            explore_next = True

            for k, budget in enumerate(args.budgets):
                if strategy.startswith("random"):
                    labeled = order[:budget]
                    random_sets.setdefault(budget, list(labeled))
                elif strategy in EXPLORING and explore_next:
                    taken = set(labeled)  # explore: continue the random strategy's order
                    labeled = labeled + [i for i in order if i not in taken][: budget - len(labeled)]
                t0 = time.perf_counter()
                train_tasks = [all_tasks[i] for i in labeled]
                if k and strategy.endswith("-pseudo"):
                    train_tasks += pseudo_tasks(serving_model(project), spec, paths, all_tasks, labeled)
                outcome = train_new_version(registry, project, train_tasks, spec, fetcher)
                seconds = time.perf_counter() - t0
                serving_tuning = registry.serving(project).metrics.get(recipe_kind_metric)
                explore_next = not acquisition.uncertainty_is_trusted(serving_tuning)
                model = serving_model(project)
                acc = accuracy(model)
                curve.append({"labels": len(labeled), "accuracy": acc, "promoted": outcome.promoted,
                              "tuning_accuracy": serving_tuning, "explored_next": explore_next,
                              "version": outcome.manifest.version, "seconds": seconds,
                              "temperature": outcome.manifest.calibration.get("temperature")})
                print(f"seed {seed} {strategy:<12} {len(labeled):4d} labels: test accuracy {acc:.3f} "
                      f"({'promoted' if outcome.promoted else 'kept previous'}, {seconds:.0f} s)", flush=True)
                if k + 1 == len(args.budgets) or strategy.startswith("random") or (
                        explore_next and strategy in EXPLORING):
                    continue
                unlabeled = [i for i in range(args.pool) if i not in set(labeled)]
                preds = predict_images(model, [paths[i] for i in unlabeled], spec, 0.5,
                                       tta=strategy.startswith("uncertainty-tta"))
                if strategy == "disagreement-tta":
                    uncertainty = view_disagreement(model, spec, [paths[i] for i in unlabeled], work / f"views{seed}")
                else:
                    uncertainty = [scoring.least_confidence(list(p.class_probs.values())) for p in preds]
                wanted = args.budgets[k + 1] - len(labeled)
                if strategy == "uncertainty-tta-balanced":
                    predicted = [max(p.class_probs.items(), key=lambda kv: kv[1])[0] for p in preds]
                    picked = acquisition.balanced_by_prediction(uncertainty, predicted, wanted)
                elif strategy == "uncertainty-tta-diverse":
                    vectors = embed_images(model, paths)
                    picked = scoring.diverse_top_k(uncertainty, vectors[unlabeled], wanted, avoid=vectors[labeled])
                else:
                    picked = np.argsort(-np.asarray(uncertainty), kind="stable")[:wanted]
                labeled = labeled + [unlabeled[int(j)] for j in picked]
            runs.append({"seed": seed, "strategy": strategy, "curve": curve})

        for name in args.baselines:
            curve = []
            for budget in args.baseline_budgets:
                chosen = random_sets.get(budget) or order[:budget]
                t0 = time.perf_counter()
                train_paths, train_labels = [paths[i] for i in chosen], [noisy[i] for i in chosen]
                if name == "tiny-cnn":
                    acc = baselines.tiny_cnn_accuracy(train_paths, train_labels, test_paths, test_labels,
                                                      size=args.size, seed=seed)
                else:
                    acc = baselines.hog_logreg_accuracy(train_paths, train_labels, test_paths, test_labels,
                                                        size=args.size)
                curve.append({"labels": budget, "accuracy": acc, "seconds": time.perf_counter() - t0})
                print(f"seed {seed} {name:<12} {budget:4d} labels: test accuracy {acc:.3f} "
                      f"({curve[-1]['seconds']:.0f} s)", flush=True)
            runs.append({"seed": seed, "strategy": name, "curve": curve})

    throughput = measure_throughput(args, serving_model(f"{args.strategies[0]}-{args.seeds[-1]}"), test_paths,
                                    test_labels, spec)
    elapsed = time.perf_counter() - started
    report(args, runs, throughput, elapsed, pretrain_seconds)
    return 0


def measure_throughput(args, model, paths, labels, spec):
    """ms/image: raw ultralytics forward pass vs predict_images + loss + uncertainty, same images."""
    from labelloop.core import scoring
    from labelloop.core.predict import predict_images

    strs = [str(p) for p in paths]
    model.yolo.predict(strs[:4], verbose=False)  # warm-up
    predict_images(model, paths[:4], spec, 0.5)

    def raw():
        model.yolo.predict(strs, batch=16, verbose=False)

    def ours():
        preds = predict_images(model, paths, spec, 0.5, batch=16)
        return [(scoring.classification_loss(p.class_probs, y), scoring.least_confidence(list(p.class_probs.values())))
                for p, y in zip(preds, labels)]

    def timed(fn):
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1000 * statistics.median(times) / len(paths)

    out = {"images": len(paths), "raw_ms": timed(raw), "ours_ms": timed(ours)}
    out["ratio"] = out["ours_ms"] / out["raw_ms"]
    return out


def labels_to_reach(curve, target):
    for point in curve:
        if point["accuracy"] >= target:
            return point["labels"]
    return None


def summarize(args, runs):
    """Per strategy: mean/min/max accuracy per budget over seeds, labels to reach the target per seed."""
    references = {r["seed"]: r["curve"][-1]["accuracy"] for r in runs if r["strategy"] == "random"}
    summary = {}
    for name in [*args.strategies, *args.baselines]:
        mine = [r for r in runs if r["strategy"] == name]
        if not mine:
            continue
        matrix = np.array([[p["accuracy"] for p in r["curve"]] for r in mine])
        entry = {"labels": [p["labels"] for p in mine[0]["curve"]], "mean": matrix.mean(0).tolist(),
                 "min": matrix.min(0).tolist(), "max": matrix.max(0).tolist()}
        if name in STRATEGIES:
            entry["reach"] = [labels_to_reach(r["curve"], args.target * references[r["seed"]]) if r["seed"] in references
                              else None for r in mine]
            seconds = [p["seconds"] for r in mine for p in r["curve"]]
            entry["train_seconds_mean"], entry["train_seconds_max"] = float(np.mean(seconds)), float(np.max(seconds))
        summary[name] = entry
    return summary, references


def report(args, runs, throughput, elapsed, pretrain_seconds=()):
    stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    summary, references = summarize(args, runs)
    budgets = sorted({b for s in summary.values() for b in s["labels"]})

    def cell(s, budget):
        if budget not in s["labels"]:
            return "–"
        i = s["labels"].index(budget)
        return f"{s['mean'][i]:.3f} ({s['min'][i]:.2f}–{s['max'][i]:.2f})"

    def fmt_reach(values):
        return ", ".join(str(v) if v is not None else f">{args.budgets[-1]}" for v in values)

    lines = ["| labels | " + " | ".join(map(str, budgets)) + f" | labels to {int(100 * args.target)} % of full pool (per seed) |",
             "|---|" + "---|" * (len(budgets) + 1)]
    for name, s in summary.items():
        reach = fmt_reach(s["reach"]) if "reach" in s else "–"
        lines.append(f"| {name} | " + " | ".join(cell(s, b) for b in budgets) + f" | {reach} |")
    table = "\n".join(lines)
    ratio_line = ""
    picked_by_model = ("uncertainty", "uncertainty-tta", "uncertainty-tta-explore", "uncertainty-tta-balanced",
                       "uncertainty-tta-diverse", "typical-uncertainty")
    for name in [n for n in picked_by_model if n in summary and "random" in summary]:
        mine, rand = summary[name], summary["random"]
        pairs = [(u, r) for u, r in zip(mine["reach"], rand["reach"]) if u and r]
        if pairs:
            ratio = np.mean([u for u, _ in pairs]) / np.mean([r for _, r in pairs])
            ratio_line += (f"Labels to reach {int(100 * args.target)} % of the full-pool accuracy, {name} / random: "
                           f"**{ratio:.2f}×** (mean over seeds). ")
        gaps = [mine["mean"][mine["labels"].index(b)] - rand["mean"][rand["labels"].index(b)]
                for b in args.budgets if b >= 80 and b in mine["labels"] and b in rand["labels"]]
        if gaps:
            ratio_line += f"{name} minus random at budgets ≥ 80 (means): min {min(gaps):+.3f}, max {max(gaps):+.3f}. "
    if "random" in summary and "random-scratch" in summary:
        warm, cold = summary["random"], summary["random-scratch"]
        gains = [f"{b}: {warm['mean'][warm['labels'].index(b)] - cold['mean'][cold['labels'].index(b)]:+.3f}"
                 for b in warm["labels"] if b in cold["labels"]]
        ratio_line += "Warm start minus scratch, random picks (means): " + ", ".join(gains) + ". "
    seconds_line = "; ".join(f"{n} {s['train_seconds_mean']:.0f} s mean / {s['train_seconds_max']:.0f} s max"
                             for n, s in summary.items() if "train_seconds_mean" in s)
    if pretrain_seconds:
        seconds_line += (f"; warm start (self-supervised pretraining on the pool, once per project) "
                         f"{np.mean(pretrain_seconds):.0f} s mean / {np.max(pretrain_seconds):.0f} s max")
    skew = (f", classes skewed {args.imbalance:g}:1 (commonest : rarest; the test set balanced)"
            if args.imbalance > 1 else "")
    settings = (f"seeds {','.join(map(str, args.seeds))}; pool {args.pool} '{args.style}' shapes at {args.size} px{skew} with "
                f"{int(100 * args.noise)} % wrong labels, fixed clean test set {args.test}; full-pool accuracy per seed: "
                + ", ".join(f"{s}: {v:.3f}" for s, v in references.items()))
    tp = throughput
    throughput_line = (f"Scoring throughput on {tp['images']} images (batch 16, median of {args.repeats}): raw ultralytics "
                       f"predict {tp['raw_ms']:.2f} ms/image; predict_images + classification_loss + least_confidence "
                       f"{tp['ours_ms']:.2f} ms/image (ratio {tp['ratio']:.2f}x).")
    print()
    print(f"Test accuracy, mean (min–max) over seeds. {settings}")
    print(table)
    print(ratio_line)
    print(f"Engine training seconds per round: {seconds_line}")
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
    for name, s in summary.items():
        style = "o-" if name in STRATEGIES else "s--"
        line, = ax.plot(s["labels"], s["mean"], style, label=name)
        ax.fill_between(s["labels"], s["min"], s["max"], color=line.get_color(), alpha=0.15)
    ax.set_xlabel("labeled images (10 % of labels wrong)")
    ax.set_ylabel("test accuracy (clean test set)")
    ax.set_title(f"Learning curve, shapes at {args.size} px ({len(args.seeds)} seed(s), band = min/max)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    png = args.figures / ("active_learning.png" if args.imbalance <= 1 else "active_learning-imbalanced.png")
    fig.savefig(png)
    print(f"figure: {png}")
    md = args.figures / "active_learning.md"
    with open(md, "a", encoding="utf-8") as f:
        if md.stat().st_size == 0:
            f.write("# Active learning on shapes classification\n\n")
        f.write(f"## Run {stamp} ({platform.node() or 'this machine'}, {os.cpu_count()} CPU cores, "
                f"{elapsed / 60:.0f} min)\n\nTest accuracy, mean (min–max) over seeds. {settings}.\n\n"
                f"{table}\n\n{ratio_line}\n\nEngine training seconds per round: {seconds_line}.\n\n{throughput_line}\n\n"
                f"Reproduce: `.venv/bin/python bench/active_learning.py {shlex.join(sys.argv[1:])}`\n\n")
    print(f"table appended to {md}")


if __name__ == "__main__":
    sys.exit(main())
