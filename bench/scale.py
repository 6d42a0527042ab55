"""Benchmark: how a project's cost grows with its size (issue 13) — the project read, the backlog prediction,
and the prediction job on 1 vs 2 Celery workers.

Per size (``--sizes``, default 1000,10000): that many generated 'simple' shapes (64 px) are uploaded to a real
Label Studio 1.23.2 as tasks (``--labeled`` of them then annotated through the API), and the engine trains a
classifier on the labeled ones (3 epochs: the model's quality does not matter here, its cost does). Images reach
the engine as in the Compose stack: Label Studio's media folder shared (``LABELLOOP_LS_MEDIA_DIR``);
``--over-http`` fetches them from Label Studio instead (~24 ms an image on 2 cores: Label Studio serving files
is then the bottleneck).
Then, each in a fresh process whose peak memory (RSS) is read at its end:

* **read, easy export** — the whole project in one request, as every job read it before (60 s timeout);
* **read, paged** — ``backlog.read_for_prediction``: pages of 500 tasks, the chunks made and dropped, what a
  prediction job keeps kept (its score book, the labeled tasks' truth);
* **backlog** — the paged read with every unlabeled task predicted and pushed in chunks of 100 in one process as
  the read makes them (``backlog.run_here``: images read from the shared media folder, the four-view scores the
  job pushes; the read's share is the rest of the time);
* **raw forward pass** — ultralytics on the same images from local files, batch 16, the same four views: the
  floor the backlog's per-task cost is compared with.

Then a Redis and real ``labelloop worker`` processes: the prediction job (``tasks.jobs.predict_project``, two
fresh versions with the same weights so each run predicts the whole backlog, each promoted before its run so the
job does what it does after a training: the backlog, then the human labels scored for the suspects tab, both in
chunks) with one prediction worker, then with two (both on the prediction queue, with their own host names; the
job's chunks go to both). The FiftyOne side: the sync, scoring (the engine's predictions written into every
sample) here and as ``labelloop.predict_files`` chunks on 1, then 2 prediction workers, mislabels, uncertainty,
embeddings and the UMAP map, each against ultralytics' own pass over the same files.

Label Studio keeps its tasks in SQLite by default, where storing predictions slows as the project grows;
``--postgres postgresql://postgres@127.0.0.1:5432`` runs it on PostgreSQL as the Compose stack does (a fresh
database is created on that server for the run and dropped after it), which the backlog rows at 10k and above need.

Usage: ``.venv/bin/python bench/scale.py [--sizes 1000,10000,100000] [--postgres URL --backlog-up-to 100000]``;
appends to bench/figures/scale.md and draws bench/figures/scale.png.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import os
import platform
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process in MB (VmHWM starts afresh at exec, unlike ru_maxrss)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def _measured(phase: str, args: dict, queue) -> None:
    """Run one phase in this (fresh) process; put (seconds, RSS at start, peak RSS, extra) on ``queue``."""
    from labelloop.core.labelconfig import parse_label_config
    from labelloop.core.yolo_env import import_yolo
    from labelloop.labelstudio.client import StudioClient
    from labelloop.workflows import backlog

    import_yolo()  # torch and ultralytics loaded before the start is read: the phase's own memory is what grows
    if phase.startswith("fo_"):  # and FiftyOne (3 s to import, once per process)
        from labelloop.fo.env import import_fiftyone

        import_fiftyone()
    start_rss = _status_mb("VmRSS")
    start = time.perf_counter()
    extra: dict = {}
    with StudioClient(args["url"], args["token"], timeout=600) as client:
        spec = parse_label_config(args["label_config"])
        if phase == "export":
            extra["tasks"] = len(client.export_tasks(args["project"]))
        elif phase == "paged":  # the job's read alone: chunks made and dropped, what the job keeps kept
            read = backlog.read_for_prediction(client, args["project"], spec, args["version"])
            extra["tasks"] = read.unlabeled + len(read.labeled_ids)
        elif phase == "backlog":  # the read and the backlog together, as the job runs them (chunks as they come)
            scan = backlog.BacklogScan(client, args["project"], spec, args["version"])
            context = backlog.ChunkContext(str(args["project"]), args["version"], args["weights"], args["label_config"])
            extra.update(predicted=0, predict_s=0.0, push_s=0.0, errors=0)
            for out in backlog.run_here(context, scan.chunks(), lambda f, m: None):
                extra["predicted"] += len(out["pushed"])
                extra["predict_s"] += out["seconds"]["predict"]
                extra["push_s"] += out["seconds"]["push"]
                extra["errors"] += out["errors"]
                for task_id, pushed in out["pushed"].items():
                    scan.book.add(int(task_id), pushed[0], pushed[1])
            extra["read_s"] = time.perf_counter() - start - extra["predict_s"] - extra["push_s"]
        elif phase == "raw":
            from labelloop.core.predict import load_model, predict_images

            model = load_model(args["weights"], "raw")
            paths = [Path(p) for p in args["paths"]]
            predict_images(model, paths[:16], spec, 0.5, tta=True)  # warm
            start = time.perf_counter()
            predict_images(model, paths, spec, 0.5, batch=16, tta=True)
            extra["images"] = len(paths)
        elif phase.startswith("fo_"):
            start, extra = _fiftyone_phase(phase, args, spec)
    seconds = time.perf_counter() - start
    peak = _status_mb("VmHWM")
    queue.put({"seconds": seconds, "rss_start_mb": start_rss, "rss_peak_mb": peak, **extra})


def _fiftyone_phase(phase: str, args: dict, spec) -> tuple[float, dict]:
    """One FiftyOne phase on the project's dataset; returns (its start time, figures)."""
    from labelloop.core.predict import embed_images, load_model, predict_images
    from labelloop.fo import analysis
    from labelloop.fo.env import import_fiftyone
    from labelloop.fo.sync import predict_samples, sync_project

    fo = import_fiftyone()
    model = load_model(args["weights"], args["version"])
    dataset = fo.load_dataset(args["dataset"]) if fo.dataset_exists(args["dataset"]) else None
    paths = [Path(p) for p in dataset.values("filepath")] if dataset is not None else []
    if phase in ("fo_score", "fo_raw", "fo_embed", "fo_raw_embed"):  # warm, as the raw pass is
        predict_images(model, paths[:64], spec, 0.5, batch=64)
        embed_images(model, paths[:16])
    extra: dict = {}
    start = time.perf_counter()
    if phase in ("fo_sync", "fo_resync"):
        report = sync_project(args["project"], args["dataset"], predict=False)
        extra.update(added=report.added, updated=report.updated_ground_truth, errors=len(report.errors))
    elif phase == "fo_score":  # the engine's predictions and scores into every sample (as the sync writes them)
        extra["samples"] = predict_samples(dataset, spec, model, force=True)
    elif phase == "fo_score_celery":  # the same, the forward passes as chunks on the running prediction workers
        from labelloop.tasks.jobs import predict_files_on_celery

        extra["samples"] = predict_samples(dataset, spec, model, force=True, runner=predict_files_on_celery)
    elif phase == "fo_raw":  # ultralytics' own predict on the files, at the batch size the scoring uses
        files = [str(p) for p in paths]
        for at in range(0, len(files), 64):
            model.yolo.predict(files[at : at + 64], verbose=False, batch=len(files[at : at + 64]))
        extra["samples"] = len(paths)
    elif phase == "fo_analysis":
        analysis.compute_mislabel_scores(dataset)
        extra["mislabels_s"] = time.perf_counter() - start
        analysis.uncertainty_sampling(dataset, k=100)
        extra["uncertainty_s"] = time.perf_counter() - start - extra["mislabels_s"]
    elif phase == "fo_embed":
        extra["samples"] = analysis.compute_embeddings(dataset, visualize=False, similarity=False)["embedded"]
    elif phase == "fo_raw_embed":  # ultralytics' own embed on the files, 16 at a time as the engine does
        files = [str(p) for p in paths]
        for at in range(0, len(files), 16):
            model.yolo.embed(files[at : at + 16], verbose=False)
        extra["samples"] = len(paths)
    elif phase == "fo_map":  # FiftyOne Brain's own cost on our vectors
        import fiftyone.brain as fob

        fob.compute_visualization(dataset, embeddings="embeddings", method="umap", brain_key="bench_umap",
                                  num_dims=2, seed=0, verbose=False)
    return start, extra


def measure(phase: str, args: dict) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_measured, args=(phase, args, queue))
    process.start()
    result = queue.get(timeout=4 * 3600)
    process.join()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--labeled", type=int, default=200)
    parser.add_argument("--no-workers", action="store_true", help="skip the Celery runs")
    parser.add_argument("--over-http", action="store_true", help="images over HTTP, not the shared media folder")
    parser.add_argument("--upload-up-to", type=int, default=3000,
                        help="larger projects: images placed in Label Studio's upload folder, tasks imported as JSON")
    parser.add_argument("--backlog-up-to", type=int, default=3000,
                        help="larger projects skip the backlog and Celery runs (pushes to Label Studio on SQLite grow "
                             "with the project: measured 6.9 ms a task at 1k, 20.4 at 3k)")
    parser.add_argument("--export-up-to", type=int, default=10000, help="larger projects skip the easy export")
    parser.add_argument("--map-up-to", type=int, default=10000, help="larger datasets skip the UMAP map")
    parser.add_argument("--figures", type=Path, default=HERE / "figures")
    parser.add_argument("--postgres", default="", help="Label Studio on this PostgreSQL server "
                        "(postgresql://user@host:port; a database is created for the run and dropped after)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    work = Path(tempfile.mkdtemp(prefix="labelloop-bench-scale-"))
    os.environ.setdefault("LABELLOOP_HOME", str(work / "home"))
    os.environ.setdefault("YOLO_CONFIG_DIR", str(Path.home() / ".cache" / "labelloop" / "ultralytics"))
    os.environ["LABELLOOP_EPOCHS"] = "3"

    from labelloop.dev.localstack import (
        create_postgres_database,
        drop_postgres_database,
        start_label_studio,
        start_mongod,
        start_redis,
        start_worker,
    )

    files = work / "files"
    database = create_postgres_database(args.postgres, f"labelloop_scale_{os.getpid()}") if args.postgres else None
    try:
        studio = start_label_studio(work / "label-studio", postgres=database)
    except BaseException:
        if database:
            drop_postgres_database(database)
        raise
    redis = start_redis(work / "redis")
    mongod = start_mongod(work / "mongod")
    os.environ.update({"REDIS_URL": redis.url, "LABEL_STUDIO_URL": studio.url,
                       "LABEL_STUDIO_API_KEY": studio.info["token"], "FIFTYONE_DATABASE_URI": mongod.url})
    if not args.over_http:  # every process started from here on (phases, workers) reads uploads in place
        os.environ["LABELLOOP_LS_MEDIA_DIR"] = str(work / "label-studio" / "media")
    rows = []
    started = time.perf_counter()
    try:
        for size in sizes:
            rows.append(run_size(size, args, work, files, studio, start_worker))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        redis.stop()
        studio.stop()
        mongod.stop()
        if database:
            drop_postgres_database(database)
    report(args, rows, time.perf_counter() - started)
    return 0


def run_size(size: int, args, work: Path, files: Path, studio, start_worker) -> dict:
    from labelloop.config import settings
    from labelloop.core.labelconfig import parse_label_config
    from labelloop.core.registry import Registry
    from labelloop.dev.labeler import LabelerClient
    from labelloop.dev.shapes import generate_shapes, label_config, to_label_studio_result, to_label_studio_tasks
    from labelloop.labelstudio.media import LocalFileFetcher
    from labelloop.workflows.pipeline import train_new_version

    t0 = time.perf_counter()
    data = generate_shapes(files / f"s{size}", n=size, seed=size, size=64, max_objects=1, style="simple")
    generated = time.perf_counter() - t0
    config = label_config("classification")
    spec = parse_label_config(config)
    with LabelerClient(studio.url, studio.info["token"], timeout=1800) as api:
        project = api.create_project(f"scale {size}", config)["id"]
        t0 = time.perf_counter()
        if size <= args.upload_up_to:
            for start in range(0, len(data.images), 100):  # as the import dialog uploads files (Django: <= 100 a request)
                part = data.images[start : start + 100]
                api.request("POST", f"/api/projects/{project}/import", files=[
                    (f"file{i}", (im.file, (data.images_dir / im.file).read_bytes(), "image/png")) for i, im in enumerate(part)])
        else:  # uploads at this size take hours on SQLite: the files go where uploads land, the tasks as JSON
            upload = work / "label-studio" / "media" / "upload" / str(project)
            upload.mkdir(parents=True, exist_ok=True)
            for image in data.images:
                os.link(data.images_dir / image.file, upload / image.file)
            for start in range(0, len(data.images), 10_000):
                api.request("POST", f"/api/projects/{project}/import", json=[
                    {"image": f"/data/upload/{project}/{im.file}"} for im in data.images[start : start + 10_000]])
        imported = time.perf_counter() - t0
        by_file = {}
        for task in api.iter_tasks(project):
            by_file[task["data"]["image"].rsplit("/", 1)[-1].rsplit("-", 1)[-1]] = task["id"]
            if len(by_file) >= args.labeled + 1000:  # ids come in order; the labeled images are the first ones
                break
        for image in data.images[: args.labeled]:
            api.annotate(by_file[image.file], to_label_studio_result(image, "classification"))
    registry = Registry(settings().model_dir)
    local = to_label_studio_tasks(data, "classification", indices=range(args.labeled), start_id=10**9)
    t0 = time.perf_counter()
    first = train_new_version(registry, project, local, spec, LocalFileFetcher()).manifest
    trained = time.perf_counter() - t0
    fields = {k: v for k, v in first.to_json().items()
              if k not in {"version", "project", "created_at", "weights_sha256", "weights", "path"}}
    versions = [registry.add_version(project, first.weights, fields).version for _ in range(2)]
    common = {"url": studio.url, "token": studio.info["token"], "project": project, "label_config": config,
              "weights": str(first.weights)}
    row: dict = {"tasks": size, "unlabeled": size - args.labeled, "generate_s": generated, "import_s": imported,
                 "train_s": trained}
    if size <= args.export_up_to:
        try:
            row["export"] = measure("export", {**common, "version": first.version})
        except Exception as exc:  # the easy export has a timeout: at size it may not answer
            row["export"] = {"error": str(exc)[:200]}
    row["paged"] = measure("paged", {**common, "version": first.version})
    if size <= args.backlog_up_to:
        row["backlog"] = measure("backlog", {**common, "version": first.version})
        paths = [str(data.images_dir / im.file) for im in data.images[args.labeled :]]
        row["raw"] = measure("raw", {**common, "paths": paths})
        if not args.no_workers:
            row["workers"] = {}
            for count, version in zip((1, 2), versions):
                # promoted first, as after a training: the job then also scores the human labels (suspects)
                registry.promote(project, version, "bench/scale.py")
                row["workers"][count] = celery_run(project, version, count, work, start_worker)
                print(f"prediction job, {count} worker(s)", json.dumps(row["workers"][count]), flush=True)
    fo_args = {**common, "version": first.version, "dataset": f"scale-{size}-{project}"}
    phases = ["fo_sync", "fo_resync", "fo_score", "fo_raw", "fo_analysis", "fo_embed", "fo_raw_embed"]
    for phase in phases + (["fo_map"] if size <= args.map_up_to else []):
        row[phase] = measure(phase, fo_args)
        print(phase, json.dumps(row[phase]), flush=True)
    if not args.no_workers:  # the FiftyOne scoring's forward passes on 1, then 2 prediction workers
        for count in (1, 2):
            workers = [start_worker(work / "home", queues="predict", name=f"fo{k + 1}-{size}") for k in range(count)]
            try:
                row[f"fo_score_celery_{count}"] = measure("fo_score_celery", fo_args)
            finally:
                for worker in workers:
                    worker.stop()
            print(f"fo_score_celery, {count} worker(s)", json.dumps(row[f"fo_score_celery_{count}"]), flush=True)
    return row


def celery_run(project: int, version: str, count: int, work: Path, start_worker) -> dict:
    from labelloop.tasks.jobs import request_prediction_job
    from labelloop.tasks.jobstore import JobStore

    workers = [start_worker(work / "home", queues="predict", name=f"predict{k + 1}-{version}")
               for k in range(count)]
    try:
        job, _ = request_prediction_job(str(project), version, "bench/scale.py", countdown=0)
        store = JobStore()
        while (record := store.get(job["id"]))["state"] not in ("done", "failed", "skipped"):
            time.sleep(0.5)
    finally:
        for worker in workers:
            worker.stop()
    counts = record.get("counts") or {}
    return {"state": record["state"], "seconds": record["finished_at"] - record["started_at"],
            "pushed": counts.get("pushed"), "chunks_by_worker": counts.get("chunks_by_worker"),
            "scored": counts.get("scored"), "score_chunks_by_worker": counts.get("score_chunks_by_worker"),
            "phases": counts.get("seconds"), "meta_written": counts.get("meta_written"),
            "reason": record.get("reason")}


def _grow(m: dict) -> float:
    return m["rss_peak_mb"] - m["rss_start_mb"]


def _per_item_ms(m: dict, key: str = "samples") -> float:
    return 1000 * m["seconds"] / max(1, m.get(key) or 0)


def report(args, rows: list[dict], seconds: float) -> None:
    import matplotlib
    from figures_log import append_run

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nan = float("nan")
    lines = [f"\n## {dt.date.today()} — {platform.machine()}, {os.cpu_count()} CPU cores, {seconds / 60:.1f} min",
             "", f"Label Studio on {'PostgreSQL' if args.postgres else 'SQLite'}; "
                 f"{args.labeled} labeled tasks per project; peak RSS above the process's start (torch loaded) in MB; "
                 f"projects above {args.upload_up_to} tasks imported as JSON tasks over files placed in Label Studio's "
                 f"upload folder; backlog and Celery runs up to {args.backlog_up_to} tasks.",
             "", "**Label Studio side**", "",
             "| tasks | import s | read: easy export s / MB | read: paged s / MB | backlog: s (of which read) / MB "
             "| backlog ms per task: predict (fetch + infer), push to Label Studio | raw forward pass ms per image "
             "| predict / raw | job, 1 worker s | job, 2 workers s (chunks per worker) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        export, paged = row.get("export") or {}, row["paged"]
        export_cell = (f"{export['seconds']:.1f} / {_grow(export):.0f}" if "seconds" in export
                       else f"failed: {export['error'][:60]}" if export else "—")
        cells = [str(row["tasks"]), f"{row['import_s']:.0f}", export_cell, f"{paged['seconds']:.1f} / {_grow(paged):.0f}"]
        backlog, raw = row.get("backlog"), row.get("raw")
        if backlog and raw:
            per_task = 1000 * backlog["predict_s"] / max(1, backlog["predicted"])
            per_push = 1000 * backlog["push_s"] / max(1, backlog["predicted"])
            per_raw = _per_item_ms(raw, "images")
            workers = row.get("workers") or {}
            one, two = workers.get(1) or {}, workers.get(2) or {}
            cells += [f"{backlog['seconds']:.1f} ({backlog['read_s']:.1f}) / {_grow(backlog):.0f}",
                      f"{per_task:.1f}, {per_push:.1f}", f"{per_raw:.2f}", f"{per_task / per_raw:.2f}×",
                      f"{one.get('seconds', nan):.1f}",
                      f"{two.get('seconds', nan):.1f} ({two.get('chunks_by_worker')}; {two.get('scored')} labels scored in "
                      f"{two.get('score_chunks_by_worker')})"]
        else:
            cells += ["—"] * 6
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "**FiftyOne side** (one sample per task; scoring = the engine's prediction, score and class "
                  "probabilities written into every sample; raw = the same forward passes on the same files, nothing "
                  "written)", "",
              "| samples | sync s / MB | re-sync, nothing changed s / MB | scoring ms per sample / MB | raw ms per image "
              "| scoring / raw | scoring on 1 / 2 prediction workers, ms per sample | mislabels s | uncertainty s "
              "| embeddings ms per sample | raw embed ms per image | embed / raw | UMAP map s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        sync, resync, score, raw = row["fo_sync"], row["fo_resync"], row["fo_score"], row["fo_raw"]
        embed, raw_embed, analysis = row["fo_embed"], row["fo_raw_embed"], row["fo_analysis"]
        umap = row.get("fo_map")
        umap_cell = f"{umap['seconds']:.0f}" if umap else "—"
        on_workers = [row.get(f"fo_score_celery_{count}") for count in (1, 2)]
        workers_cell = (" / ".join(f"{_per_item_ms(m):.2f}" for m in on_workers if m) if any(on_workers) else "—")
        lines.append(
            f"| {row['tasks']} | {sync['seconds']:.1f} / {_grow(sync):.0f} | {resync['seconds']:.1f} / {_grow(resync):.0f} "
            f"| {_per_item_ms(score):.2f} / {_grow(score):.0f} | {_per_item_ms(raw):.2f} "
            f"| {_per_item_ms(score) / _per_item_ms(raw):.2f}× | {workers_cell} | {analysis['mislabels_s']:.1f} "
            f"| {analysis['uncertainty_s']:.1f} | {_per_item_ms(embed):.2f} | {_per_item_ms(raw_embed):.2f} "
            f"| {_per_item_ms(embed) / _per_item_ms(raw_embed):.2f}× | {umap_cell} |")
    path = append_run(args.figures, "scale.md", "Scale (`bench/scale.py`)", "\n".join(lines) + "\n")
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    series = (("export", "read, easy export"), ("paged", "read, paged"), ("backlog", "backlog, one process"),
              ("fo_sync", "FiftyOne sync"), ("fo_resync", "FiftyOne re-sync, nothing changed"),
              ("fo_score", "FiftyOne scoring"), ("fo_embed", "FiftyOne embeddings"))
    for key, name in series:
        done = [r for r in rows if "seconds" in (r.get(key) or {})]
        if done:
            left.plot([r["tasks"] for r in done], [r[key]["seconds"] for r in done], marker="o", label=name)
            right.plot([r["tasks"] for r in done], [_grow(r[key]) for r in done], marker="o", label=name)
    for count in (1, 2):
        points = [(r["tasks"], r["workers"][count]["seconds"]) for r in rows if r.get("workers")]
        if points:
            left.plot([p[0] for p in points], [p[1] for p in points], marker="s", linestyle="--",
                      label=f"prediction job, {count} worker{'s' if count > 1 else ''}")
    for axis, title in ((left, "seconds"), (right, "peak memory above start, MB")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("tasks in the project")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(args.figures / "scale.png", dpi=110)
    print(f"wrote {args.figures / 'scale.png'} and {path}")


if __name__ == "__main__":
    raise SystemExit(main())
