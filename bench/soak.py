"""Soak the loop on a real stack: mixed load for minutes, the backend's memory flat, webhooks fast.

The stack is the one ``bench/loop_latency.py`` starts (Redis, Label Studio 1.23.2 from its own venv,
``labelloop serve``, one worker on both queues, via ``labelloop.dev.localstack``), here with the backend
locked the way a deployment is: basic auth on, ``LABELLOOP_WEBHOOK_SECRET`` set and installed on the
project's Label Studio webhook (``StudioClient.install_webhook_secret``). A classification
project of ~200 generated 64 px shapes is connected with the backend's basic auth; ``--labeled``
tasks are annotated and the soak clock starts once the first model serves. Then, for ``--minutes``:

* ``/predict`` of 8 tasks, back to back, from 2 threads (basic auth);
* webhooks from another thread, ``--webhook-rate`` per second: ``ANNOTATION_CREATED`` with the
  secret header (answer 200, or 429 from the per-project rate limit), and every ``--forged-every``-th
  one without it (must answer 401);
* one annotation through Label Studio's API every ``--annotate-every`` seconds: Label Studio's own
  (secret-carrying) webhook starts trainings, so trainings and promotions run during the soak;
* every ``--sample-every`` seconds: resident memory (RSS) of the backend process (and, for context,
  of the worker's process tree).

Reported: webhook latency p50/p95/p99/max, ``/predict`` p50/p95, status codes, trainings finished
(``GET /jobs``), backend RSS at start / after the warm-up / at the end and its slope after the
warm-up (MB per minute, least squares). A table goes to stdout and is appended to
``bench/figures/soak.md``; raw samples to ``bench/out/soak-<stamp>.json``; RSS and webhook latency
over time to ``bench/figures/soak.png``.

Exit status: 0 when no response was a 5xx, no request failed at the transport level, every forged
webhook got 401 and webhook p99 < 1 s (Label Studio waits at most 1 s); 1 otherwise, with the reasons
printed (``--max-slope`` adds a memory check). Ctrl-C (or SIGTERM) stops the load and tears the
stack down.

Usage: ``.venv/bin/python bench/soak.py [--minutes 10] [--tasks 200] [--labeled 24] [--epochs 5]``
(``--validation`` marks a short run as such in the figures file).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from loop_latency import percentile  # noqa: E402  (the same nearest-rank percentile as the loop bench)

WEBHOOK_BUDGET_S = 1.0  # Label Studio gives a webhook at most this long


# -- measurements -----------------------------------------------------------------------------------

class Recorder:
    """Thread-safe lists of (t, ...) samples; ``t`` in seconds since the soak clock started."""

    def __init__(self):
        self.lock = threading.Lock()
        self.t0 = time.monotonic()
        self.webhooks: list[tuple[float, float, str, str]] = []  # t, seconds, kind, status
        self.predicts: list[tuple[float, float, str]] = []  # t, seconds, status
        self.annotations: list[tuple[float, str]] = []  # t, "ok" or the error
        self.rss: list[tuple[float, float, float | None]] = []  # t, backend MB, worker tree MB

    def now(self) -> float:
        return time.monotonic() - self.t0

    def add(self, name: str, *row) -> None:
        with self.lock:
            getattr(self, name).append((self.now(), *row))


def rss_mb(pid: int, tree: bool = False) -> float | None:
    """Resident memory of ``pid`` (plus its descendants with ``tree``) in MB; None once it is gone."""
    try:
        import psutil
    except ImportError:  # /proc fallback: the process itself only
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None
    try:
        process = psutil.Process(pid)
        members = [process] + (process.children(recursive=True) if tree else [])
        total = 0
        for member in members:
            try:
                total += member.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total / 2**20
    except psutil.NoSuchProcess:
        return None


def status_of(call) -> tuple[str, float]:
    """Run an HTTP call; (status code as text, or the transport error's name; seconds)."""
    t0 = time.perf_counter()
    try:
        status = str(call().status_code)
    except httpx.HTTPError as exc:
        status = f"error:{type(exc).__name__}"
    return status, time.perf_counter() - t0


def slope_per_minute(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MB) points, in MB per minute; None with fewer than 3 points."""
    if len(points) < 3:
        return None
    xs, ys = [p[0] / 60 for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else None


# -- load -------------------------------------------------------------------------------------------

def predict_loop(rec: Recorder, stop: threading.Event, url: str, auth, tasks: list[dict], project: str,
                 config: str, offset: int, pause: float) -> None:
    with httpx.Client(base_url=url, auth=auth, timeout=60) as client:
        k = offset
        while not stop.is_set():
            start = (8 * k) % len(tasks)
            chunk = (tasks[start:] + tasks[:start])[:8]
            status, seconds = status_of(lambda chunk=chunk: client.post(
                "/predict", json={"tasks": chunk, "project": project, "label_config": config}))
            rec.add("predicts", seconds, status)
            k += 2
            if pause:
                stop.wait(pause)


def webhook_loop(rec: Recorder, stop: threading.Event, url: str, secret: str, header: str, project: int,
                 task_ids: list[int], rate: float, forged_every: int) -> None:
    period = 1.0 / rate
    with httpx.Client(base_url=url, timeout=5) as client:
        n, due = 0, time.monotonic()
        while not stop.is_set():
            n += 1
            forged = forged_every > 0 and n % forged_every == 0
            task = task_ids[n % len(task_ids)]
            body = {"action": "ANNOTATION_CREATED", "project": {"id": project},
                    "task": {"id": task}, "annotation": {"id": 10_000_000 + n}}
            headers = {} if forged else {header: secret}
            status, seconds = status_of(lambda body=body, headers=headers: client.post("/webhook", json=body, headers=headers))
            rec.add("webhooks", seconds, "forged" if forged else "authentic", status)
            due += period
            stop.wait(max(0.0, due - time.monotonic()))


def annotate_loop(rec: Recorder, stop: threading.Event, api, queue: list[tuple[int, list[dict]]],
                  every: float) -> None:
    while not stop.wait(every) and queue:
        task_id, result = queue.pop(0)
        try:
            api.annotate(task_id, result)
            rec.add("annotations", "ok")
        except Exception as exc:  # Label Studio's answer, not the backend's: recorded, not fatal
            rec.add("annotations", f"{type(exc).__name__}: {str(exc)[:200]}")


def sample_loop(rec: Recorder, stop: threading.Event, backend_pid: int, worker_pid: int, every: float) -> None:
    while True:
        rec.add("rss", rss_mb(backend_pid), rss_mb(worker_pid, tree=True))
        if stop.wait(every):
            return


# -- report -----------------------------------------------------------------------------------------

def summarize(rec: Recorder, seconds: float, warmup_s: float, jobs: list[dict], started_at: float) -> dict:
    def counts(rows) -> dict[str, int]:
        out: dict[str, int] = {}
        for status in rows:
            out[status] = out.get(status, 0) + 1
        return dict(sorted(out.items()))

    def stats(values: list[float], qs=(0.5, 0.95, 0.99)) -> dict[str, float | None]:
        if not values:
            return {f"p{int(q * 100)}_ms": None for q in qs} | {"max_ms": None, "n": 0}
        return {f"p{int(q * 100)}_ms": 1000 * percentile(values, q) for q in qs} | \
            {"max_ms": 1000 * max(values), "n": len(values)}

    authentic = [w for w in rec.webhooks if w[2] == "authentic"]
    forged = [w for w in rec.webhooks if w[2] == "forged"]
    rss = [(t, mb) for t, mb, _ in rec.rss if mb is not None]
    worker = [(t, mb) for t, _, mb in rec.rss if mb is not None]
    after = [(t, mb) for t, mb in rss if t >= warmup_s]
    at_warmup = min(rss, key=lambda p: abs(p[0] - warmup_s)) if rss else None
    soak_jobs = [j for j in jobs if (j.get("finished_at") or 0) >= started_at]
    job_counts: dict[str, int] = {}
    for j in soak_jobs:
        job_counts[f"{j['kind']}:{j['state']}"] = job_counts.get(f"{j['kind']}:{j['state']}", 0) + 1
    statuses = [w[3] for w in rec.webhooks] + [p[2] for p in rec.predicts]
    return {
        "seconds": seconds,
        "warmup_s": warmup_s,
        "webhook": stats([w[1] for w in authentic]),  # the ones Label Studio sends (the 1 s budget)
        "webhook_forged": stats([w[1] for w in forged]),
        "webhook_authentic_status": counts(w[3] for w in authentic),
        "webhook_forged_status": counts(w[3] for w in forged),
        "predict": stats([p[1] for p in rec.predicts]),
        "predict_status": counts(p[2] for p in rec.predicts),
        "server_errors": sum(1 for s in statuses if s.startswith("5")),
        "transport_errors": sum(1 for s in statuses if s.startswith("error")),
        "forged_not_401": sum(1 for w in forged if w[3] != "401"),
        "annotations": counts("ok" if a[1] == "ok" else "error" for a in rec.annotations),
        "jobs_finished": dict(sorted(job_counts.items())),
        "trainings_done": job_counts.get("train:done", 0),
        "rss_mb": {"start": rss[0][1] if rss else None, "after_warmup": at_warmup[1] if at_warmup else None,
                   "end": rss[-1][1] if rss else None, "max": max(mb for _, mb in rss) if rss else None,
                   "slope_mb_per_min": slope_per_minute(after)},
        "worker_rss_mb": {"start": worker[0][1] if worker else None, "end": worker[-1][1] if worker else None,
                          "max": max(mb for _, mb in worker) if worker else None},
    }


def verdict(summary: dict, max_slope: float | None) -> list[str]:
    reasons = []
    if summary["server_errors"]:
        reasons.append(f"{summary['server_errors']} responses were 5xx")
    if summary["transport_errors"]:
        reasons.append(f"{summary['transport_errors']} requests failed without an answer (timeout/connection)")
    if summary["forged_not_401"]:
        reasons.append(f"{summary['forged_not_401']} forged webhooks (no secret) were not answered 401")
    p99 = summary["webhook"]["p99_ms"]
    if p99 is None:
        reasons.append("no webhook was sent")
    elif p99 >= 1000 * WEBHOOK_BUDGET_S:
        reasons.append(f"webhook (with the secret) p99 {p99:.0f} ms >= {1000 * WEBHOOK_BUDGET_S:.0f} ms (Label Studio's budget)")
    slope = summary["rss_mb"]["slope_mb_per_min"]
    if max_slope is not None and (slope is None or slope > max_slope):
        reasons.append(f"backend RSS slope after warm-up {slope} MB/min > {max_slope} MB/min")
    return reasons


def fmt(value, unit: str = "", digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}{unit}"


def table(summary: dict) -> str:
    w, p, r, wr = summary["webhook"], summary["predict"], summary["rss_mb"], summary["worker_rss_mb"]
    codes = lambda c: ", ".join(f"{k} × {v}" for k, v in c.items()) or "–"
    rows = [
        ("webhook with the secret: answer p50 / p95 / p99 / max",
         f"{fmt(w['p50_ms'])} / {fmt(w['p95_ms'])} / **{fmt(w['p99_ms'])}** / {fmt(w['max_ms'])} ms "
         f"({w['n']} webhooks; Label Studio allows 1 s)"),
        ("webhook with the secret: status", codes(summary["webhook_authentic_status"])),
        ("forged webhook (no secret): status, p99", f"{codes(summary['webhook_forged_status'])}; "
                                                    f"p99 {fmt(summary['webhook_forged']['p99_ms'])} ms"),
        ("`/predict` (8 tasks, 2 threads), p50 / p95",
         f"{fmt(p['p50_ms'])} / {fmt(p['p95_ms'])} ms ({p['n']} requests)"),
        ("`/predict` status", codes(summary["predict_status"])),
        ("5xx / requests without an answer", f"**{summary['server_errors']}** / {summary['transport_errors']}"),
        ("annotations through Label Studio", codes(summary["annotations"])),
        ("trainings finished (done)", f"{summary['trainings_done']}  (all jobs: {codes(summary['jobs_finished'])})"),
        ("backend RSS start (model loaded) / after warm-up / end (max)",
         f"{fmt(r['start'])} / {fmt(r['after_warmup'])} / {fmt(r['end'])} MB ({fmt(r['max'])})"),
        (f"backend RSS slope after warm-up ({summary['warmup_s']:.0f} s)",
         f"**{fmt(r['slope_mb_per_min'], ' MB/min', 2)}**"),
        ("worker tree RSS start / end (max), for context",
         f"{fmt(wr['start'])} / {fmt(wr['end'])} MB ({fmt(wr['max'])})"),
    ]
    return "\n".join(["| measure | figure |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows])


def machine() -> str:
    model = ""
    try:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    except OSError:
        pass
    return f"{platform.node()}, {os.cpu_count()} CPU cores" + (f" ({model})" if model else "")


def plot(rec: Recorder, summary: dict, jobs: list[dict], started_at: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    trained = False
    for job in jobs:  # training spans, shaded on both panels
        if job.get("kind") == "train" and job.get("state") in ("done", "running") and job.get("started_at"):
            a = (job["started_at"] - started_at) / 60
            b = min(((job.get("finished_at") or time.time()) - started_at) / 60, summary["seconds"] / 60)
            if b >= 0:
                for ax in (top, bottom):
                    ax.axvspan(max(a, 0), b, color="tab:green", alpha=0.12, lw=0,
                               label=None if trained or ax is bottom else "training (done or running)")
                trained = True
    t_b = [(t / 60, mb) for t, mb, _ in rec.rss if mb is not None]
    t_w = [(t / 60, mb) for t, _, mb in rec.rss if mb is not None]
    if t_b:
        top.plot(*zip(*t_b), color="tab:blue", label="backend (labelloop serve)")
    if t_w:
        top.plot(*zip(*t_w), color="tab:gray", lw=1, ls="--", label="worker process tree")
    warm = summary["warmup_s"] / 60
    top.axvline(warm, color="k", lw=0.8, ls=":")
    slope = summary["rss_mb"]["slope_mb_per_min"]
    after = [(t, mb) for t, mb in t_b if t >= warm]
    if slope is not None and after:
        mx = statistics.fmean(t for t, _ in after)
        my = statistics.fmean(mb for _, mb in after)
        xs = [after[0][0], after[-1][0]]
        top.plot(xs, [my + slope * (x - mx) for x in xs], color="tab:red", lw=1.2,
                 label=f"fit after warm-up: {slope:+.2f} MB/min")
    top.set_ylabel("resident memory (MB)")
    top.set_ylim(bottom=0)
    top.legend(loc="lower right", fontsize=8)
    top.set_title(f"soak: {summary['seconds'] / 60:.1f} min of /predict + webhooks + trainings")
    for kind, colour in (("authentic", "tab:blue"), ("forged", "tab:orange")):
        pts = [(t / 60, 1000 * s) for t, s, k, _ in rec.webhooks if k == kind]
        if pts:
            bottom.scatter(*zip(*pts), s=4, color=colour, alpha=0.6,
                           label="with the secret" if kind == "authentic" else "forged (401)")
    bottom.axhline(1000 * WEBHOOK_BUDGET_S, color="tab:red", lw=1, label="Label Studio's 1 s")
    if summary["webhook"]["p99_ms"] is not None:
        bottom.axhline(summary["webhook"]["p99_ms"], color="k", lw=0.8, ls="--",
                       label=f"p99 with the secret {summary['webhook']['p99_ms']:.0f} ms")
    bottom.set_yscale("log")
    bottom.set_ylabel("webhook answer (ms)")
    bottom.set_xlabel("minutes since the soak started")
    bottom.legend(loc="upper right", fontsize=8, markerscale=3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def stop_leftovers() -> None:
    """Stop process groups this script started that are not in ``started`` yet (interrupted mid-start).

    localstack starts every process in its own session, so our direct children are group leaders.
    """
    try:
        import psutil
    except ImportError:
        return
    for child in psutil.Process().children():
        try:
            os.killpg(child.pid, signal.SIGTERM)
            child.wait(timeout=20)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
        except psutil.TimeoutExpired:
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# -- main -------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the soak (default 10)")
    parser.add_argument("--warmup", type=float, default=None,
                        help="minutes left out of the RSS slope (default 1, or a quarter of a shorter run)")
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--labeled", type=int, default=24, help="tasks annotated before the soak starts")
    parser.add_argument("--epochs", type=int, default=5, help="training epochs (LABELLOOP_EPOCHS) for the worker")
    parser.add_argument("--warm-start-steps", type=int, default=0,
                        help="LABELLOOP_WARM_START_STEPS (default 0: no self-supervised warm start)")
    parser.add_argument("--predict-threads", type=int, default=2)
    parser.add_argument("--predict-pause", type=float, default=0.0, help="seconds between a thread's requests")
    parser.add_argument("--webhook-rate", type=float, default=3.0, help="webhooks per second (default 3)")
    parser.add_argument("--forged-every", type=int, default=4, help="every n-th webhook has no secret (0: none)")
    parser.add_argument("--annotate-every", type=float, default=20.0, help="seconds between annotations")
    parser.add_argument("--sample-every", type=float, default=3.0, help="seconds between RSS samples")
    parser.add_argument("--max-slope", type=float, default=None,
                        help="also fail when the backend's RSS grows faster than this after warm-up (MB/min)")
    parser.add_argument("--validation", action="store_true", help="mark this run as a validation run in the md")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, data) on success")
    args = parser.parse_args()
    seconds = 60 * args.minutes
    warmup_s = 60 * (args.warmup if args.warmup is not None else min(1.0, args.minutes / 4))

    def interrupted(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)  # also when started in the background (SIGINT ignored there)

    work = Path(tempfile.mkdtemp(prefix="labelloop-soak-"))
    os.environ["LABELLOOP_HOME"] = str(work / "home")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(Path.home() / ".cache" / "labelloop" / "ultralytics"))

    from labelloop.dev.labeler import LabelerClient
    from labelloop.dev.localstack import start_backend, start_label_studio, start_redis, start_worker
    from labelloop.dev.shapes import generate_shapes, label_config, to_label_studio_result
    from labelloop.labelstudio.client import WEBHOOK_SECRET_HEADER

    user, password, secret = "labelstudio", secrets.token_urlsafe(16), secrets.token_urlsafe(24)
    auth = (user, password)
    rec, stop = Recorder(), threading.Event()
    threads: list[threading.Thread] = []
    started = []
    ok = False
    try:
        redis = start_redis(work / "redis")
        started.append(redis)
        os.environ["REDIS_URL"] = redis.url
        print("starting Label Studio (~40 s on a fresh data dir) ...", flush=True)
        ls = start_label_studio(work / "ls")
        started.append(ls)
        env = {"LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.info["token"], "REDIS_URL": redis.url,
               "LABELLOOP_WARM_START_STEPS": str(args.warm_start_steps)}
        backend = start_backend(work / "home", env={**env, "BASIC_AUTH_USER": user, "BASIC_AUTH_PASS": password,
                                                    "LABELLOOP_WEBHOOK_SECRET": secret})
        started.append(backend)
        worker = start_worker(work / "home", env={**env, "LABELLOOP_EPOCHS": str(args.epochs)})
        started.append(worker)
        api = LabelerClient(ls.url, ls.info["token"])

        print(f"creating a {args.tasks}-task classification project (64 px shapes) ...", flush=True)
        images = generate_shapes(work / "images", n=args.tasks, seed=3, size=64, max_objects=1)
        config = label_config("classification")
        project = api.create_project("soak benchmark", config)["id"]
        paths = [images.images_dir / im.file for im in images.images]
        for start in range(0, len(paths), 50):
            api.upload_images(project, paths[start : start + 50])
        tasks = api.tasks(project)
        api.connect_backend(project, backend.url, auth_method="BASIC_AUTH", basic_auth_user=user,
                            basic_auth_pass=password)
        api.install_webhook_secret(project, backend.url, secret)
        truth = {t["id"]: next(im for im in images.images if t["data"]["image"].endswith(im.file)) for t in tasks}
        results = [(t["id"], to_label_studio_result(truth[t["id"]], "classification")) for t in tasks]

        client = httpx.Client(base_url=backend.url, auth=auth, timeout=30)
        print(f"annotating {args.labeled} tasks and waiting for the first model to serve ...", flush=True)
        for task_id, result in results[: args.labeled]:
            api.annotate(task_id, result)
        deadline = time.monotonic() + 900
        while not client.get("/versions", params={"project": project}).json()["serving"].get(str(project)):
            if time.monotonic() > deadline:
                raise RuntimeError("no model served within 15 minutes of the first annotations")
            time.sleep(1)
        first_version = client.get("/versions", params={"project": project}).json()["serving"][str(project)]
        # one /predict loads the model into the backend: "RSS at start" is the serving baseline
        warm = client.post("/predict", json={"tasks": tasks[:8], "project": str(project), "label_config": config})
        assert warm.status_code == 200, f"warm-up /predict -> {warm.status_code}: {warm.text[:300]}"

        print(f"soaking for {args.minutes:g} min (first model {first_version}) ...", flush=True)
        rec = Recorder()
        started_at = time.time()
        uid = f"{project}.{int(started_at)}"
        threads = [threading.Thread(target=sample_loop, args=(rec, stop, backend.process.pid, worker.process.pid,
                                                              args.sample_every), daemon=True)]
        threads += [threading.Thread(target=predict_loop, args=(rec, stop, backend.url, auth, tasks, uid, config, i,
                                                                args.predict_pause), daemon=True)
                    for i in range(args.predict_threads)]
        threads.append(threading.Thread(target=webhook_loop, daemon=True, args=(
            rec, stop, backend.url, secret, WEBHOOK_SECRET_HEADER, project, [t["id"] for t in tasks],
            args.webhook_rate, args.forged_every)))
        threads.append(threading.Thread(target=annotate_loop, daemon=True, args=(
            rec, stop, api, list(results[args.labeled:]), args.annotate_every)))
        for thread in threads:
            thread.start()
        next_note = 60.0
        while rec.now() < seconds:
            time.sleep(min(1.0, seconds - rec.now()))
            if rec.now() >= next_note:
                with rec.lock:
                    mb = next((r[1] for r in reversed(rec.rss) if r[1] is not None), None)
                    n_hooks, n_pred = len(rec.webhooks), len(rec.predicts)
                print(f"  {rec.now() / 60:4.1f} min: backend RSS {fmt(mb, ' MB')}, {n_hooks} webhooks, "
                      f"{n_pred} /predict", flush=True)
                next_note += 60
            if backend.process.poll() is not None:
                print("the backend process exited during the soak", flush=True)
                break
        stop.set()
        for thread in threads:
            thread.join(timeout=70)
        elapsed = rec.now()
        rec.add("rss", rss_mb(backend.process.pid), rss_mb(worker.process.pid, tree=True))
        try:
            jobs = client.get("/jobs", params={"project": project, "limit": 1000}).json()["jobs"]
        except Exception as exc:
            print(f"GET /jobs failed: {exc}", flush=True)
            jobs = []
        backend_alive = backend.process.poll() is None
        ok = True
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the load and the stack ...", flush=True)
        return 130
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
        for process in reversed(started):
            process.stop()
        stop_leftovers()
        if ok and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work directory (logs, data) kept: {work}", flush=True)

    summary = summarize(rec, elapsed, warmup_s, jobs, started_at)
    reasons = verdict(summary, args.max_slope)
    if not backend_alive:
        reasons.insert(0, "the backend process died during the soak")
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    when = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    kind = "validation run" if args.validation else "run"
    title = f"## {kind.capitalize()} {when} ({machine()}, {elapsed / 60:.1f} min)"
    setup = (f"{len(tasks)}-task classification project (64 px shapes), {args.labeled} labeled before the start, "
             f"{args.epochs} epochs, one worker on both queues; /predict of 8 tasks from {args.predict_threads} "
             f"threads back to back; {args.webhook_rate:g} webhooks/s (every {args.forged_every}th forged); "
             f"one annotation every {args.annotate_every:g} s; basic auth and webhook secret on.")
    verdict_line = "**pass**" if not reasons else "**FAIL**: " + "; ".join(reasons)
    text = table(summary)
    print(f"\n{title[3:]}\n{setup}\n\n{text}\n\n{verdict_line}")

    figures = BENCH / "figures"
    figures.mkdir(exist_ok=True)
    md = figures / "soak.md"
    if not md.exists():
        md.write_text("# Soak: mixed /predict + webhooks + trainings on a real stack (`bench/soak.py`)\n\n"
                      "Backend memory should stay flat after the warm-up and webhooks answer within Label "
                      "Studio's 1 s. Plot of the latest run: `soak.png`.\n")
    with md.open("a") as out:
        out.write(f"\n{title}\n\n{setup}\n\n{text}\n\n{verdict_line}\n")
    out_dir = BENCH / "out"
    out_dir.mkdir(exist_ok=True)
    raw = out_dir / f"soak-{stamp}.json"
    raw.write_text(json.dumps({
        "args": vars(args), "machine": machine(), "started_at": started_at, "first_version": first_version,
        "summary": summary, "failures": reasons, "jobs": jobs,
        "samples": {"webhooks": rec.webhooks, "predicts": rec.predicts, "annotations": rec.annotations,
                    "rss": rec.rss},
    }, indent=1))
    png = figures / "soak.png"
    plot(rec, summary, jobs, started_at, png)
    print(f"\nappended to {md.relative_to(BENCH.parent)}; raw samples {raw.relative_to(BENCH.parent)}; "
          f"plot {png.relative_to(BENCH.parent)}")
    if reasons:
        print("soak FAILED: " + "; ".join(reasons), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
