"""The README's main command, `labelloop demo --quick`, end to end on its own local stack."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest

from labelloop.dev.localstack import free_port

pytestmark = pytest.mark.e2e


@pytest.mark.slow
def test_demo_quick_runs_the_whole_loop_and_writes_the_report(tmp_path, run_home):
    home = tmp_path / "home"
    env = {**os.environ, "LABELLOOP_HOME": str(home), "LABELLOOP_LS_PORT": str(free_port()),
           "LABELLOOP_BACKEND_PORT": str(free_port()), "LABELLOOP_REDIS_PORT": str(free_port()),
           "LABELLOOP_MONGO_PORT": str(free_port()), "LABELLOOP_APP_PORT": str(free_port()),
           "LABELLOOP_FLOWER_PORT": str(free_port()),
           # the warm start runs (connect → Celery → pretraining → first training starts from it), with a
           # fifth of its steps so the suite fits CI's 30 minutes; its full effect is bench/active_learning.py's
           "LABELLOOP_WARM_START_STEPS": "60"}
    for inherited in ("REDIS_URL", "FIFTYONE_DATABASE_URI", "MODEL_DIR", "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY"):
        env.pop(inherited, None)  # the demo's stack provides its own
    try:
        run = subprocess.run([sys.executable, "-m", "labelloop.cli", "demo", "--quick", "--no-app"], env=env,
                             capture_output=True, text=True, timeout=1500)
        assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
        report = home / "demo" / "report"
        summary = json.loads((report / "summary.json").read_text())
        assert "Learning curve" in (report / "report.md").read_text()
        for name in ("learning_curve.png", "mislabels_found.png", "confusion_matrix.png"):
            assert (report / name).stat().st_size > 5000
        assert len(summary["versions"]) >= 2, "several versions promoted by the loop"
        assert summary["uncertainty_curve"][-1] > summary["uncertainty_curve"][0]
        # the bar for 160 labels with 10 % of them wrong, on images no labeler saw
        assert summary["held_out_accuracy"] >= 0.85, summary["uncertainty_curve"]
        assert summary["per_class_computed_on"] == "held-out test images"
        assert summary["warm_start"]["images"] == 240 and summary["warm_start"]["steps"] == 60, summary["warm_start"]
        assert "held-out test images" in (report / "report.md").read_text()
        # the "mislabel suspects" tab the prediction job keeps: three times as rich in the labeler's injected
        # mistakes as a random pick of labeled tasks (which holds them at the noise rate, ~0.12). It held 16 of 29
        # (0.55) on the morning of 2026-12-07 and 17 of 41 (0.41) that afternoon on a freshly installed
        # environment, the same with pillow 12 or 13 and opencv 4 or 5 (cause not found yet: README, Measured
        # figures); the bar is the baseline's, with margin
        tab = summary["suspects_tab"]
        base_rate = tab["injected_labeled"] / tab["labeled"]
        assert tab["tasks"] and tab["injected_found"] / tab["tasks"] >= 3 * base_rate, tab
        assert tab["injected_found"] >= 0.5 * tab["injected_labeled"], tab
        project = summary["project"]
        newest = httpx.get(f"{summary['backend']}/versions", params={"project": project}).json()["serving"][str(project)]
        state = json.loads((home / "stack" / "state.json").read_text())
        token = state["label_studio"]["token"]
        predictions = httpx.get(f"{summary['label_studio']}/api/predictions", params={"project": project},
                                headers={"Authorization": f"Token {token}"}).json()
        assert any(p["model_version"] == newest for p in predictions)
        # Flower of the stack sees both workers over the stack's own Redis (real Celery, real Flower)
        workers = httpx.get(f"{state['services']['flower']['url']}/api/workers", params={"refresh": 1},
                            timeout=30).json()
        assert {"stack-train", "stack-predict"} <= {name.split("@")[0] for name in workers}, workers
        assert "Label Studio" in run.stdout and "stack down" in run.stdout
    finally:
        subprocess.run([sys.executable, "-m", "labelloop.cli", "stack", "down"], env=env, timeout=120)
    status = subprocess.run([sys.executable, "-m", "labelloop.cli", "stack", "status"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert "running" not in status.stdout.replace("stopped", "")
