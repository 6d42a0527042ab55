"""Benchmark: how well do mislabel scores find flipped classification labels?

The demo's data — generated 'simple' shapes at 64 px, one object per image — with image labels flipped
at several noise rates (``flip_image_labels``); the engine chooses every training setting itself
(``recipe.py``), as for a user. Every method but the last ranks the SAME model outputs:

* ``loss in-sample``   — ``scoring.classification_loss`` (-log p(label)) from one model trained on all
                         the noisy labels (what the plugin's fast mode does: the model has seen them);
* ``loss out-of-sample`` — the same loss from ``pipeline.cross_val_predictions`` (K folds);
* ``cleanlab``         — ``cleanlab.filter.find_label_issues(..., return_indices_ranked_by=
                         "self_confidence")`` on the out-of-sample probabilities. Its ranking is its
                         ranked issue list; when it flags fewer than k images the rest of the top-k is
                         filled by ``cleanlab.rank.get_label_quality_scores`` (lowest first). AUROC uses
                         the negated label quality score;
* ``fiftyone mistakenness (logits | confidence)`` — ``fiftyone.brain.compute_mistakenness`` on a
                         FiftyOne dataset holding the noisy label and the out-of-sample prediction
                         (label = argmax, confidence = max p, logits = log p), use_logits True / False;
* ``cleanlab on a linear model`` — the plain baseline: cleanlab's ranking of out-of-sample class
                         probabilities from HOG features + logistic regression (``baselines.py``).

Metrics: AUROC (``ranking.auroc``) and precision@k with k = number of flipped labels
(``ranking.precision_at_k``; random picking gets the noise rate), averaged over seeds.

Usage::

    .venv/bin/python bench/mislabels.py            # 2 seeds x noise 5/10/20 %, 240 images (~10 min on 2 cores)
    .venv/bin/python bench/mislabels.py --quick    # 1 seed, noise 20 %, 150 images (debugging)

Writes the table to bench/figures/mislabels.md and raw numbers to bench/out/mislabels-<stamp>.json.
"""

from __future__ import annotations

import argparse
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
METHODS = [
    ("loss_in_sample", "loss, in-sample (ours, fast mode)"),
    ("loss_oos", "loss, out-of-sample (ours)"),
    ("cleanlab", "cleanlab find_label_issues (self_confidence)"),
    ("fo_logits", "FiftyOne Brain mistakenness (use_logits=True)"),
    ("fo_conf", "FiftyOne Brain mistakenness (use_logits=False)"),
    ("cleanlab_lr", "baseline: cleanlab on HOG + logistic regression (out-of-sample)"),
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="1,2", help="comma-separated seeds (default 1,2)")
    parser.add_argument("--noise", default="0.1,0.2", help="comma-separated flip rates (the demo: 0.1)")
    parser.add_argument("--n", type=int, default=240, help="images per seed")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--size", type=int, default=64, help="image side in px (the demo's: 64)")
    parser.add_argument("--epochs", type=int, default=None, help="override the engine's choice")
    parser.add_argument("--imgsz", type=int, default=None, help="override the engine's choice")
    parser.add_argument("--quick", action="store_true", help="1 seed, noise 0.2, 150 images")
    parser.add_argument("--no-markdown", action="store_true", help="do not write bench/figures/mislabels.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.noise, args.n = "1", "0.2", 150
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.noise = [float(s) for s in args.noise.split(",") if s.strip()]
    return args


def fiftyone_scores(fo, fob, paths, noisy, probs, classes, name):
    """Mistakenness (logits and confidence) from FiftyOne Brain for the given outputs, in order."""
    dataset = fo.Dataset(name)
    try:
        samples = []
        for path, label, p in zip(paths, noisy, probs):
            best = int(np.argmax(p))
            samples.append(fo.Sample(
                filepath=str(path),
                idx=len(samples),
                ground_truth=fo.Classification(label=label),
                predictions=fo.Classification(label=classes[best], confidence=float(p[best]),
                                              logits=np.log(np.clip(p, 1e-12, None)).tolist()),
            ))
        dataset.add_samples(samples, progress=False)
        out = {}
        for key, use_logits in (("fo_logits", True), ("fo_conf", False)):
            field = f"mistakenness_{key}"
            fob.compute_mistakenness(dataset, "predictions", label_field="ground_truth",
                                     mistakenness_field=field, use_logits=use_logits, progress=False)
            index, values = dataset.values("idx"), dataset.values(field)
            ordered = np.zeros(len(paths))
            ordered[np.asarray(index)] = np.asarray(values, dtype=np.float64)
            out[key] = ordered
        return out
    finally:
        dataset.delete()


def cleanlab_scores(noisy, probs, classes, k):
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    labels = np.array([classes.index(label) for label in noisy])
    ranked = find_label_issues(labels, probs, return_indices_ranked_by="self_confidence")
    quality = get_label_quality_scores(labels, probs, method="self_confidence")
    top = list(ranked[:k])
    if len(top) < k:  # fill the rest of the top-k with the lowest quality among the unflagged
        flagged = set(int(i) for i in ranked)
        rest = [int(i) for i in np.argsort(quality, kind="stable") if int(i) not in flagged]
        top += rest[: k - len(top)]
    return np.asarray(top, dtype=int), -quality, np.asarray(ranked, dtype=int)


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="labelloop-bench-mislabels-"))
    os.environ.setdefault("LABELLOOP_HOME", str(work / "home"))
    os.environ.setdefault("YOLO_CONFIG_DIR", str(Path.home() / ".cache" / "labelloop" / "ultralytics"))
    for name, value in (("LABELLOOP_IMGSZ", args.imgsz), ("LABELLOOP_EPOCHS", args.epochs)):
        if value:
            os.environ[name] = str(value)

    from labelloop.dev.localstack import start_mongod

    mongod = start_mongod(work / "mongo")
    os.environ["FIFTYONE_DATABASE_URI"] = mongod.url
    os.environ["FIFTYONE_DATABASE_VALIDATION"] = "false"
    os.environ["FIFTYONE_DO_NOT_TRACK"] = "true"
    from labelloop.fo.env import import_fiftyone

    try:
        fo = import_fiftyone()
        import fiftyone.brain as fob

        rows = run(args, work, fo, fob)
    finally:
        mongod.stop()
    report(args, rows)
    return 0


def run(args, work, fo, fob):
    from labelloop.core import ranking, scoring
    from labelloop.core.labelconfig import parse_label_config
    from labelloop.core.predict import load_model, predict_images
    from labelloop.core.registry import Registry
    from labelloop.dev.shapes import flip_image_labels, generate_shapes, label_config, to_label_studio_tasks
    from labelloop.labelstudio.media import LocalFileFetcher
    from labelloop.workflows.pipeline import cross_val_predictions, train_new_version

    spec = parse_label_config(label_config("classification"))
    fetcher = LocalFileFetcher()
    rows = []
    for seed in args.seeds:
        data = generate_shapes(work / f"data{seed}", n=args.n, seed=100 + seed, size=args.size, max_objects=1,
                               style="simple")
        classes = list(data.classes)
        paths = [data.images_dir / im.file for im in data.images]
        clean = [im.label for im in data.images]
        for noise in args.noise:
            t0 = time.perf_counter()
            noisy, flipped = flip_image_labels(data, noise, seed)
            tasks = to_label_studio_tasks(data, "classification", labels=noisy)
            is_flip = np.zeros(len(tasks), dtype=bool)
            is_flip[flipped] = True
            k = len(flipped)

            # in-sample: one model on every noisy label, predicting the images it trained on
            registry = Registry(work / f"models-{seed}-{noise}")
            outcome = train_new_version(registry, "all", tasks, spec, fetcher)
            model = load_model(outcome.manifest.weights, outcome.manifest.version)
            preds_in = predict_images(model, paths, spec, 0.5)
            # out-of-sample: K folds, each image predicted by a model that never saw its label
            oos = cross_val_predictions(tasks, spec, fetcher, folds=args.folds)
            preds_oos = [oos[t["id"]] for t in tasks]
            probs = np.array([[p.class_probs[c] for c in classes] for p in preds_oos])

            scores = {
                "loss_in_sample": np.array([scoring.classification_loss(p.class_probs, noisy[i])
                                            for i, p in enumerate(preds_in)]),
                "loss_oos": np.array([scoring.classification_loss(p.class_probs, noisy[i])
                                      for i, p in enumerate(preds_oos)]),
            }
            top_cleanlab, cleanlab_auroc_scores, flagged = cleanlab_scores(noisy, probs, classes, k)
            scores["cleanlab"] = cleanlab_auroc_scores
            scores.update(fiftyone_scores(fo, fob, paths, noisy, probs, classes, f"bench-mislabels-{seed}-{noise}"))
            from labelloop.dev.baselines import logreg_probabilities

            lr_probs = logreg_probabilities(paths, noisy, classes, folds=args.folds, size=args.size)
            top_lr, scores["cleanlab_lr"], _ = cleanlab_scores(noisy, lr_probs, classes, k)

            metrics = {}
            for key, _ in METHODS:
                if key in ("cleanlab", "cleanlab_lr"):
                    top = top_cleanlab if key == "cleanlab" else top_lr
                    p_at_k = float(is_flip[top].mean()) if k else 0.0
                else:
                    p_at_k = ranking.precision_at_k(scores[key], is_flip, k)
                metrics[key] = {"auroc": ranking.auroc(scores[key], is_flip), "precision_at_k": p_at_k}
            acc_in = float(np.mean([p.regions[0].label == c for p, c in zip(preds_in, clean)]))
            acc_oos = float(np.mean([classes[int(np.argmax(p))] == c for p, c in zip(probs, clean)]))
            row = {
                "seed": seed, "noise": noise, "n": len(tasks), "k": k, "metrics": metrics,
                "accuracy_in_sample_vs_clean": acc_in, "accuracy_oos_vs_clean": acc_oos,
                "cleanlab_flagged": int(len(flagged)),
                "cleanlab_flagged_precision": float(is_flip[flagged].mean()) if len(flagged) else float("nan"),
                "seconds": time.perf_counter() - t0,
            }
            rows.append(row)
            print(f"seed {seed} noise {noise:.2f}: k={k} oos acc {acc_oos:.2f} in-sample acc {acc_in:.2f} | "
                  + " | ".join(f"{key} auroc {m['auroc']:.3f} p@k {m['precision_at_k']:.3f}" for key, m in metrics.items())
                  + f" | {row['seconds']:.0f} s", flush=True)
    return rows


def summarize(args, rows):
    table = []
    for noise in args.noise:
        sub = [r for r in rows if r["noise"] == noise]
        for key, name in METHODS:
            au = [r["metrics"][key]["auroc"] for r in sub]
            pk = [r["metrics"][key]["precision_at_k"] for r in sub]
            table.append({"noise": noise, "method": key, "name": name, "k": [r["k"] for r in sub],
                          "auroc_mean": float(np.mean(au)), "auroc_min": float(np.min(au)), "auroc_max": float(np.max(au)),
                          "p_at_k_mean": float(np.mean(pk)), "p_at_k_min": float(np.min(pk)), "p_at_k_max": float(np.max(pk)),
                          "oos_accuracy_mean": float(np.mean([r["accuracy_oos_vs_clean"] for r in sub]))})
    return table


def markdown(args, rows, table, stamp):
    lines = [
        "# Mislabel detection on classification (generated shapes, injected label flips)",
        "",
        f"Run {stamp} on {platform.node() or 'this machine'} ({os.cpu_count()} CPU cores), "
        f"`bench/mislabels.py` with seeds {','.join(map(str, args.seeds))}, {args.n} 'simple' images per seed "
        f"(one object each), noise {', '.join(f'{int(round(100 * x))} %' for x in args.noise)}, "
        f"{args.folds}-fold out-of-sample outputs, training from scratch "
        + (f"at {args.imgsz or args.size} px for {args.epochs or 'the engine-chosen'} epochs." if args.epochs or args.imgsz
           else f"with the engine's own settings ({args.size} px images)."),
        "",
        "Every method ranks the same model outputs (cleanlab and FiftyOne get the out-of-sample probabilities). "
        "k = number of flipped labels; random picking gets precision@k = noise rate and AUROC = 0.5. "
        "Mean over seeds, [min, max] in brackets.",
        "",
        "| noise | k | method | AUROC | precision@k |",
        "|---|---|---|---|---|",
    ]
    for t in table:
        ks = "/".join(str(k) for k in sorted(set(t["k"])))
        lines.append(f"| {int(round(100 * t['noise']))} % | {ks} | {t['name']} | "
                     f"{t['auroc_mean']:.3f} [{t['auroc_min']:.3f}, {t['auroc_max']:.3f}] | "
                     f"{t['p_at_k_mean']:.3f} [{t['p_at_k_min']:.3f}, {t['p_at_k_max']:.3f}] |")
    accs = ", ".join(f"{int(round(100 * n))} %: {np.mean([r['accuracy_oos_vs_clean'] for r in rows if r['noise'] == n]):.2f}"
                     for n in args.noise)
    def flagged_at(n):
        return np.mean([r['cleanlab_flagged'] for r in rows if r['noise'] == n])

    flagged = ", ".join(f"{int(round(100 * n))} %: {flagged_at(n):.0f} flagged, "
                        f"precision {np.nanmean([r['cleanlab_flagged_precision'] for r in rows if r['noise'] == n]):.2f}"
                        for n in args.noise)
    lines += [
        "",
        f"Out-of-sample accuracy of the fold models against the clean labels (by noise): {accs}.",
        f"cleanlab's own issue set (mean over seeds): {flagged}.",
        "",
        f"Reproduce: `.venv/bin/python bench/mislabels.py --seeds {','.join(map(str, args.seeds))} "
        f"--noise {','.join(str(x) for x in args.noise)} --n {args.n} --folds {args.folds}`",
        "",
    ]
    return "\n".join(lines)


def report(args, rows):
    stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    table = summarize(args, rows)
    print()
    print(f"{'noise':>5} {'method':<48} {'AUROC':>7} {'P@k':>7}")
    for t in table:
        print(f"{t['noise']:>5.2f} {t['name']:<48} {t['auroc_mean']:7.3f} {t['p_at_k_mean']:7.3f}")
    out = HERE / "out"
    out.mkdir(parents=True, exist_ok=True)
    raw = out / f"mislabels-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    raw.write_text(json.dumps({"args": vars(args), "date": stamp, "rows": rows, "table": table}, indent=1,
                              default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o)))
    print(f"raw results: {raw}")
    if not args.no_markdown:
        figures = HERE / "figures"
        figures.mkdir(parents=True, exist_ok=True)
        (figures / "mislabels.md").write_text(markdown(args, rows, table, stamp))
        print(f"table: {figures / 'mislabels.md'}")


if __name__ == "__main__":
    sys.exit(main())
