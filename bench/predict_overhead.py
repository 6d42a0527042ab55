"""Benchmark: what our /predict costs on top of the raw model, and batched vs per-task calls.

One run, same machine, same images, same weights:

* raw      — ultralytics ``YOLO.predict`` on 64 local image files, batch 16, in this process;
* /predict — one HTTP request with 64 tasks to a real ``labelloop serve`` process whose images come
  from an HTTP image host (cold: images fetched and cached; warm: cache hits);
* per-task — 64 requests with one task each, what the upstream YOLO example effectively does.

Prints medians over repeats and the ratios. Usage: ``.venv/bin/python bench/predict_overhead.py``
(``--repeats N``, ``--tasks N``, ``--weights file.pt`` to use your own detection model).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx


def serve_directory(directory: Path) -> tuple[str, http.server.ThreadingHTTPServer]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"127.0.0.1:{server.server_address[1]}", server


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--weights", default=None, help="a detection .pt (default: train a small one here)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="labelloop-bench-"))
    os.environ.setdefault("LABELLOOP_HOME", str(work / "home"))
    from labelloop.core.labelconfig import parse_label_config
    from labelloop.core.registry import Registry
    from labelloop.core.yolo_env import import_yolo
    from labelloop.dev.localstack import start_backend
    from labelloop.dev.shapes import generate_shapes, label_config, to_label_studio_tasks
    from labelloop.labelstudio.media import LocalFileFetcher
    from labelloop.workflows.pipeline import train_new_version

    config = label_config("detection")
    spec = parse_label_config(config)
    registry = Registry(work / "models")
    if args.weights:
        weights = Path(args.weights)
        registry.promote(1, registry.add_version(1, weights, {
            "parent": None, "task": "detect", "task_type": "detection", "classes": []}).version)
    else:
        print("training a small detection model for the benchmark (quality is not the point) ...", flush=True)
        train_data = generate_shapes(work / "train", n=60, seed=5)
        os.environ["LABELLOOP_EPOCHS"] = "15"
        train_new_version(registry, 1, to_label_studio_tasks(train_data, "detection"), spec, LocalFileFetcher())
        os.environ.pop("LABELLOOP_EPOCHS")
    serving = registry.serving(1)
    images = generate_shapes(work / "images", n=args.tasks, seed=77)
    paths = [str(images.images_dir / im.file) for im in images.images]

    host, image_server = serve_directory(images.images_dir)
    backend = start_backend(work / "home", env={"MODEL_DIR": str(work / "models"), "LABELLOOP_ALLOWED_HOSTS": host})
    try:
        YOLO = import_yolo()
        raw_model = YOLO(str(serving.weights))
        raw_model.predict(paths[:2], verbose=False)  # warm-up, as the service is warm after its first call
        raw = timed(lambda: raw_model.predict(paths, batch=16, conf=0.05, verbose=False), args.repeats)
        raw_loop = timed(lambda: [raw_model.predict(p, conf=0.05, verbose=False) for p in paths], args.repeats)

        tasks = [{"id": i + 1, "data": {"image": f"http://{host}/{im.file}"}} for i, im in enumerate(images.images)]
        client = httpx.Client(base_url=backend.url, timeout=600)

        def predict_all():
            response = client.post("/predict", json={"tasks": tasks, "project": "1.1", "label_config": config})
            results = response.json()["results"]
            assert response.status_code == 200 and len(results) == len(tasks), response.text[:300]
            assert all("error" not in r for r in results), results[:2]

        cold = timed(predict_all, 1)  # fetches every image, loads the model
        warm = timed(predict_all, args.repeats)

        def per_task():
            for task in tasks:
                response = client.post("/predict", json={"tasks": [task], "project": "1.1", "label_config": config})
                assert response.status_code == 200 and len(response.json()["results"]) == 1

        loop = timed(per_task, max(1, args.repeats // 2))
    finally:
        backend.stop()
        image_server.shutdown()

    med = statistics.median
    n = args.tasks
    print(f"\n{n} tasks, detection, {serving.version} at its training image size, CPU threads: "
          f"{os.environ.get('OMP_NUM_THREADS', 'default')}, device: {'cuda' if _cuda() else 'cpu'}")
    print(f"  raw ultralytics predict (batch 16, local files) : {med(raw):7.3f} s  ({1000 * med(raw) / n:6.1f} ms/task)")
    print(f"  raw ultralytics predict, one image per call     : {med(raw_loop):7.3f} s  "
          f"({1000 * med(raw_loop) / n:6.1f} ms/task)")
    print(f"  our /predict, 1 request, cold (fetch + cache)    : {cold[0]:7.3f} s  ({1000 * cold[0] / n:6.1f} ms/task)")
    print(f"  our /predict, 1 request, warm                    : {med(warm):7.3f} s  ({1000 * med(warm) / n:6.1f} ms/task)")
    print(f"  per-task loop, {n} requests (upstream style)     : {med(loop):7.3f} s  ({1000 * med(loop) / n:6.1f} ms/task)")
    print(f"  overhead ratio  /predict warm / raw              : {med(warm) / med(raw):7.2f}x")
    print(f"  speed-up        batched / per-task loop          : {med(loop) / med(warm):7.2f}x")
    print(f"  raw batching gain  one-per-call / batch 16       : {med(raw_loop) / med(raw):7.2f}x")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
