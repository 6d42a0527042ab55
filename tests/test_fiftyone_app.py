"""The FiftyOne App with our plugin: the App server lists the plugin's operators, and a headless
Chromium renders the sample grid of a dataset built from generated images.

fiftyone is imported inside fixtures only (conftest's ``mongod`` sets its environment first).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.e2e

OPERATORS = (
    "sync_label_studio",
    "compute_mislabel_scores",
    "uncertainty_sampling",
    "compute_embeddings",
    "evaluate_model",
    "compare_versions",
    "send_to_label_studio",
    "explain_predictions",
    "model_checks",
    "edit_model_tests",
)
PLUGIN = "@labelloop/labelloop"
CHROMIUM = "/usr/bin/chromium"
WINDOW = (1400, 900)
# The first tiles of the grid's first row at this window size (left of where the App pops up its
# "Explore Enterprise" card): the generated images fill ~75% of it with saturated colors; an App
# whose grid is empty or still loading shows flat greys there (0%).
GRID_BOX = (310, 145, 950, 500)
MIN_COLORFUL_SHARE = 0.4


@pytest.fixture(scope="module")
def shapes_dataset(fo, tmp_path_factory):
    """12 generated images with their boxes as ``ground_truth`` Detections (relative [x, y, w, h])."""
    from labelloop.dev.shapes import generate_shapes

    data = generate_shapes(tmp_path_factory.mktemp("fo-shapes"), n=12, seed=3)
    # Persistent: the App is another process, and FiftyOne may delete non-persistent datasets it
    # believes orphaned. The database is the run's own.
    dataset = fo.Dataset(f"labelloop-app-{secrets.token_hex(4)}", persistent=True)
    samples = []
    for image in data.images:
        detections = [
            fo.Detection(label=obj.label, bounding_box=[obj.bbox[0] / image.width, obj.bbox[1] / image.height,
                                                        obj.bbox[2] / image.width, obj.bbox[3] / image.height])
            for obj in image.objects
        ]
        samples.append(fo.Sample(filepath=str(data.images_dir / image.file),
                                 ground_truth=fo.Detections(detections=detections)))
    dataset.add_samples(samples)
    yield dataset
    dataset.delete()


@pytest.fixture(scope="module")
def app(shapes_dataset, tmp_path_factory):
    from labelloop.dev.localstack import start_fiftyone_app

    # The generated images sit outside labelloop's media folders: the operator's extra root lets the
    # App serve them (labelloop.fo.app); the grid test then shows that such a root reaches the browser.
    images_dir = Path(shapes_dataset.first().filepath).parent
    process = start_fiftyone_app({**os.environ, "LABELLOOP_APP_MEDIA_ROOTS": str(images_dir)},
                                 dataset=shapes_dataset.name, log_dir=tmp_path_factory.mktemp("fiftyone-app"))
    yield process
    process.stop()


def test_app_server_lists_the_plugin_operators(app, shapes_dataset):
    # The body the App's frontend sends (fiftyone/operators/server.py: ListOperators).
    response = httpx.post(f"{app.url}/operators", json={"dataset_name": shapes_dataset.name}, timeout=30)
    assert response.status_code == 200, response.text[:500]
    body = response.json()
    uris = {op["uri"] for op in body["operators"]}
    ours = sorted(uri for uri in uris if uri.startswith(f"{PLUGIN}/"))
    missing = [name for name in OPERATORS if f"{PLUGIN}/{name}" not in uris]
    assert not missing, f"missing {missing}; ours: {ours}; loading errors: {body.get('errors')}"


def _screenshot(url: str, out: Path, profile: Path) -> None:
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}", "--virtual-time-budget=15000",
        f"--screenshot={out}", url,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0 and out.exists(), f"chromium failed ({result.returncode}):\n{result.stderr[-2000:]}"


def test_app_renders_the_sample_grid(app, shapes_dataset, tmp_path):
    assert Path(CHROMIUM).exists(), "chromium is not installed: run `make setup` (scripts/setup.sh installs Debian's)"
    import numpy as np
    from PIL import Image

    shot = tmp_path / "fiftyone-app-grid.png"
    started = time.monotonic()
    _screenshot(f"{app.url}/datasets/{shapes_dataset.name}", shot, tmp_path / "chromium-profile")
    print(f"\nscreenshot of the App ({time.monotonic() - started:.1f} s): {shot}")

    image = Image.open(shot).convert("RGB")
    assert image.size == WINDOW
    colors = image.getcolors(maxcolors=1 << 20)
    assert len(colors) > 50, f"the page looks blank ({len(colors)} colors): {shot}"
    pixels = np.asarray(image.crop(GRID_BOX), dtype=np.int16)
    share = float(((pixels.max(axis=2) - pixels.min(axis=2)) > 60).mean())  # strongly colored pixels
    assert share > MIN_COLORFUL_SHARE, f"the grid shows no images ({share:.0%} colorful pixels): {shot}"
