"""``labelloop demo``: the whole loop on the embedded data, with a simulated labeler.

1. brings the local stack up (Redis, MongoDB, Label Studio, backend, workers, FiftyOne App);
2. generates the shapes data with injected label noise (the simulated labeler makes mistakes);
3. creates a Label Studio project and connects the backend (Label Studio adds the webhook);
4. active learning: each round the labeler annotates, through the Label Studio API, the k tasks the
   Data Manager lists least-confident first; the webhooks alone make Celery retrain and push the new
   version's predictions; a random-sampling run with the same budget trains beside it for comparison;
5. syncs the project to FiftyOne and runs mislabel-by-loss, uncertainty sampling (sent back to Label
   Studio as a review tab) and embeddings;
6. writes a report (Markdown + PNG plots) and prints the URLs. The stack stays up until
   ``labelloop stack down``.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any

import httpx

from labelloop.config import settings
from labelloop.core.labelconfig import parse_label_config
from labelloop.dev.labeler import LabelerClient
from labelloop.dev.shapes import flip_image_labels, generate_shapes, label_config, to_label_studio_tasks
from labelloop.labelstudio.media import LocalFileFetcher

TASK_TYPE = "classification"  # learnable from scratch on 2 CPU cores in minutes (see README)


def _say(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _choice_result(label: str) -> list[dict]:
    return [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [label]}}]


def _tab(studio: LabelerClient, project: int, title: str) -> list[dict]:
    """The tasks of the project's Data Manager tab ``title`` (none when there is no such tab)."""
    views = studio.request("GET", "/api/dm/views", params={"project": project})
    tab = next((v for v in views if (v.get("data") or {}).get("title") == title), None)
    return studio.tab_tasks(project, tab["id"]) if tab else []


def _label_next(studio: LabelerClient, project: int) -> list[dict]:
    from labelloop.workflows.pipeline import LABEL_NEXT_TAB

    return _tab(studio, project, LABEL_NEXT_TAB)


def _wait_for_version(backend: str, project: int, studio: LabelerClient, after: set[str], unlabeled: int,
                      since: float, timeout: float) -> str:
    """Wait until the jobs this round's annotations started have finished; return the version serving
    then. A new version must also have its predictions on every unlabeled task in Label Studio; when
    the round's training was kept out of service (not better), the previous version goes on serving."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        jobs = httpx.get(f"{backend}/jobs", params={"project": project, "limit": 50}, timeout=10).json()["jobs"]
        busy = [j for j in jobs if j["state"] in ("queued", "running")]
        ours = [j for j in jobs if j["kind"] == "train" and j["created_at"] >= since]
        if busy:
            message = f"{busy[0]['kind']}: {busy[0].get('message', '')}"
            if message != last:
                _say(f"  {message}")
                last = message
        elif ours:
            serving = httpx.get(f"{backend}/versions", params={"project": project}, timeout=10).json()["serving"].get(
                str(project))
            if serving and serving not in after:
                predicted = {p["task"] for p in studio.predictions(project)
                             if p["model_version"] == serving}
                if len(predicted) >= unlabeled:
                    return serving
            elif serving:
                _say(f"  this round's training was not better: {ours[0].get('reason', '')}")
                return serving
        time.sleep(1)
    raise TimeoutError(f"the round's jobs did not finish within {timeout:.0f} s")


def _wait_for_warm_start(backend: str, project: int, timeout: float = 3600) -> dict[str, Any] | None:
    """Wait for the warm-start job that connecting queued (pretraining on every image, no label read).

    A labeler would label meanwhile; the simulated one waits, so that its first 40 labels train from
    the warm start as a real project's would. None when no warm start was queued (switched off)."""
    deadline, seen_at, last_said = time.monotonic() + timeout, time.monotonic(), 0.0
    while time.monotonic() < deadline:
        jobs = httpx.get(f"{backend}/jobs", params={"project": project, "limit": 50}, timeout=10).json()["jobs"]
        warm = [j for j in jobs if j["kind"] == "warm-start"]
        if not warm:
            if time.monotonic() - seen_at > 20:  # connect queues it within a second; none: switched off
                return None
        elif warm[0]["state"] not in ("queued", "running"):
            _say(f"  warm start {warm[0]['state']}: {warm[0].get('message', '')}")
            return warm[0]
        elif time.monotonic() - last_said > 20:
            _say(f"  warm start: {warm[0].get('message', '')}")
            last_said = time.monotonic()
        time.sleep(1)
    raise TimeoutError(f"the warm start did not finish within {timeout:.0f} s")


def _test_predictions(version: str, project: int, test, spec) -> list[str]:
    """Labels the version predicts for the held-out test images (never shown to the labeler)."""
    from labelloop.core.predict import load_model, predict_images
    from labelloop.core.registry import Registry

    manifest = Registry(settings().model_dir).get(project, version)
    model = load_model(manifest.weights, manifest.version)
    preds = predict_images(model, [test.images_dir / im.file for im in test.images], spec, 0.5)
    return [p.regions[0].label for p in preds]


def _accuracy(predicted: list[str], test) -> float:
    return sum(p == im.label for p, im in zip(predicted, test.images)) / len(test.images)


def held_out_metrics(predicted: list[str], truth: list[str], classes: list[str]) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1/support and the confusion matrix on a held-out set."""
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix

    report = classification_report(truth, predicted, labels=classes, output_dict=True, zero_division=0)
    matrix = confusion_matrix(truth, predicted, labels=classes).tolist()
    per_class = {c: {**report[c], "support": int(report[c]["support"])} for c in classes}
    return {"accuracy": float(accuracy_score(truth, predicted)), "report": per_class,
            "confusion_matrix": {"classes": classes, "matrix": matrix}}


def _random_curve(data, noisy: list[str], test, spec, budgets: list[int], seed: int,
                  warm_start_dir: Path | None = None) -> list[float]:
    """The same budgets spent on random tasks, trained in-process with the same engine (and the same
    self-supervised warm start as the live project, when it has one)."""
    import shutil
    import tempfile

    from labelloop.core.predict import load_model, predict_images
    from labelloop.core.registry import Registry
    from labelloop.workflows.pipeline import train_new_version

    order = list(range(len(data.images)))
    random.Random(seed).shuffle(order)
    curve = []
    with tempfile.TemporaryDirectory(prefix="labelloop-demo-random-") as tmp:
        registry = Registry(tmp)
        if warm_start_dir is not None and warm_start_dir.is_dir():
            shutil.copytree(warm_start_dir, registry.project_dir("random") / "warm-start")
        for budget in budgets:
            tasks = to_label_studio_tasks(data, TASK_TYPE, labels=noisy, indices=order[:budget])
            outcome = train_new_version(registry, "random", tasks, spec, LocalFileFetcher())
            model = load_model(registry.serving("random").weights, outcome.manifest.version)
            preds = predict_images(model, [test.images_dir / im.file for im in test.images], spec, 0.5)
            curve.append(sum(p.regions[0].label == im.label for p, im in zip(preds, test.images)) / len(test.images))
            _say(f"  random sampling, {budget} labels: test accuracy {curve[-1]:.2f}")
    return curve


def run_demo(args) -> int:
    from labelloop.dev import stack

    quick = bool(getattr(args, "quick", False))
    # Every setting (architecture, image size, epochs) is the engine's own choice from the data, as
    # for a user: nothing is forced here. 64 px images train a round in ~35 s on 2 CPU cores.
    n_images, rounds, first, per_round = (240, 4, 40, 40) if quick else (400, 6, 40, 40)
    workdir = Path(args.workdir or settings().home / "demo").expanduser()
    workdir.mkdir(parents=True, exist_ok=True)

    _say("1/6 bringing the stack up")
    state = stack.up(say=lambda m: _say("  " + m), app=not getattr(args, "no_app", False))
    env = stack.service_env(state)
    os.environ.update(env)
    services = state["services"]
    backend, ls_url = services["backend"]["url"], services["label-studio"]["url"]
    studio = LabelerClient(ls_url, state["label_studio"]["token"])

    _say(f"2/6 generating {n_images} images (+150 test images), 10 % of the labeler's answers wrong")
    data = generate_shapes(workdir / "data", n=n_images, seed=7, size=64, max_objects=1, style="simple")
    test = generate_shapes(workdir / "test", n=150, seed=8, size=64, max_objects=1, style="simple")
    noisy, flipped = flip_image_labels(data, 0.1, seed=7)
    spec = parse_label_config(label_config(TASK_TYPE))

    _say("3/6 creating the Label Studio project and connecting the backend")
    project = studio.request("POST", "/api/projects", json={"title": f"labelloop demo {time.strftime('%H%M%S')}",
                                                            "label_config": label_config(TASK_TYPE),
                                                            "sampling": "Uncertainty sampling"})["id"]
    for start in range(0, n_images, 50):
        files = [(f"f{i}", (im.file, (data.images_dir / im.file).read_bytes(), "image/png"))
                 for i, im in enumerate(data.images[start : start + 50])]
        studio.request("POST", f"/api/projects/{project}/import", files=files)
    tasks = studio.tasks(project)
    image_of = {t["id"]: next(i for i, im in enumerate(data.images) if t["data"]["image"].endswith(im.file))
                for t in tasks}
    studio.connect_backend(project, backend)
    if settings().webhook_secret:  # Label Studio made the webhook without it: add it, or events get 401
        studio.install_webhook_secret(project, backend, settings().webhook_secret)

    _say("  learning from the unlabeled images first (self-supervised warm start, a Celery job queued at connect)")
    _wait_for_warm_start(backend, project)
    _say(f"4/6 active learning: {first} random labels, then {rounds - 1} rounds of the {per_round} least-confident")
    labeled: set[int] = set()
    versions: set[str] = set()  # versions that served after a round
    budgets, curve = [], []
    order = [t["id"] for t in tasks]
    random.Random(7).shuffle(order)
    for round_no in range(rounds):
        if round_no == 0:
            batch = order[:first]
        else:
            # what a labeler opens: the "label next" tab the prediction job keeps (a random sample
            # while the version is weak, least confident first once it is not), then the Data
            # Manager's least-confident order for whatever the tab no longer holds
            ranked = [t["id"] for t in _label_next(studio, project) if t["id"] not in labeled]
            ranked += [t["id"] for t in studio.tasks(project, ordering=["tasks:predictions_score"])
                       if t["id"] not in labeled and t.get("total_predictions") and t["id"] not in ranked]
            batch = ranked[:per_round]
        since = time.time()
        for task_id in batch:  # the simulated labeler, with its 10 % of mistakes
            studio.annotate(task_id, _choice_result(noisy[image_of[task_id]]))
        labeled.update(batch)
        _say(f"  round {round_no + 1}: labeled {len(labeled)} tasks; waiting for the loop (webhook → Celery)")
        version = _wait_for_version(backend, project, studio, versions, len(tasks) - len(labeled), since,
                                    timeout=600)
        versions.add(version)
        budgets.append(len(labeled))
        test_predicted = _test_predictions(version, project, test, spec)
        curve.append(_accuracy(test_predicted, test))
        _say(f"  {version} serves; held-out test accuracy {curve[-1]:.2f}")
    from labelloop.core.registry import Registry

    warm_start_dir = Registry(settings().model_dir).project_dir(project) / "warm-start"
    random_curve = _random_curve(data, noisy, test, spec, budgets, seed=7, warm_start_dir=warm_start_dir)

    _say("5/6 FiftyOne: sync, mislabels, uncertainty (sent to Label Studio), embeddings")
    from labelloop.fo import analysis as fo_analysis
    from labelloop.fo.sync import sync_project

    report = sync_project(project)
    from labelloop.fo.env import import_fiftyone

    fo = import_fiftyone()
    dataset = fo.load_dataset(report.dataset)
    mislabels = fo_analysis.compute_mislabel_scores(dataset)
    scores = dict(zip(*dataset.exists("ground_truth").values(["ls_task_id", "mislabel_score"])))
    flipped_tasks = {t for t, i in image_of.items() if i in set(flipped) and t in labeled}
    ranked = sorted(scores, key=lambda t: -scores[t])
    found = [len(set(ranked[:k]) & flipped_tasks) for k in range(1, len(ranked) + 1)]
    # what a labeler sees without FiftyOne: the suspects tab the last prediction job wrote
    from labelloop.workflows.suspects import SUSPECTS_TAB

    in_tab = [t["id"] for t in _tab(studio, project, SUSPECTS_TAB)]
    suspects_tab = {"title": SUSPECTS_TAB, "tasks": len(in_tab), "injected_found": len(set(in_tab) & flipped_tasks),
                    "injected_labeled": len(flipped_tasks), "labeled": len(labeled)}
    picked = fo_analysis.uncertainty_sampling(dataset, k=10, diversity=True)
    sent = fo_analysis.send_to_label_studio(dataset.select(picked["selected"]), "labelloop: picked in FiftyOne")
    fo_analysis.compute_embeddings(dataset, method="pca" if quick else "umap")
    tuning = fo_analysis.evaluate_model(dataset, split="val")  # the FiftyOne evaluation an analyst opens
    held_out = held_out_metrics(test_predicted, [im.label for im in test.images], list(spec.labels))

    _say("6/6 writing the report")
    out = _write_report(workdir / "report", budgets, curve, random_curve, found, len(flipped_tasks), held_out,
                        tuning, mislabels, sent, version)
    summary = json.loads((out.parent / "summary.json").read_text())
    jobs = httpx.get(f"{backend}/jobs", params={"project": project, "limit": 500}, timeout=10).json()["jobs"]
    promoted = sorted({j["version"] for j in jobs if j.get("promoted")}, key=lambda v: int(v.rsplit("v", 1)[1]))
    # wall time of each training job in the loop (export, fetch, train, evaluate, calibrate, register)
    train_seconds = sorted(round(float(j["finished_at"]) - float(j["started_at"]), 1) for j in jobs
                           if j["kind"] == "train" and j["state"] == "done" and j.get("started_at") and j.get("finished_at"))
    warm_jobs = [j for j in jobs if j["kind"] == "warm-start" and j["state"] == "done"]
    warm_start = ({**warm_jobs[0].get("warm_start", {}),
                   "seconds": round(float(warm_jobs[0]["finished_at"]) - float(warm_jobs[0]["started_at"]), 1)}
                  if warm_jobs else None)
    summary.update(suspects_tab=suspects_tab)
    summary.update(project=project, versions=promoted, label_studio=ls_url, backend=backend, dataset=report.dataset,
                   training_seconds=train_seconds, warm_start=warm_start)
    if warm_start:
        _say(f"warm start: pretrained on {warm_start['images']} images in {warm_start['seconds']:.0f} s")
    if train_seconds:
        _say(f"training jobs took {min(train_seconds):.0f}-{max(train_seconds):.0f} s each ({len(train_seconds)} jobs)")
    (out.parent / "summary.json").write_text(json.dumps(summary, indent=2))
    app = services.get("fiftyone", {}).get("url")
    print(f"""
Report: {out}
Label Studio  {ls_url}/projects/{project}  login {state['label_studio']['username']} / {state['label_studio']['password']}
              tabs: "labelloop: label next" (what to label now), "labelloop: mislabel suspects"
                    ({suspects_tab['tasks']} tasks, {suspects_tab['injected_found']} of the
                    {suspects_tab['injected_labeled']} injected mistakes),
                    "labelloop: picked in FiftyOne" (the review queue)
FiftyOne App  {(app + '/datasets/' + report.dataset) if app else '(not started)'}
              saved views: {fo_analysis.MISLABEL_VIEW}, {fo_analysis.UNCERTAIN_VIEW}
ML backend    {backend}  (GET /versions, /jobs, /metrics)
The stack stays up for exploring; stop it with: labelloop stack down
""")
    return 0


def _write_report(directory: Path, budgets, curve, random_curve, found, n_flipped, held_out, tuning, mislabels,
                  sent, version: str) -> Path:
    """The demo's report. Every figure says which data it was computed on; held-out figures lead."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    directory.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(budgets, curve, "o-", label="uncertainty (the loop)")
    ax.plot(budgets, random_curve, "s--", label="random")
    ax.set_xlabel("labeled tasks")
    ax.set_ylabel("test accuracy")
    ax.set_title("learning curve")
    ax.legend()
    fig.tight_layout()
    fig.savefig(directory / "learning_curve.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ks = np.arange(1, len(found) + 1)
    ax.plot(ks, found, label="mislabel-by-loss ranking")
    ax.plot(ks, ks * n_flipped / max(1, len(found)), "--", label="random order")
    ax.set_xlabel("k (reviewed, worst first)")
    ax.set_ylabel("injected mislabels found")
    ax.legend()
    fig.tight_layout()
    fig.savefig(directory / "mislabels_found.png", dpi=120)
    plt.close(fig)

    matrix = np.asarray(held_out["confusion_matrix"]["matrix"])
    classes = held_out["confusion_matrix"]["classes"]
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(matrix[0])), labels=(classes + ["(none)"])[: len(matrix[0])], rotation=45)
    ax.set_yticks(range(len(matrix)), labels=(classes + ["(none)"])[: len(matrix)])
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, int(v), ha="center", va="center")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true class (held-out test set)")
    fig.tight_layout()
    fig.savefig(directory / "confusion_matrix.png", dpi=120)
    plt.close(fig)

    report = held_out["report"]
    tuning_n, tuning_accuracy = tuning["samples"], tuning["accuracy"]
    rows = "\n".join(f"| {c} | {report[c]['precision']:.2f} | {report[c]['recall']:.2f} | {report[c]['f1-score']:.2f} "
                     f"| {int(report[c]['support'])} |" for c in classes if c in report)
    at = lambda k: found[min(k, len(found)) - 1] if found else 0
    text = f"""# labelloop demo report

**{version}** (the version in service) is right on **{held_out['accuracy']:.2f}** of
{sum(report[c]['support'] for c in classes)} held-out test images — images no labeler saw, with their true
classes. (On the tuning split — {tuning_n} labeled tasks the model did not train on, labels by the simulated
labeler including its mistakes — its accuracy is {tuning_accuracy:.2f}.)

## Learning curve (accuracy on the held-out test images)

![learning curve](learning_curve.png)

| labeled tasks | {' | '.join(map(str, budgets))} |
|---|{'---|' * len(budgets)}
| uncertainty (the loop) | {' | '.join(f'{v:.2f}' for v in curve)} |
| random | {' | '.join(f'{v:.2f}' for v in random_curve)} |

## Injected mislabels found

{n_flipped} of the labeler's answers were wrong on purpose. Reviewing worst-first by mislabel score:
found {at(5)} in the top 5, {at(10)} in the top 10, {at(20)} in the top 20
({mislabels['suspected']} samples in the saved view of suspected mislabels).

![mislabels found](mislabels_found.png)

## Per-class metrics of {version} on the held-out test images

| class | precision | recall | F1 | support |
|---|---|---|---|---|
{rows}

![confusion matrix](confusion_matrix.png)

Review queue sent to Label Studio: tab "{sent['title']}" with {sent['tasks']} tasks.
"""
    path = directory / "report.md"
    path.write_text(text)
    (directory / "summary.json").write_text(json.dumps({
        "budgets": budgets, "uncertainty_curve": curve, "random_curve": random_curve,
        "mislabels_found_at": {k: at(k) for k in (5, 10, 20)}, "injected_mislabels_labeled": n_flipped,
        "review_tab": sent, "held_out_accuracy": held_out["accuracy"],
        "per_class": {c: report[c] for c in classes if c in report}, "per_class_computed_on": "held-out test images",
        "tuning_split_accuracy": tuning_accuracy, "tuning_split_samples": tuning_n,
    }, indent=2))
    return path
