"""Benchmark the loop on a real stack (Redis, Label Studio 1.23.2, `labelloop serve`, one worker).

Measures, in one run:

* **annotation → fresh predictions**: seconds from the labeler's last annotation until every
  unlabeled task of a ~200-task project holds a prediction of the new version in Label Studio
  (webhooks → coalesced training → promotion → prediction job → bulk import);
* **/predict latency, idle vs during a training**: p50/p95 of 8-task requests;
* **webhook answer time under a burst**: 200 events, 8 at a time (Label Studio waits at most 1 s).

Usage: ``.venv/bin/python bench/loop_latency.py [--tasks 200] [--labeled 24] [--epochs 5]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--labeled", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=5, help="training epochs (LABELLOOP_EPOCHS) for the worker")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="labelloop-loop-bench-"))
    os.environ["LABELLOOP_HOME"] = str(work / "home")

    from labelloop.dev.labeler import LabelerClient
    from labelloop.dev.localstack import start_backend, start_label_studio, start_redis, start_worker
    from labelloop.dev.shapes import generate_shapes, label_config, to_label_studio_result

    started = []
    try:
        redis = start_redis(work / "redis")
        started.append(redis)
        os.environ["REDIS_URL"] = redis.url
        print("starting Label Studio (~40 s on a fresh data dir) ...", flush=True)
        ls = start_label_studio(work / "ls")
        started.append(ls)
        env = {"LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.info["token"], "REDIS_URL": redis.url}
        backend = start_backend(work / "home", env=env)
        started.append(backend)
        worker = start_worker(work / "home", env={**env, "LABELLOOP_EPOCHS": str(args.epochs)})
        started.append(worker)
        api = LabelerClient(ls.url, ls.info["token"])

        images = generate_shapes(work / "images", n=args.tasks, seed=3, max_objects=1)
        config = label_config("classification")
        project = api.create_project("loop benchmark", config)["id"]
        paths = [images.images_dir / im.file for im in images.images]
        tasks = []
        for start in range(0, len(paths), 50):
            api.upload_images(project, paths[start : start + 50])
        tasks = api.tasks(project)
        api.connect_backend(project, backend.url)
        truth = {t["id"]: next(im for im in images.images if t["data"]["image"].endswith(im.file)) for t in tasks}

        client = httpx.Client(base_url=backend.url, timeout=120)

        def predict_latencies(n: int = 30) -> list[float]:
            out = []
            for k in range(n):
                chunk = tasks[(8 * k) % len(tasks):][:8]
                t0 = time.perf_counter()
                response = client.post("/predict", json={"tasks": chunk, "project": f"{project}.1",
                                                         "label_config": config})
                out.append(time.perf_counter() - t0)
                assert response.status_code == 200
            return out

        def unlabeled_predicted(version: str) -> int:
            return len([p for p in api.predictions(project) if p["model_version"] == version])

        print(f"annotating {args.labeled} of {len(tasks)} tasks through the API ...", flush=True)
        for task in tasks[: args.labeled]:
            api.annotate(task["id"], to_label_studio_result(truth[task["id"]], "classification"))
        last_annotation = time.perf_counter()
        unlabeled = len(tasks) - args.labeled
        version = None
        while time.perf_counter() - last_annotation < 900:
            serving = client.get("/versions", params={"project": project}).json()["serving"].get(str(project))
            if serving and unlabeled_predicted(serving) >= unlabeled:
                version = serving
                break
            time.sleep(1)
        loop_seconds = time.perf_counter() - last_annotation
        assert version, "no version with predictions within 15 minutes"

        idle = predict_latencies()
        client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": project}})
        api.annotate(tasks[args.labeled]["id"], to_label_studio_result(truth[tasks[args.labeled]["id"]],
                                                                        "classification"))
        deadline = time.time() + 120
        while time.time() < deadline and not any(
                j["state"] == "running" and j["kind"] == "train"
                for j in client.get("/jobs", params={"project": project}).json()["jobs"]):
            time.sleep(0.2)
        during = predict_latencies()

        body = {"action": "ANNOTATION_UPDATED", "project": {"id": project}, "annotation": {"id": 1}}

        def hook(_):
            t0 = time.perf_counter()
            assert httpx.post(f"{backend.url}/webhook", json=body, timeout=5).status_code == 200
            return time.perf_counter() - t0

        with ThreadPoolExecutor(8) as pool:
            hooks = list(pool.map(hook, range(200)))
    finally:
        for process in reversed(started):
            process.stop()

    ms = lambda s: f"{1000 * s:7.1f} ms"
    print(f"\nclassification project, {len(tasks)} tasks, {args.labeled} labeled, {args.epochs} epochs, one worker")
    print(f"  last annotation → predictions of {version} on all {unlabeled} unlabeled tasks: {loop_seconds:6.1f} s")
    print(f"  /predict (8 tasks) idle          p50 {ms(statistics.median(idle))}  p95 {ms(percentile(idle, .95))}")
    print(f"  /predict (8 tasks) while training p50 {ms(statistics.median(during))}  p95 {ms(percentile(during, .95))}")
    print(f"  webhook answer, 200-event burst  p50 {ms(statistics.median(hooks))}  p95 {ms(percentile(hooks, .95))}"
          f"  max {ms(max(hooks))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
