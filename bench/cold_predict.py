"""Benchmark: a labeler's first "Retrieve Predictions" — cold and warm /predict through a real Label Studio.

One run, same machine: a real Label Studio 1.23.2 holding N uploaded images (160 px shapes), a real
``labelloop serve`` with a foreign detector (LABELLOOP_BASE_MODEL, trained here from a yaml), connected
the way Label Studio connects (``/setup`` loads and warms the model). Two ways of reading the images:

* ``http`` — fetched from Label Studio's ``/data/upload/...`` (the default);
* ``shared`` — ``LABELLOOP_LS_MEDIA_DIR`` set to Label Studio's media folder (``<data dir>/media``):
  uploads read in place (same caps and decode check), as a backend sharing Label Studio's volume does.

For each of ``--repeats`` rounds, each way (interleaved, so a busy spell hits both alike): a fresh
backend (empty image cache, no model in memory), ``/setup``, wait until the model is loaded, then

* cold /predict — the first request: every image fetched (or read);
* warm /predict — the same request again (images from the cache, or read again in place);

plus, once per way, Label Studio's own Retrieve Predictions (Data Manager action on all tasks, end to
end, a project of its own per way), and raw — ultralytics ``YOLO.predict`` on the same local files,
batch 16, warmed, in this process, run right after each round's warm /predict (same spell of machine
load; the backend is idle then), so warm / raw is a median of per-round ratios. The /predict phases
come from its ``Server-Timing`` header (since fetching and inference overlap, ``fetch`` is the wait
for images that inference did not hide).

Prints a markdown table (medians) and appends it, dated, to ``bench/figures/cold_predict.md``
(``--no-write`` to skip). Usage: ``.venv/bin/python bench/cold_predict.py`` (``--tasks N``, ``--repeats N``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

FIGURES = Path(__file__).resolve().parent / "figures" / "cold_predict.md"
WAYS = ("http", "shared")
PHASES = ("model", "fetch", "infer", "serialize")
BUSY_LOAD = 1.5  # 1-minute load average above which the machine is called busy in the output


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


def load() -> float:
    return os.getloadavg()[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help=f"do not append to {FIGURES.name}")
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

    loads = [load()]
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
    raw_model = import_yolo()(str(weights))
    raw_model.predict([str(p) for p in paths[:2]], verbose=False)  # warmed, as the backend's model is

    def raw_once() -> float:
        t0 = time.perf_counter()
        raw_model.predict([str(p) for p in paths], batch=16, conf=0.05, verbose=False)
        return time.perf_counter() - t0

    print("starting Label Studio ...", flush=True)
    ls_dir = work / "ls"
    ls = start_label_studio(ls_dir)
    media_dir = ls_dir / "media"  # Label Studio's MEDIA_ROOT: $LABEL_STUDIO_BASE_DATA_DIR/media
    results: dict[str, dict[str, list[float]]] = {way: {"cold": [], "warm": []} for way in WAYS}
    phases: dict[str, dict[str, list[dict[str, float]]]] = {way: {"cold": [], "warm": []} for way in WAYS}
    retrieve: dict[str, float] = {}
    raw: list[float] = []
    runs = 0

    def backend_env(way: str) -> dict[str, str]:
        out = {"LABELLOOP_BASE_MODEL": str(weights), "LABEL_STUDIO_URL": ls.url,
               "LABEL_STUDIO_API_KEY": ls.info["token"], "LABELLOOP_WARM_START_STEPS": "0",
               "LABELLOOP_LS_MEDIA_DIR": str(media_dir) if way == "shared" else ""}
        return out

    try:
        with LabelerClient(ls.url, ls.info["token"]) as api:
            projects, tasks = {}, {}
            for way in WAYS:  # a project per way: Retrieve Predictions skips tasks already predicted
                projects[way] = api.create_project(f"cold predict bench ({way})", config)["id"]
                for start in range(0, len(paths), 20):
                    api.upload_images(projects[way], paths[start : start + 20])
                tasks[way] = api.tasks(projects[way])
                assert all(t["data"]["image"].startswith("/data/upload/") for t in tasks[way])
            assert (media_dir / "upload" / str(projects["http"])).is_dir(), f"no uploads under {media_dir}"
            rounds = [(run, way) for run in range(args.repeats + 1) for way in WAYS]
            for run, way in rounds:  # run 0: Label Studio's own Retrieve Predictions, cold
                runs += 1
                home = work / f"backend-{way}-{run}"  # a fresh backend: empty image cache, no model in memory
                backend = start_backend(home, env=backend_env(way))
                project = projects[way]
                try:
                    with httpx.Client(base_url=backend.url, timeout=600) as client:
                        loads.append(load())
                        if run == 0:
                            api.connect_backend(project, backend.url)  # Label Studio calls /setup itself
                            wait_until_loaded(client, f"base-{weights.stem}")
                            t0 = time.perf_counter()
                            api.retrieve_predictions(project)
                            retrieve[way] = time.perf_counter() - t0
                            continue
                        request = {"tasks": tasks[way], "project": f"{project}.1", "label_config": config}
                        version = client.post("/setup", json={"project": f"{project}.1", "schema": config}).json()
                        wait_until_loaded(client, version["model_version"])  # the labeler clicks later than that
                        for kind in ("cold", "warm"):
                            t0 = time.perf_counter()
                            response = client.post("/predict", json=request)
                            results[way][kind].append(time.perf_counter() - t0)
                            body = response.json()
                            assert response.status_code == 200 and len(body["results"]) == len(tasks[way]), \
                                response.text[:300]
                            assert all("error" not in r for r in body["results"]), body["results"][:2]
                            phases[way][kind].append(server_timing(response.headers.get("server-timing", "")))
                        raw.append(raw_once())
                        if way == "shared":  # the images must have come from the media folder, not the cache
                            cached = list((home / "cache" / "media").rglob("*.*"))
                            assert not cached, f"shared way fetched {len(cached)} image(s) over HTTP"
                finally:
                    backend.stop()
    finally:
        ls.stop()

    loads.append(load())
    shutil.rmtree(work, ignore_errors=True)

    text = report(args, results, phases, retrieve, raw, loads)
    print("\n" + text)
    if not args.no_write:
        FIGURES.parent.mkdir(parents=True, exist_ok=True)
        with FIGURES.open("a") as out:
            out.write(("\n" if FIGURES.exists() and FIGURES.stat().st_size else "# bench/cold_predict.py\n\n") + text)
        print(f"appended to {FIGURES}")
    return 0


def report(args, results, phases, retrieve, raw, loads) -> str:
    med = statistics.median
    raw_s = med(raw)
    busy = max(loads) > BUSY_LOAD
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = [f"## {when}: {args.tasks} uploaded 160 px images, yolov8n detector, {os.cpu_count()} CPU cores, "
             f"median of {args.repeats}",
             "",
             f"Load average (1 min) during the run: {min(loads):.2f}–{max(loads):.2f}"
             + (f" — **busy machine** (above {BUSY_LOAD}): figures are pessimistic" if busy else " (quiet)") + ".",
             "",
             "| | seconds (min–max) | model | fetch | infer | serialize |",
             "|---|---|---|---|---|---|"]
    for way in WAYS:
        for kind in ("cold", "warm"):
            times = results[way][kind]
            split = {k: med([p.get(k, 0.0) for p in phases[way][kind]]) for k in PHASES}
            label = {"http": "HTTP from Label Studio", "shared": "shared media folder"}[way]
            lines.append(f"| `/predict` {kind}, {label} | **{med(times):.3f}** ({min(times):.3f}–{max(times):.3f}) | "
                         + " | ".join(f"{split[k]:.3f}" for k in PHASES) + " |")
    lines.append(f"| raw ultralytics predict, batch 16, local files | {raw_s:.3f} ({min(raw):.3f}–{max(raw):.3f}) "
                 "| – | – | – | – |")
    for way in WAYS:
        if way in retrieve:
            lines.append(f"| Retrieve Predictions, cold, Label Studio end to end ({way}) | {retrieve[way]:.3f} "
                         "| – | – | – | – |")
    lines.append("")
    for k, way in enumerate(WAYS):
        warms, fetches = results[way]["warm"], [p.get("fetch", 0.0) for p in phases[way]["warm"]]
        raws = raw[k :: len(WAYS)]  # the raw run right after each of this way's warm requests
        ratio = med([w / r for w, r in zip(warms, raws)])
        ratio_fetch = med([w / (r + f) for w, r, f in zip(warms, raws, fetches)])
        cold = med(results[way]["cold"])
        lines.append(f"* {way}: cold {cold:.3f} s ({'meets' if cold <= 0.6 else 'misses'} the 0.6 s bar); warm / raw "
                     f"{ratio:.2f}×, warm / (raw + its fetch wait {med(fetches):.3f} s) {ratio_fetch:.2f}× "
                     f"(bar ≤ 1.1×; medians of per-round ratios)")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
