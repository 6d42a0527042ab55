"""Benchmark: a labeler's first "Retrieve Predictions" — cold and warm /predict through a real Label Studio.

One run, same machine: a real Label Studio 1.23.2 holding N uploaded images (160 px shapes), a real
``labelloop serve`` with a foreign detector (LABELLOOP_BASE_MODEL, trained here from a yaml), connected
the way Label Studio connects (``/setup`` loads and warms the model). For each of ``--repeats`` cold runs
the backend is restarted and its image cache emptied, then:

* cold /predict — the first request after /setup: every image fetched from Label Studio;
* warm /predict — the same request again (images from the cache, model in memory);
* Retrieve Predictions — Label Studio's own Data Manager action on all tasks, end to end;
* raw — ultralytics ``YOLO.predict`` on the same local files, batch 16, warmed, in this process.

The /predict phases come from its ``Server-Timing`` header. Usage:
``.venv/bin/python bench/cold_predict.py`` (``--tasks N``, ``--repeats N``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx


def server_timing(header: str) -> dict[str, float]:
    """{phase: seconds} from a Server-Timing header."""
    out = {}
    for part in header.split(","):
        name, _, dur = part.strip().partition(";dur=")
        if name and dur:
            out[name] = float(dur) / 1000
    return out


def wait_until_loaded(client: httpx.Client, version: str, timeout: float = 120) -> None:
    """Until /health lists ``version`` as loaded (``/setup`` loads and warms it in the background)."""
    deadline = time.monotonic() + timeout
    while version not in client.get("/health").json().get("loaded", []):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{version} not loaded after {timeout:.0f} s")
        time.sleep(0.1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="labelloop-bench-cold-"))
    os.environ.setdefault("LABELLOOP_HOME", str(work / "home"))
    os.environ.setdefault("YOLO_CONFIG_DIR", str(Path.home() / ".cache" / "labelloop" / "ultralytics"))
    from labelloop.config import settings
    from labelloop.core.labelconfig import parse_label_config
    from labelloop.core.registry import Registry
    from labelloop.core.yolo_env import import_yolo
    from labelloop.dev.labeler import LabelerClient
    from labelloop.dev.localstack import start_backend, start_label_studio
    from labelloop.dev.shapes import generate_shapes, label_config, to_label_studio_tasks
    from labelloop.labelstudio.media import LocalFileFetcher
    from labelloop.workflows.pipeline import train_new_version

    config = label_config("detection")
    spec = parse_label_config(config)
    print("training a small foreign detector (quality is not the point) ...", flush=True)
    train_data = generate_shapes(work / "train", n=60, seed=5, size=160)
    registry = Registry(work / "models")
    env = dataclasses.replace(settings(), epochs=10, warm_start_steps=0)
    outcome = train_new_version(registry, 1, to_label_studio_tasks(train_data, "detection"), spec, LocalFileFetcher(),
                                env=env)
    weights = work / "detector.pt"
    shutil.copyfile(outcome.manifest.weights, weights)
    images = generate_shapes(work / "images", n=args.tasks, seed=77, size=160)
    paths = [images.images_dir / im.file for im in images.images]

    print("starting Label Studio ...", flush=True)
    ls = start_label_studio(work / "ls")
    results: dict[str, list[float]] = {"cold": [], "warm": [], "retrieve": []}
    phases: dict[str, list[dict[str, float]]] = {"cold": [], "warm": []}
    try:
        with LabelerClient(ls.url, ls.info["token"]) as api:
            project = api.create_project("cold predict bench", config)["id"]
            for start in range(0, len(paths), 20):
                api.upload_images(project, paths[start : start + 20])
            tasks = api.tasks(project)
            request = {"tasks": tasks, "project": f"{project}.1", "label_config": config}
            for run in range(args.repeats + 1):  # run 0: Label Studio's own Retrieve Predictions, cold
                home = work / f"backend-{run}"  # a fresh backend: empty image cache, no model in memory
                backend = start_backend(home, env={"LABELLOOP_BASE_MODEL": str(weights), "LABEL_STUDIO_URL": ls.url,
                                                   "LABEL_STUDIO_API_KEY": ls.info["token"],
                                                   "LABELLOOP_WARM_START_STEPS": "0"})
                try:
                    with httpx.Client(base_url=backend.url, timeout=600) as client:
                        if run == 0:
                            api.connect_backend(project, backend.url)  # Label Studio calls /setup itself
                            wait_until_loaded(client, f"base-{weights.stem}")
                            t0 = time.perf_counter()
                            api.retrieve_predictions(project)
                            results["retrieve"].append(time.perf_counter() - t0)
                            continue
                        version = client.post("/setup", json={"project": f"{project}.1", "schema": config}).json()
                        wait_until_loaded(client, version["model_version"])  # the labeler clicks later than that
                        for kind in ("cold", "warm"):
                            t0 = time.perf_counter()
                            response = client.post("/predict", json=request)
                            results[kind].append(time.perf_counter() - t0)
                            body = response.json()
                            assert response.status_code == 200 and len(body["results"]) == len(tasks), response.text[:300]
                            assert all("error" not in r for r in body["results"]), body["results"][:2]
                            phases[kind].append(server_timing(response.headers.get("server-timing", "")))
                finally:
                    backend.stop()
    finally:
        ls.stop()

    YOLO = import_yolo()
    raw_model = YOLO(str(weights))
    raw_model.predict([str(p) for p in paths[:2]], verbose=False)
    raw = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        raw_model.predict([str(p) for p in paths], batch=16, conf=0.05, verbose=False)
        raw.append(time.perf_counter() - t0)

    med = statistics.median
    n = args.tasks
    print(f"\n{n} uploaded 160 px images in Label Studio, a yolov8n detector, {os.cpu_count()} CPU cores; "
          f"median of {args.repeats} (cold: a fresh backend and an empty image cache each time)")
    for kind in ("cold", "warm"):
        split = {k: med([p.get(k, 0.0) for p in phases[kind]]) for k in ("model", "fetch", "infer", "serialize")}
        print(f"  /predict {kind:<4}: {med(results[kind]):6.3f} s  (min {min(results[kind]):.3f}, max "
              f"{max(results[kind]):.3f})  phases: " + ", ".join(f"{k} {v:.3f}" for k, v in split.items()))
    print(f"  Retrieve Predictions, cold (Label Studio end to end, after /setup): {results['retrieve'][0]:6.3f} s")
    print(f"  raw ultralytics predict, batch 16, local files: {med(raw):6.3f} s")
    print(f"  warm / raw: {med(results['warm']) / med(raw):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
