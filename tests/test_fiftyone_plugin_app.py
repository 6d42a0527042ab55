"""The plugin in the real App, as a person uses it: a headless Chromium (DevTools protocol, tests/cdp.py) on
``labelloop app`` with the real MongoDB, the real backend (``labelloop serve``: ``/jobs``, promotion) and
Redis (the job store).

* the panel lists the project's versions with their metrics, its jobs, and rolls back through the backend;
* an operator run from the App streams its progress and shows its result (counts) in the App;
* the App server's own endpoints stream progress lines and lay the result out (``resolve_output``).

Screenshots go to ``bench/out/fiftyone/`` (git-ignored): the panel before and after the rollback, the
operator's form and its result.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("LABELLOOP_TEST_ARTIFACTS", ROOT / "bench" / "out" / "fiftyone"))
PLUGIN = "@labelloop/labelloop"
PROJECT = 9001  # a project id no Label Studio of the suite reaches: the registry and job store are the backend's
CLASSES = ("circle", "square", "triangle", "star")


@pytest.fixture(scope="module")
def versions(backend, tmp_path_factory):
    """Two versions of PROJECT in the backend's registry; v2 in service (its parent is v1)."""
    from labelloop.core.registry import Registry

    registry = Registry(backend.info["model_dir"])
    weights = tmp_path_factory.mktemp("weights") / "weights.pt"
    weights.write_bytes(b"not loaded: the panel reads manifests only")
    names = []
    for n, (top1, parent) in enumerate(((0.71, None), (0.83, None)), start=1):
        stars = 0.9 if n == 1 else 0.4  # v2 is better overall and fails the stars test
        tests = [{"name": "stars are stars", "kind": "confidence", "required": True, "passed": stars >= 0.8,
                  "value": stars, "bar": "accuracy >= 0.8", "samples": 5, "failing": [] if n == 1 else [1003, 1007],
                  "failing_count": 0 if n == 1 else 2, "note": ""},
                 {"name": "mirror", "kind": "invariance", "required": False, "passed": True, "value": 0.05,
                  "bar": "changed by flip_lr <= 0.1", "samples": 12, "failing": [1001], "failing_count": 1,
                  "note": ""}]
        manifest = {"parent": names[-1] if names else parent, "task": "classify", "task_type": "classification",
                    "classes": list(CLASSES), "counts": {"train": 40 + 10 * n, "val": 12},
                    "metrics": {"top1": top1, "primary": top1}, "model_tests": {"results": tests}}
        names.append(registry.add_version(PROJECT, weights, manifest).version)
    registry.promote(PROJECT, names[-1], "set up by the test")
    return names


@pytest.fixture(scope="module")
def labelloop_dataset(fo, tmp_path_factory, simple_classifier):
    """A dataset as sync writes one for PROJECT: labels, the served version's predictions, the tuning split."""
    from labelloop.core.datasets import split_of
    from labelloop.dev.shapes import generate_shapes, label_config

    data = generate_shapes(tmp_path_factory.mktemp("panel-shapes"), n=16, seed=5, size=96, max_objects=1,
                           style="simple")
    dataset = fo.Dataset(f"labelloop-panel-{secrets.token_hex(4)}", persistent=True)
    dataset.info["labelloop"] = {"project": PROJECT, "label_config": label_config("classification"),
                                 "task_type": "classification", "label_studio_url": ""}
    dataset.save()
    samples = []
    for i, image in enumerate(data.images):
        guess = image.label if i % 4 else CLASSES[(CLASSES.index(image.label) + 1) % 4]  # a quarter wrong
        probs = {c: (0.85 if c == guess else 0.05) for c in CLASSES}
        samples.append(fo.Sample(filepath=str(data.images_dir / image.file), ls_task_id=1000 + i, ls_project=PROJECT,
                                 ground_truth=fo.Classification(label=image.label), class_probs=probs,
                                 predictions=fo.Classification(label=guess, confidence=0.85),
                                 prediction_version="p9001-v2", ls_score=0.85, tuning_split=split_of(1000 + i)))
    dataset.add_samples(samples)
    # where a real classifier looked (one the engine trained on these shapes), as the explain operator writes it
    from labelloop.core.predict import load_model
    from labelloop.core.saliency import saliency_maps

    manifest = simple_classifier[0]
    model = load_model(manifest.weights, manifest.version)
    maps = saliency_maps(model, [data.images_dir / image.file for image in data.images])
    dataset.set_values("saliency", {sample.id: fo.Heatmap(map=(m * 255).astype("uint8"), range=[0, 255])
                                    for sample, m in zip(dataset.iter_samples(), maps)}, key_field="id")
    from fiftyone.core.odm.dataset import ActiveFields

    dataset.app_config.active_fields = ActiveFields(paths=["saliency"])  # the grid draws the heatmaps
    dataset.save()
    grid = fo.Panel(type="Samples", pinned=True)
    dataset.save_workspace("heatmaps", fo.Space(children=[grid], active_child=grid.component_id), overwrite=True)
    panel = fo.Panel(type="labelloop_versions", state={})
    dataset.save_workspace("labelloop", fo.Space(children=[panel], active_child=panel.component_id), overwrite=True)
    yield dataset
    dataset.delete()


@pytest.fixture(scope="module")
def job(redis_server):
    from labelloop.tasks.jobstore import JobStore

    store = JobStore()
    record = store.create("train", str(PROJECT), message="queued by the test")
    store.update(record["id"], state="running", progress=0.4, message="training p9001-v3: epoch 8 of 20")
    return record


@pytest.fixture(scope="module")
def app(labelloop_dataset, versions, job, backend, tmp_path_factory):
    from labelloop.dev.localstack import start_fiftyone_app

    env = {**os.environ, "MODEL_DIR": str(backend.info["model_dir"]), "LABELLOOP_BACKEND_URL": backend.url,
           "LABELLOOP_APP_MEDIA_ROOTS": str(Path(labelloop_dataset.first().filepath).parent)}
    process = start_fiftyone_app(env, dataset=labelloop_dataset.name, log_dir=tmp_path_factory.mktemp("plugin-app"))
    yield process
    process.stop()


@pytest.fixture
def browser(tmp_path):
    from cdp import CHROMIUM, Browser

    assert Path(CHROMIUM).exists(), "chromium is not installed: run `make setup` (scripts/setup.sh installs Debian's)"
    chromium = Browser(tmp_path / "chromium-profile")
    yield chromium
    chromium.close()


def test_panel_shows_versions_metrics_jobs_and_rolls_back(app, browser, labelloop_dataset, versions, backend):
    from labelloop.core.registry import Registry

    older, newer = versions
    browser.open(f"{app.url}/datasets/{labelloop_dataset.name}?workspace=labelloop")
    text = browser.wait_for_text(newer, f"Roll back to {older}", "epoch 8 of 20")
    browser.click_text("Dismiss")  # FiftyOne's "Explore Enterprise" card, over the panel
    assert "0.83" in text and "0.71" in text, "the versions' tuning-split metrics are missing"
    assert "in service" in text
    shot = browser.screenshot(ARTIFACTS / "fiftyone-panel.png")
    print(f"\npanel: {shot}")
    # the model tests side by side: the newest version fails the required stars test the older one passed
    tests = browser.wait_for_text("Model tests on the tuning split", "stars are stars", "FAIL 0.40", "ok 0.90")
    assert "1/2 passed, failed: stars are stars" in tests and "(advisory)" in tests
    print(f"model tests in the panel: {browser.screenshot(ARTIFACTS / 'fiftyone-model-tests.png')}")

    assert browser.click_text(f"Roll back to {older}")
    browser.wait_for_text(f"{older} is now in service")
    assert Registry(backend.info["model_dir"]).serving_info(PROJECT)["version"] == older
    print(f"panel after the rollback: {browser.screenshot(ARTIFACTS / 'fiftyone-panel-rolled-back.png')}")
    # the backend's promotion queued the predictions of the version now in service (a job in /jobs)
    jobs = httpx.get(f"{backend.url}/jobs", params={"project": PROJECT}, timeout=10).json()["jobs"]
    assert any(j["kind"] == "predict" and j.get("version") == older for j in jobs), jobs


def test_an_operator_run_in_the_app_shows_its_result(app, browser, labelloop_dataset):
    """The panel opens an operator's form; Execute runs it; the App shows what was written, with counts."""
    browser.open(f"{app.url}/datasets/{labelloop_dataset.name}?workspace=labelloop")
    browser.wait_for_text("Error analysis")
    browser.click_text("Dismiss")  # FiftyOne's "Explore Enterprise" card, over the panel
    assert browser.click_text("Error analysis")
    browser.wait_for_text("Tuning split (held out)")
    browser.screenshot(ARTIFACTS / "fiftyone-operator-form.png")
    browser.click_enabled("Execute")
    held_out = len(labelloop_dataset.match({"tuning_split": "val"}))
    text = browser.wait_for_text("Computed on", "held-out tuning split", timeout=120)
    shot = browser.screenshot(ARTIFACTS / "fiftyone-operator-result.png")
    print(f"\noperator result: {shot}")
    assert str(held_out) in text, f"the result does not show the {held_out} held-out samples:\n{text[-2000:]}"
    assert "labelloop-high-confidence-mistakes" in text
    assert f"{held_out} labeled sample(s) evaluated" in text, "the progress bar does not end with the count"


def _app_request(app, dataset, operator: str, params: dict) -> dict:
    return {"dataset_name": dataset.name, "operator_uri": f"{PLUGIN}/{operator}", "view": [],
            "params": {"view_target": "DATASET", **params}}


def test_the_app_server_streams_progress_then_the_result_laid_out(app, labelloop_dataset):
    body = _app_request(app, labelloop_dataset, "compute_mislabel_scores", {"mode": "in_sample"})
    with httpx.stream("POST", f"{app.url}/operators/execute/generator", json=body, timeout=120) as response:
        assert response.status_code == 200
        lines = [json.loads(line) for line in response.iter_lines() if line.strip()]
    progress = [m["body"]["params"] for m in lines
                if m["cls"] == "InvocationRequest" and m["body"]["operator_uri"] == "set_progress"]
    assert len(progress) >= 2 and progress[-1]["progress"] == 1.0, lines
    assert any("suspected mislabel" in p.get("label", "") for p in progress), progress
    result = next(m["body"] for m in lines if m["cls"] == "ExecutionResult")
    assert result["scored"] == len(labelloop_dataset) and result["suspected"] == len(labelloop_dataset) // 4
    assert result["saved_view"] == "labelloop-suspected-mislabels"

    # the App then asks for the result's layout (resolve_output) with the result in the request
    layout = httpx.post(f"{app.url}/operators/resolve-type",
                        json={**body, "target": "outputs", "results": result}, timeout=60).json()
    shown = layout["type"]["properties"]
    assert {"scored", "suspected", "field", "saved_view"} <= set(shown), shown


def test_the_app_server_reports_an_operators_error(app, labelloop_dataset):
    # no Label Studio answers for this project: the run ends with a message saying what to do
    body = _app_request(app, labelloop_dataset, "send_to_label_studio", {"title": "nowhere"})
    with httpx.stream("POST", f"{app.url}/operators/execute/generator", json=body, timeout=120) as response:
        lines = [json.loads(line) for line in response.iter_lines() if line.strip()]
    errors = [m["error"] for m in lines if m.get("error")]
    assert errors and "Label Studio" in errors[0], lines


def test_the_grid_shows_where_the_model_looked(app, browser, labelloop_dataset):
    """The samples' saliency heatmaps (EigenCAM of a classifier the engine trained on these shapes) drawn over
    them in the App's grid (FiftyOne draws a heatmap in its field's colour, blue here) and in a sample's modal."""
    import time

    import numpy as np
    from PIL import Image

    browser.open(f"{app.url}/datasets/{labelloop_dataset.name}?workspace=heatmaps")
    browser.wait_for_text("saliency")
    browser.click_text("Dismiss")  # FiftyOne's "Explore Enterprise" card
    time.sleep(3)  # tiles and their overlays load after the page's text
    shot = browser.screenshot(ARTIFACTS / "fiftyone-heatmaps.png")
    print(f"\nheatmaps in the grid: {shot}")
    grid = np.asarray(Image.open(shot).convert("RGB").crop((310, 145, 1390, 700)), dtype=np.int16)
    glow = float(((grid[..., 2] - np.maximum(grid[..., 0], grid[..., 1])) > 60).mean())
    assert glow > 0.02, f"no heatmap drawn over the tiles ({glow:.1%} strongly blue pixels): {shot}"
    sample = labelloop_dataset.first()
    browser.open(f"{app.url}/datasets/{labelloop_dataset.name}?workspace=heatmaps&id={sample.id}")  # its modal
    browser.wait_for_text("saliency")
    time.sleep(3)
    print(f"a heatmap in the modal: {browser.screenshot(ARTIFACTS / 'fiftyone-heatmap-modal.png')}")
