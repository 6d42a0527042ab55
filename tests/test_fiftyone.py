"""FiftyOne face, for real: a real mongod, real FiftyOne, a dataset synced from a real Label Studio
project, every operator run through FiftyOne's own operator execution the way the App runs it (a
generator streaming progress, then the result: tests/fo_helpers.py), and scheduled operations run by
``labelloop delegated``."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from conftest import install_model, wait_for
from fo_helpers import run, run_immediately, schedule

from labelloop.dev.shapes import flip_image_labels, generate_shapes, label_config, to_label_studio_result

pytestmark = pytest.mark.e2e
PLUGIN = "@labelloop/labelloop"


@pytest.fixture(scope="module")
def fo_project(ls_api, label_studio, backend, trained, fo, tmp_path_factory):
    """A classification project: 30 images, 24 annotated (a fifth of them wrongly), a model in service."""
    images = generate_shapes(tmp_path_factory.mktemp("fo-images"), n=30, seed=31, max_objects=1)
    noisy, flipped = flip_image_labels(images, 0.2, seed=31)
    project = ls_api.create_project("fiftyone classification", label_config("classification"))["id"]
    tasks = ls_api.upload_images(project, [images.images_dir / im.file for im in images.images])
    index = {t["id"]: next(i for i, im in enumerate(images.images) if t["data"]["image"].endswith(im.file))
             for t in tasks}
    annotated = tasks[:24]
    for task in annotated:
        result = to_label_studio_result(images.images[index[task["id"]]], "classification")
        result[0]["value"]["choices"] = [noisy[index[task["id"]]]]
        ls_api.annotate(task["id"], result)
    version = install_model(backend.info["model_dir"], project, trained("classification"))
    saved = {k: os.environ.get(k) for k in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "MODEL_DIR")}
    os.environ.update(LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.info["token"],
                      MODEL_DIR=str(backend.info["model_dir"]))
    from labelloop.fo.sync import sync_project

    report = sync_project(project)
    yield {"project": project, "tasks": tasks, "annotated": annotated, "version": version, "report": report,
           "dataset": fo.load_dataset(report.dataset), "index": index, "noisy": noisy, "images": images}
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_sync_makes_one_sample_per_task_with_labels_and_predictions(fo_project):
    dataset, tasks = fo_project["dataset"], fo_project["tasks"]
    assert fo_project["report"].added == len(tasks) == len(dataset)
    assert sorted(dataset.values("ls_task_id")) == sorted(t["id"] for t in tasks)
    assert "ls_task_id" in dataset.list_indexes()
    labeled = dataset.exists("ground_truth")
    assert len(labeled) == 24
    for sample in labeled:
        image_index = fo_project["index"][sample.ls_task_id]
        assert sample.ground_truth.label == fo_project["noisy"][image_index]
    assert set(dataset.values("prediction_version")) == {fo_project["version"]}
    scores = dataset.values("ls_score")
    assert all(0.0 <= s <= 1.0 for s in scores)
    probs = dataset.first().class_probs
    assert set(probs) == {"circle", "square", "triangle", "star"} and abs(sum(probs.values()) - 1) < 1e-6


def test_resync_updates_only_what_changed_and_keeps_the_analysts_work(fo, fo_project, ls_api):
    dataset = fo_project["dataset"]
    sample = dataset.match({"ls_task_id": fo_project["annotated"][0]["id"]}).first()
    sample["my_note"] = "looks odd"
    sample.tags.append("mine")
    sample.save()
    dataset.save_view("my view", dataset.match_tags("mine"))
    task = ls_api.task(fo_project["annotated"][0]["id"])
    annotation = task["annotations"][0]
    other = next(c for c in ("circle", "square", "triangle", "star") if c != sample.ground_truth.label)
    result = annotation["result"]
    result[0]["value"]["choices"] = [other]
    ls_api.request("PATCH", f"/api/annotations/{annotation['id']}", json={"result": result})

    report = run(fo, dataset, "sync_label_studio", project=fo_project["project"], predict=True)
    assert report["added"] == 0 and report["updated_ground_truth"] == 1 and report["predicted"] == 0
    assert report["label_studio_link"] == f"{os.environ['LABEL_STUDIO_URL']}/projects/{fo_project['project']}/data"
    sample.reload()
    assert sample.ground_truth.label == other
    assert sample["my_note"] == "looks odd" and "mine" in sample.tags
    assert dataset.has_saved_view("my view") and len(dataset) == len(fo_project["tasks"])


def test_operators_write_scores_views_and_a_review_queue(fo, fo_project, ls_api, trained):
    dataset = fo_project["dataset"]
    from fiftyone.operators import list_operators

    listed = {op.uri for op in list_operators()}
    assert {f"{PLUGIN}/{name}" for name in ("sync_label_studio", "compute_mislabel_scores", "uncertainty_sampling",
                                            "compute_embeddings", "evaluate_model", "compare_versions",
                                            "send_to_label_studio")} <= listed

    mislabels = run(fo, dataset, "compute_mislabel_scores", mode="in_sample", folds=3, celery=False)
    assert mislabels["scored"] == 24 and mislabels["saved_view"] == "labelloop-suspected-mislabels"
    assert dataset.has_saved_view("labelloop-suspected-mislabels")
    worst = dataset.load_saved_view("labelloop-suspected-mislabels").values("mislabel_score")
    assert worst == sorted(worst, reverse=True)

    embeddings = run(fo, dataset, "compute_embeddings", method="pca")
    assert embeddings["embedded"] == len(dataset)
    assert "labelloop_embeddings_pca" in dataset.list_brain_runs()
    assert "labelloop_embeddings_similarity" in dataset.list_brain_runs()

    picked = run(fo, dataset, "uncertainty_sampling", method="entropy", k=4, diversity=True, unlabeled_only=True,
                 send=False)
    tagged = dataset.match_tags("labelloop:uncertain")
    assert picked["selected"] == 4 and len(tagged) == 4
    assert all(s.ground_truth is None for s in tagged)

    evaluation = run(fo, dataset, "evaluate_model", version="", split="all", cohort="tags", confidence=0.8)
    assert set(evaluation["confusion_matrix"]["classes"]) == {"circle", "square", "triangle", "star"}
    assert sum(map(sum, evaluation["confusion_matrix"]["matrix"])) == 24
    assert "eval_serving" in dataset.list_evaluations()

    newer = install_model(Path(os.environ["MODEL_DIR"]), fo_project["project"], trained("classification"))
    diff = run(fo, dataset, "compare_versions", version_a=fo_project["version"], version_b=newer)
    assert diff["compared"] >= 1 and diff["gained"] == diff["lost"] == 0  # same weights: nothing moves

    sent = run(fo, dataset.match_tags("labelloop:uncertain"), "send_to_label_studio", title="review these")
    assert sent["label_studio_link"].endswith(f"/projects/{fo_project['project']}/data?tab={sent['tab']}")
    queue = ls_api.request("GET", "/api/tasks", params={"view": sent["tab"], "project": fo_project["project"]})["tasks"]
    assert sorted(t["id"] for t in queue) == sorted(tagged.values("ls_task_id"))



def test_an_operator_says_what_is_missing(fo, fo_project):
    """labelloop's errors end the run with their message (any LabelloopError, not only a ValueError)."""
    plain = fo.Dataset(f"not-synced-{os.getpid()}")
    plain.add_sample(fo.Sample(filepath=str(fo_project["images"].images_dir / fo_project["images"].images[0].file)))
    outcome = run_immediately(plain, "compute_embeddings", method="pca")
    assert outcome.result is None and "was not synced from Label Studio" in outcome.error
    assert outcome.progress, "the App was told the run started before it failed"
    plain.delete()

    dataset, project = fo_project["dataset"], fo_project["project"]
    # a registry error (a RuntimeError, not a ValueError): the version's name is well formed, it does not exist
    outcome = run_immediately(dataset, "compare_versions", version_a=fo_project["version"], version_b=f"p{project}-v99")
    assert outcome.result is None and f"has no version 'p{project}-v99'" in outcome.error
    # the form refuses another project's version before anything runs
    outcome = run_immediately(dataset, "evaluate_model", version="p999-v1", split="all")
    assert "belongs to project 999" in outcome.error


def test_heavy_operators_are_scheduled_by_default_and_folds_always(fo, fo_project):
    import asyncio

    from fiftyone.operators.executor import resolve_execution_options
    from fiftyone.operators.registry import OperatorRegistry

    dataset = fo_project["dataset"]

    def options(operator, **params):
        request = {"dataset_name": dataset.name, "view": [], "params": params}
        return asyncio.run(resolve_execution_options(OperatorRegistry(), f"{PLUGIN}/{operator}", request))

    for heavy in ("sync_label_studio", "compute_embeddings", "compute_mislabel_scores"):
        chosen = options(heavy, project=fo_project["project"], mode="in_sample")
        assert chosen.default_choice_to_delegated and chosen.allow_immediate_execution, heavy
    folds = options("compute_mislabel_scores", mode="out_of_sample")
    assert folds.allow_delegated_execution and not folds.allow_immediate_execution
    light = options("evaluate_model")
    assert not light.default_choice_to_delegated and light.allow_delegated_execution


def test_the_delegated_service_runs_scheduled_operations(fo, fo_project, tmp_path):
    """What the App's "Schedule" queues, `labelloop delegated` runs: progress, result and fields written,
    and a failing operation fails with its message."""
    from fiftyone.operators.delegated import DelegatedOperationService
    from fiftyone.operators.executor import ExecutionRunState

    from labelloop.dev.localstack import start_delegated

    dataset, project = fo_project["dataset"], fo_project["project"]
    if dataset.has_sample_field("mislabel_score"):
        dataset.delete_sample_field("mislabel_score")  # the service, not an earlier test, must write it
    good = schedule(dataset, "compute_mislabel_scores", mode="in_sample", folds=3, celery=False)
    bad = schedule(dataset, "compare_versions", version_a=fo_project["version"], version_b=f"p{project}-v98")
    service = DelegatedOperationService()
    assert service.get(good).run_state == ExecutionRunState.QUEUED

    process = start_delegated(dict(os.environ), tmp_path / "delegated")
    try:
        finished = (ExecutionRunState.COMPLETED, ExecutionRunState.FAILED)
        wait_for(lambda: all(service.get(i).run_state in finished for i in (good, bad)), 300,
                 f"the delegated service to run both operations (log: {process.log})")
    finally:
        process.stop()
    done, failed = service.get(good), service.get(bad)
    assert done.run_state == ExecutionRunState.COMPLETED, done.result.error
    assert done.result.result["scored"] == 24 and done.result.result["field"] == "mislabel_score"
    assert done.status.progress == 1.0 and "suspected mislabel" in done.status.label
    assert done.metadata["outputs_schema"], "the service laid the result out (resolve_output) for the Runs page"
    dataset.reload()
    assert len(dataset.exists("mislabel_score")) == 24
    assert dataset.has_saved_view("labelloop-suspected-mislabels")
    assert failed.run_state == ExecutionRunState.FAILED and f"has no version 'p{project}-v98'" in failed.result.error


def test_out_of_sample_scoring_is_delegated_and_trains_its_folds_on_celery(fo, fo_project, tmp_path):
    """Out-of-sample mislabels never run in the App server: asked for immediately it is scheduled anyway;
    `labelloop delegated` runs it and its K fold trainings are `labelloop.crossval_fold` jobs on a
    training worker (the injected Celery fold runner)."""
    from fiftyone.operators import execute_operator
    from fiftyone.operators.delegated import DelegatedOperationService
    from fiftyone.operators.executor import ExecutionRunState

    from labelloop.dev.localstack import start_delegated, start_worker

    dataset = fo_project["dataset"]
    asked = execute_operator(f"{PLUGIN}/compute_mislabel_scores",
                             ctx={"dataset": dataset, "params": {"view_target": "DATASET", "mode": "out_of_sample",
                                                                 "folds": 2, "celery": True}})
    assert asked.delegated, "out-of-sample scoring ran in the caller's process"
    operation = asked.result["id"]
    worker = start_worker(tmp_path / "worker", queues="train",
                          env={"LABELLOOP_EPOCHS": "2", "LABELLOOP_WARM_START_STEPS": "0"})
    delegated = start_delegated(dict(os.environ), tmp_path / "delegated")
    service = DelegatedOperationService()
    try:
        finished = (ExecutionRunState.COMPLETED, ExecutionRunState.FAILED)
        wait_for(lambda: service.get(operation).run_state in finished, 600,
                 f"out-of-sample scoring (logs: {delegated.log}, {worker.log})", every=2)
    finally:
        delegated.stop()
        worker.stop()
    done = service.get(operation)
    assert done.run_state == ExecutionRunState.COMPLETED, done.result.error
    result = done.result.result
    assert result["field"] == "mislabel_score_oos" and result["saved_view"] == "labelloop-suspected-mislabels-oos"
    assert result["scored"] >= 20, result  # every labeled task scored by the fold model that never saw it
    assert worker.log.read_text(errors="replace").count("labelloop.crossval_fold") >= 2, "the folds ran elsewhere"
    dataset.reload()
    assert len(dataset.exists("mislabel_score_oos")) == result["scored"]


def test_predictions_and_embeddings_made_on_the_prediction_workers_equal_the_ones_made_here(fo, fo_project, tmp_path,
                                                                                           monkeypatch):
    """At size the forward passes run as `labelloop.predict_files` chunks on every prediction worker (a real
    Celery worker on a real Redis; the files on the volume they share) while this process writes what comes
    back: the same labels and probabilities, and the same embeddings, as computing them here. A chunk that fails
    every try (an image file that is not an image) is reported and leaves its samples as they were; the other
    chunks are written."""
    import numpy as np
    from fiftyone import ViewField as F

    from labelloop.dev.localstack import start_worker
    from labelloop.fo.analysis import compute_embeddings, spec_of
    from labelloop.fo.sync import predict_samples, serving_model
    from labelloop.tasks.jobs import predict_files_on_celery, prediction_workers
    from labelloop.workflows import file_chunks

    here = fo_project["dataset"]
    spec = spec_of(here)
    model = serving_model(fo_project["project"], spec)
    copy = here.clone(f"{here.name}-on-workers")
    broken = tmp_path / "not-an-image.png"
    broken.write_bytes(b"this is not an image")
    copy.add_sample(fo.Sample(filepath=str(broken)))
    monkeypatch.setattr(file_chunks, "CHUNK", 10)  # 31 samples: four chunks, the last one the broken file alone
    assert prediction_workers() == []  # nothing takes the prediction queue yet: the plugin would predict here
    readable = copy.exclude(copy.match(F("filepath") == str(broken)).values("id"))
    embedded_here = compute_embeddings(readable, visualize=False, similarity=False)  # before: the vectors made here
    vectors_here = dict(zip(*copy.values(["filepath", "embeddings"])))
    worker = start_worker(tmp_path / "worker", queues="predict")
    try:
        assert len(wait_for(prediction_workers, 60, "the prediction worker to answer")) == 1
        said = []
        done = predict_samples(copy, spec, model, force=True, runner=predict_files_on_celery,
                               progress=lambda fraction, message: said.append(message))
        copy.set_values("embeddings", [None] * len(copy))
        embedded = compute_embeddings(copy, visualize=False, similarity=False, runner=predict_files_on_celery)
    finally:
        worker.stop()
    # the embeddings: the same vectors from the workers, the broken file's chunk reported and left empty
    assert embedded_here["embedded"] == embedded["embedded"] == len(here) and embedded["failed_chunks"] == 1
    vectors = dict(zip(*copy.values(["filepath", "embeddings"])))
    assert vectors.pop(str(broken)) is None and vectors_here.pop(str(broken)) is None
    assert vectors.keys() == vectors_here.keys()
    assert all(np.allclose(vectors[p], vectors_here[p], atol=1e-4) for p in vectors)
    assert done == len(here), said
    assert "1 chunk(s) failed" in said[-1], said
    assert worker.log.read_text(errors="replace").count("labelloop.predict_files") >= 4, "the chunks ran elsewhere"
    mine = dict(zip(*here.values(["filepath", "class_probs"])))
    theirs = dict(zip(*copy.values(["filepath", "class_probs"])))
    assert theirs.pop(str(broken)) is None  # the failed chunk's sample was left as it was
    assert set(theirs) == set(mine)
    for path, probs in theirs.items():
        assert probs.keys() == mine[path].keys()
        assert all(abs(probs[c] - mine[path][c]) < 1e-4 for c in probs), path
    assert dict(zip(*copy.values(["filepath", "predictions.label"]))) == {
        **dict(zip(*here.values(["filepath", "predictions.label"]))), str(broken): None}
    copy.delete()


def test_the_delegated_services_health_check_is_its_database(mongod):
    """`labelloop delegated --check` (the compose healthcheck): 0 while FiftyOne's MongoDB answers, else 1 and why."""
    import subprocess
    import sys

    def check(uri):
        return subprocess.run([sys.executable, "-m", "labelloop.cli", "delegated", "--check"], capture_output=True,
                              text=True, timeout=60, env={**os.environ, "FIFTYONE_DATABASE_URI": uri})

    assert check(mongod.url).returncode == 0
    down = check("mongodb://127.0.0.1:9")
    assert down.returncode == 1 and "does not answer" in down.stderr


def test_explain_writes_heatmaps_of_the_served_version(fo, fo_project):
    """The explain operator (EigenCAM of the version in service, core/saliency.py) puts a heatmap on each
    sample of the view it is given and saves the view of the explained samples."""
    dataset = fo_project["dataset"]
    view = dataset.exists("ground_truth").limit(6)
    explained = run(fo, view, "explain_predictions", limit=5)
    assert explained["explained"] == 5 and explained["model_version"].startswith(f"p{fo_project['project']}-v"), explained
    saved = dataset.load_saved_view("labelloop-explained")
    assert len(saved) == 5
    for sample in saved:
        heatmap = sample["saliency"]
        assert heatmap.map.dtype == "uint8" and max(heatmap.map.shape) <= 128 and heatmap.map.max() > 0
    assert len(dataset.exists("saliency")) == 5


def test_model_checks_and_the_suite_editor(fo, fo_project, backend, monkeypatch):
    """A version whose model tests failed on two tasks and a drift report with one task beyond: the operator
    writes failed_tests / ood_ratio and their saved views; the editor saves a suite through the backend and
    says what is wrong with a bad one."""
    import json

    from labelloop.core.registry import Registry

    project, dataset = fo_project["project"], fo_project["dataset"]
    registry = Registry(backend.info["model_dir"])
    serving = registry.serving(project)
    a, b, c = (t["id"] for t in fo_project["annotated"][:3])
    results = [{"name": "stars are stars", "kind": "confidence", "required": True, "passed": False, "value": 0.5,
                "bar": "accuracy >= 0.8", "samples": 4, "failing": [a, b], "failing_count": 2, "note": ""},
               {"name": "flip", "kind": "invariance", "required": False, "passed": True, "value": 0.0,
                "bar": "changed by flip_lr <= 0.1", "samples": 4, "failing": [], "failing_count": 0, "note": ""}]
    fields = {k: v for k, v in serving.to_json().items()
              if k not in ("version", "project", "created_at", "weights_sha256")}
    changes = {"compared_with": serving.version, "regressed": [b], "regressed_count": 1, "fixed": [], "fixed_count": 0}
    checked = registry.add_version(project, serving.weights, {**fields, "model_tests": {"results": results},
                                                              "changes": changes}).version
    (registry.project_dir(project) / "drift.json").write_text(json.dumps(
        {"project": str(project), "drifted": True, "beyond": [{"task": c, "ratio": 2.5}]}))
    out = run(fo, dataset, "model_checks", version="")
    assert out["test_failures"] == 2 and out["tests_failed"] == ["stars are stars"] and out["out_of_distribution"] == 1
    failures = dataset.load_saved_view("labelloop-test-failures")
    assert sorted(failures.values("ls_task_id")) == sorted([a, b])
    assert failures.first()["failed_tests"] == ["stars are stars"]
    assert dataset.load_saved_view("labelloop-out-of-distribution").values("ood_ratio") == [2.5]
    assert out["regressions"] == 1 and dataset.load_saved_view("labelloop-regressions").values("ls_task_id") == [b]
    assert run(fo, dataset, "model_checks", version=checked)["test_failures"] == 2

    monkeypatch.setenv("LABELLOOP_BACKEND_URL", backend.url)
    suite = {"tests": [{"name": "stars are stars", "kind": "confidence", "cohort": {"label": "star"}, "min": 0.8}],
             "costs": {"classes": {"star": 5}}}
    saved = run(fo, dataset, "edit_model_tests", suite=json.dumps(suite))
    assert saved == {"tests": 1, "costs": True, "names": ["stars are stars"]}
    assert httpx.get(f"{backend.url}/projects/{project}/model-tests").json()["tests"][0]["min"] == 0.8
    outcome = run_immediately(dataset, "edit_model_tests", suite='{"tests": [{"name": "x", "kind": "guess"}]}')
    assert outcome.error and "kind must be one of" in outcome.error, outcome.error
