"""``labelloop`` command line: serve the ML backend, run workers, connect projects, train, predict and
promote through the loop, generate data, run the demo.

Exit codes: 0 done; 1 failed (a job that failed, with its reason); 2 something needed does not answer or
refuses us (Label Studio, Redis, credentials); 3 what was named does not exist (project, version, no
versions, nothing to roll back; a followed job that was skipped). Errors are one line, no traceback."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from labelloop import __version__
from labelloop.config import is_weights_name, settings
from labelloop.errors import LabelloopError

log = logging.getLogger("labelloop.cli")


def _progress_bar(desc: str):
    from tqdm import tqdm

    bar = tqdm(total=100, desc=desc, unit="%", bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")

    def update(fraction: float, message: str) -> None:
        bar.n = int(round(100 * min(1.0, max(0.0, fraction))))
        bar.set_postfix_str(message[:80])
        bar.refresh()

    return bar, update


def fetch_named_base_model() -> Path | None:
    """LABELLOOP_BASE_MODEL=yolo11n.pt, a model name that is no local file: fetched into MODEL_ROOT before
    the service or a worker starts (config reads the name as MODEL_ROOT/<name>), so no Label Studio
    request waits for a download. Offline or failed: logged with what to do, and the process starts anyway
    (versions trained by labelloop do not need it). Returns the file when it is there."""
    import os

    name = os.environ.get("LABELLOOP_BASE_MODEL", "").strip()
    env = settings()
    if name and Path(env.base_model).is_file():
        return Path(env.base_model)
    if not name or not is_weights_name(name):
        return None  # unset, or a path: the service reports a missing file itself
    from labelloop.core.yolo_env import fetch_weights

    try:
        return fetch_weights(name, env.model_root, offline=env.offline, what="LABELLOOP_BASE_MODEL")
    except LabelloopError as exc:
        log.error("%s; starting without it: projects that need the base model get an error at /setup", exc)
        return None


def cmd_serve(args) -> int:
    import uvicorn

    from labelloop.service.guards import bind_refusal

    env = settings()
    refusal = bind_refusal(args.host, env)
    if refusal:  # secure by default: no unauthenticated backend on a reachable address by accident
        print(f"labelloop serve: {refusal}", file=sys.stderr)
        return 2
    fetch_named_base_model()
    if env.insecure and not env.basic_auth_user:
        logging.getLogger("labelloop").warning("LABELLOOP_INSECURE=true: serving on %s without authentication",
                                               args.host)
    uvicorn.run("labelloop.service.app:build_app_with_limits", factory=True, host=args.host, port=args.port,
                log_level=settings().log_level.lower(), access_log=args.access_log)
    return 0


def cmd_install_webhook_secret(args) -> int:
    """Add LABELLOOP_WEBHOOK_SECRET to the webhook Label Studio made when the backend was connected."""
    from labelloop.labelstudio.client import StudioClient, StudioError

    env = settings()
    if not env.webhook_secret:
        print("LABELLOOP_WEBHOOK_SECRET is not set: nothing to install", file=sys.stderr)
        return 2
    try:
        hook = StudioClient.from_settings(env).install_webhook_secret(args.project, args.backend_url,
                                                                      env.webhook_secret)
    except StudioError as exc:
        print(f"cannot install the webhook secret: {exc}", file=sys.stderr)
        return 1
    print(f"webhook {hook.get('id')} of project {args.project} ({hook.get('url')}) now sends the secret header")
    return 0


QUEUES = {"train": "labelloop.train", "predict": "labelloop.predict"}


def cmd_worker(args) -> int:
    """Become a Celery worker (exec), with defaults that suit torch jobs."""
    import os
    import socket

    names = [q.strip() for q in args.queues.split(",") if q.strip()]
    unknown = [q for q in names if q not in QUEUES]
    if unknown:
        print(f"unknown queue(s) {unknown}; choose from {sorted(QUEUES)}", file=sys.stderr)
        return 2
    hostname = args.hostname or f"{'+'.join(names)}@{socket.gethostname()}"
    fetch_named_base_model()  # before exec: the children that train start from it
    argv = [sys.executable, "-m", "celery", "-A", "labelloop.tasks.celery_app:app", "worker",
            "-Q", ",".join(QUEUES[q] for q in names), "-c", str(args.concurrency), "--pool", args.pool,
            # torch keeps memory between jobs: recycle the child process now and then
            "--max-tasks-per-child", str(args.max_tasks_per_child),
            "--max-memory-per-child", str(args.max_memory_mb * 1024),
            "-n", hostname, "--loglevel", settings().log_level, "-E"]
    print("exec:", " ".join(argv), flush=True)
    os.execv(sys.executable, argv)
    return 0  # not reached


def flower_command(host: str, port: int, env=None) -> tuple[list[str], dict[str, str]]:
    """argv and environment of Celery Flower over labelloop's broker: the jobs, workers and queues live.

    The basic-auth pair goes through Flower's own FLOWER_BASIC_AUTH variable, not argv, so it never
    shows in the process list.
    """
    import os

    env = env or settings()
    argv = [sys.executable, "-m", "celery", "-A", "labelloop.tasks.celery_app:app", "flower",
            f"--address={host}", f"--port={port}", "--url_prefix=", "--purge_offline_workers=300"]
    child_env = {k: v for k, v in os.environ.items() if k not in ("FLOWER_BASIC_AUTH", "FLOWER_UNAUTHENTICATED_API")}
    if env.basic_auth_user:
        child_env["FLOWER_BASIC_AUTH"] = f"{env.basic_auth_user}:{env.basic_auth_pass}"
    else:  # loopback (or LABELLOOP_INSECURE): as trusted as `labelloop serve` there; Flower 2 hides its API otherwise
        child_env["FLOWER_UNAUTHENTICATED_API"] = "true"
    return argv, child_env


def cmd_flower(args) -> int:
    """Become Celery Flower (exec); loopback only unless basic auth is set, like `labelloop serve`."""
    import os

    from labelloop.service.guards import bind_refusal

    refusal = bind_refusal(args.host, settings())
    if refusal:
        print(f"labelloop flower: {refusal}", file=sys.stderr)
        return 2
    argv, child_env = flower_command(args.host, args.port)
    print("exec:", " ".join(argv), flush=True)
    os.execve(sys.executable, argv, child_env)
    return 0  # not reached


def cmd_data_shapes(args) -> int:
    from tqdm import tqdm

    from labelloop.dev.shapes import generate_shapes

    with tqdm(total=args.n, desc="generating shapes", unit="img") as bar:
        dataset = generate_shapes(args.out, n=args.n, seed=args.seed, size=args.size, noise=args.noise,
                                  max_objects=args.max_objects, progress=lambda done, total: bar.update(1))
    print(f"{len(dataset.images)} images in {dataset.images_dir}; ground truth in {Path(args.out) / 'shapes.json'}"
          f"; {len(dataset.corruptions)} injected label errors")
    return 0


# -- ops: connect a project, its versions, and jobs through the loop's queue ------------------------------

EXIT_FAILED, EXIT_UNREACHABLE, EXIT_NOT_FOUND = 1, 2, 3
DEFAULT_BACKEND_URL = "http://127.0.0.1:9090"
FRIENDLY_RETRIES = (1.0,)  # a person at a terminal: one retry after 1 s, not a job's 15 s of backoff
WAIT_POLL_S = 0.5


class Unreachable(LabelloopError):
    """Something the command needs does not answer, or refuses our credentials (exit 2)."""

    kind, http_status = "unreachable", 503


class NotFound(LabelloopError):
    """No such project, version, or nothing of the kind asked for (exit 3)."""

    kind, http_status = "not_found", 404


def exit_code_of(exc: LabelloopError) -> int:
    """2: a service is unreachable, misconfigured or refuses us; 3: what was named does not exist; 1: else."""
    from labelloop.labelstudio.client import StudioError

    status = exc.status if isinstance(exc, StudioError) else exc.http_status
    if status == 404:
        return EXIT_NOT_FOUND
    if isinstance(exc, Unreachable) or (isinstance(exc, StudioError) and status in (None, 401, 403)):
        return EXIT_UNREACHABLE
    return EXIT_FAILED


def _studio(env=None):
    from labelloop.labelstudio.client import StudioClient

    # the one retry is not worth a warning line of its own here: the error, if any, says how many attempts
    logging.getLogger("labelloop.labelstudio.client").setLevel(logging.ERROR)
    return StudioClient.from_settings(env, retry_delays=FRIENDLY_RETRIES)


def _masked(url: str) -> str:
    import re

    return re.sub(r"//[^@/]*@", "//***@", url)


def _job_store():
    """The job store, once Redis answers (else one line: Unreachable)."""
    import redis

    from labelloop.tasks.jobstore import JobStore

    url = settings().redis_url
    store = JobStore()
    try:
        store.r.ping()
    except redis.RedisError as exc:
        raise Unreachable(f"Redis (the job queue) at {_masked(url)} does not answer: {exc}; set REDIS_URL "
                          "to the Redis the workers use (`eval \"$(labelloop stack env)\"` for the local stack)") from None
    return store


def _queued(request, *args, **kwargs):
    """A request_* call of tasks.jobs, with a broker that fails between the ping and the send as one line."""
    import redis
    from kombu.exceptions import OperationalError

    try:
        return request(*args, **kwargs)
    except (redis.RedisError, OperationalError) as exc:
        raise Unreachable(f"the job queue refused the job: {exc}") from None


def _check_project(project: int, env=None) -> dict:
    """The Label Studio project (raises StudioError: 404 → exit 3, unreachable → exit 2)."""
    with _studio(env) as client:
        return client.project(project)


def cmd_connect(args) -> int:
    """Connect this backend to a Label Studio project the way Settings → Model → Connect Model does, then
    what the UI leaves to do: the webhook's secret header, uncertainty sampling, the served model version."""
    from labelloop.labelstudio.client import StudioError

    env = settings()
    backend_url = args.backend_url.rstrip("/")
    auth = (env.basic_auth_user, env.basic_auth_pass) if env.basic_auth_user else None
    with _studio(env) as client:
        info = client.project(args.project)
        print(f"project {args.project} ({info.get('title', '')!r}) in Label Studio at {client.url}")
        connection, created = client.connect_ml_backend(args.project, backend_url, basic_auth=auth)
        others = [b for b in client.ml_backends(args.project) if b.get("id") != connection.get("id")]
        print(f"ML backend {backend_url}: {'connected' if created else 'already connected, settings refreshed'}"
              f" (connection {connection.get('id')}, {'basic auth' if auth else 'no auth'})")
        if others:
            print(f"  note: the project has {len(others)} other ML backend(s) ("
                  + ", ".join(str(b.get("url")) for b in others) + "); Label Studio asks only the first one")
        hook, done = client.ensure_webhook(args.project, backend_url, env.webhook_secret or None)
        header = " with the X-Labelloop-Webhook-Secret header" if env.webhook_secret else \
            " without a secret (LABELLOOP_WEBHOOK_SECRET is not set)"
        print(f"webhook {hook.get('url')}: {done}{header}")
        if info.get("sampling") != "Uncertainty sampling":
            client.set_sampling(args.project)
            print("sampling: set to Uncertainty sampling (Label All Tasks hands out the least confident task first)")
        else:
            print("sampling: Uncertainty sampling already")
        served = client.request("GET", f"/api/ml/{int(connection['id'])}").get("model_version") or ""
        current = client.project(args.project).get("model_version") or ""
        if not served or served == "labelloop-untrained":
            print("model version: nothing is served yet (no trained version, no base model); the first "
                  "training's predictions set it")
        elif current == served:
            print(f"model version: {served} already")
        else:
            try:
                client.set_model_version(args.project, served)
                print(f"model version: set to {served} (was {current or 'empty'})")
            except StudioError as exc:
                if exc.status != 400:
                    raise
                print(f"model version: stays {current or 'empty'} until Label Studio holds predictions of "
                      f"{served} (it accepts no other); the prediction job sets it when they are pushed"
                      " (`labelloop predict --project N` queues one)")
    return 0


def _primary(manifest) -> tuple[str, float | None]:
    from labelloop.core.kinds import kind_of

    try:
        name = kind_of(manifest.task).primary_metric
    except Exception:
        name = "primary"
    value = manifest.metrics.get("primary")
    return name, None if value is None else float(value)


def version_rows(registry, project: int | str, jobs: list[dict] | None = None) -> list[dict]:
    """The project's versions, newest first, each with whether it serves, its primary metric, its
    status (serving, promoted, promoted by hand, kept out) and why, and its date.

    The why comes from what recorded it: the serving pointer, the hand promotions, the training job's
    record (the gate's sentence; kept 14 days in Redis) — else from the lineage: a version some later
    version names as parent served when that one was trained.
    """
    manifests = registry.versions(project)
    serving_info = registry.serving_info(project) or {}
    serving = serving_info.get("version")
    by_hand: dict[str, dict] = {}
    for record in registry.manual_promotions(project):
        by_hand[record["version"]] = record
    gate: dict[str, dict] = {}
    for job in sorted(jobs or [], key=lambda j: j.get("created_at", 0)):
        if job.get("kind") == "train" and job.get("state") == "done" and job.get("version"):
            gate[job["version"]] = job
    parents = {m.parent for m in manifests if m.parent}
    rows = []
    for m in sorted(manifests, key=lambda m: m.number, reverse=True):
        name, value = _primary(m)
        job = gate.get(m.version)
        if m.version == serving:
            status, reason = "serving", serving_info.get("reason") or ""
        elif m.version in by_hand:
            status, reason = "promoted by hand", by_hand[m.version].get("reason") or ""
        elif job is not None:
            status = "promoted" if job.get("promoted") else "kept out"
            reason = job.get("reason") or ""
        elif m.version in parents:
            status, reason = "promoted", "served until a later version replaced it"
        else:
            status, reason = "kept out", "never served (the gate kept it out, or it was replaced before serving)"
        if job is not None and m.version in (serving, *by_hand) and job.get("reason"):
            reason = f"{reason}; trained: {job['reason']}" if reason and reason != job["reason"] else job["reason"]
        rows.append({"version": m.version, "serving": m.version == serving, "status": status, "reason": reason,
                     "metric": name, "value": value, "parent": m.parent, "created_at": m.created_at,
                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(m.created_at))})
    return rows


def _registry():
    from labelloop.core.registry import Registry

    return Registry(settings().model_dir)


def _jobs_quietly(project: int) -> list[dict]:
    """The project's job records if Redis answers (they add the gate's reasons), else none."""
    try:
        from labelloop.tasks.jobstore import JobStore

        return JobStore().list(str(project), limit=1000)
    except Exception:
        return []


def cmd_versions(args) -> int:
    registry = _registry()
    rows = version_rows(registry, args.project, _jobs_quietly(args.project))
    if not rows:
        raise NotFound(f"project {args.project} has no versions in {registry.root} (MODEL_DIR): train one with "
                       f"`labelloop train --project {args.project}` or annotate tasks")
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["version"]) for r in rows)
    for r in rows:
        metric = "-" if r["value"] is None else f"{r['metric']} {r['value']:.3f}"
        mark = "*" if r["serving"] else " "
        print(f"{mark} {r['version']:<{width}}  {metric:<20} {r['date']}  {r['status']}: {r['reason']}")
    return 0


def cmd_model_tests(args) -> int:
    """Show (or set, or clear) a project's model tests and the newest versions' results on them."""
    from labelloop.core import modeltests

    registry = _registry()
    folder = registry.project_dir(args.project)
    if args.set or args.clear:
        labels = None
        if args.set:
            try:
                raw = json.loads(Path(args.set).read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise modeltests.ModelTestError(f"cannot read {args.set}: {exc}") from None
            if not args.no_check:  # the project's labels and kind, from Label Studio
                from labelloop.core.labelconfig import parse_label_config
                from labelloop.labelstudio.client import StudioClient

                with StudioClient.from_settings() as client:  # the label config only, not the tasks
                    spec = parse_label_config(client.project(args.project)["label_config"])
                labels = spec.labels
            tests = modeltests.parse_suite(raw, labels)
            costs = modeltests.parse_costs(raw.get("costs") if isinstance(raw, dict) else None, labels)
            if labels is not None:
                modeltests.check_kind(spec.kind, [*tests, *([costs] if costs else [])])
        else:
            tests, costs = [], None
        path = modeltests.save_suite(folder, tests, costs)
        print(f"project {args.project}: {len(tests)} model test(s) in {path}; every new version runs them")
    tests = modeltests.load_suite(folder)
    rows = [m for m in sorted(registry.versions(args.project), key=lambda m: m.created_at, reverse=True)
            if m.model_tests][: args.last]
    if args.json:
        costs_now = modeltests.load_costs(folder)
        print(json.dumps({"tests": modeltests.suite_json(tests)["tests"],
                          "costs": costs_now.to_json() if costs_now else None,
                          "versions": {m.version: m.model_tests for m in rows}}, indent=2))
        return 0
    costs = modeltests.load_costs(folder)
    if not tests and costs is None:
        print(f"project {args.project} has no model tests: write a suite and `labelloop model-tests --project "
              f"{args.project} --set tests.json` (see README, Model tests)")
        return 0
    name_width = max([len("mean cost"), *(len(t.name) for t in tests)])
    print(f"{'test':<{name_width}}  {'bar':<34} " + " ".join(f"{m.version:>14}" for m in rows))
    for test in tests:
        cells = []
        for m in rows:
            result = next((r for r in m.model_tests.get("results", []) if r["name"] == test.name), None)
            value = "n/a" if result is None or result["value"] is None else format(result["value"], ".2f")
            cells.append("-" if result is None else f"{'ok' if result['passed'] else 'FAIL'} {value}")
        required = "" if test.required else " (advisory)"
        bar = modeltests.describe_bar(test) + required
        print(f"{test.name:<{name_width}}  {bar:<34} " + " ".join(f"{c:>14}" for c in cells))
    if costs is not None:
        cells = [format(m.model_tests["costs"]["cost"], ".3f") if "costs" in m.model_tests else "-" for m in rows]
        print(f"{'mean cost':<{name_width}}  {'per tuning task (lower is better)':<34} "
              + " ".join(f"{c:>14}" for c in cells))
    return 0


def _promote(registry, version: str, reason: str, by: str) -> int:
    from labelloop.tasks.jobs import promote_version

    answer = promote_version(registry, version, reason, by)
    print(f"project {answer['project']}: {answer['serving']} serves now")
    if answer.get("prediction_job"):
        print(f"prediction job {answer['prediction_job']} queued: {version}'s predictions for the unlabeled tasks, "
              "then the project's model version")
    if answer.get("warning"):
        print(f"warning: {answer['warning']}", file=sys.stderr)
    return 0


def cmd_promote(args) -> int:
    from labelloop.core.registry import version_project

    registry = _registry()
    if version_project(args.version) != str(args.project):
        raise NotFound(f"{args.version} is not a version of project {args.project}")
    registry.get(args.project, args.version)  # RegistryError (exit 3) before anything moves
    return _promote(registry, args.version, _reason("promoted by hand (labelloop promote)", args.reason), "cli")


def cmd_rollback(args) -> int:
    registry = _registry()
    serving = registry.serving(args.project)
    if serving is None:
        raise NotFound(f"project {args.project} has no version in service: nothing to roll back")
    if not serving.parent:
        raise NotFound(f"nothing to roll back to: {serving.version} was the project's first version in service")
    known = {m.version for m in registry.versions(args.project)}
    if serving.parent not in known:
        raise NotFound(f"{serving.parent}, the version that served before {serving.version}, was removed by "
                       "retention; promote another with `labelloop promote`")
    return _promote(registry, serving.parent,
                    _reason(f"rollback from {serving.version} (labelloop rollback)", args.reason), "cli")


def _reason(what: str, why: str | None) -> str:
    return f"{what}: {why}" if why else what


def _wait(store, job_id: str, what: str, timeout: float | None) -> dict:
    """Follow a job record with a progress bar until it ends (or ``timeout`` seconds pass)."""
    from labelloop.tasks.jobstore import FINISHED

    bar, update = _progress_bar(what)
    deadline = None if not timeout else time.monotonic() + timeout
    try:
        while True:
            job = store.get(job_id) or {}
            state = job.get("state", "expired")
            update(float(job.get("progress") or 0.0), f"{state}: {job.get('message', '')}")
            if state in FINISHED or state == "expired":
                return job
            if deadline is not None and time.monotonic() > deadline:
                return {**job, "state": "timeout"}
            time.sleep(WAIT_POLL_S)
    finally:
        bar.close()


def _end_of(job: dict, job_id: str) -> int:
    """Print how a followed job ended; done → 0, failed/expired/timeout → 1, skipped → 3."""
    state = job.get("state")
    if state == "done":
        keep = ("version", "promoted", "reason", "metrics", "prediction_job", "counts", "message", "warning")
        print(json.dumps({"job": job_id, "state": state, **{k: job[k] for k in keep if k in job}}, indent=2))
        return 0
    if state == "skipped":
        print(f"labelloop: job {job_id} skipped: {job.get('reason')}", file=sys.stderr)
        return EXIT_NOT_FOUND
    if state == "timeout":
        print(f"labelloop: job {job_id} still {job.get('message') or 'queued'} after the --timeout; "
              "is a worker running (`labelloop worker`)?", file=sys.stderr)
        return EXIT_FAILED
    if state == "expired":
        print(f"labelloop: job {job_id} has no record any more (Redis restarted or flushed?)", file=sys.stderr)
        return EXIT_FAILED
    print(f"labelloop: job {job_id} failed: {job.get('reason')}", file=sys.stderr)
    return EXIT_FAILED


def cmd_train(args) -> int:
    """Ask the loop for a training: the pending slot and lock the webhooks use, forced like "Start training"."""
    from labelloop.tasks.jobs import request_training

    _check_project(args.project)
    store = _job_store()
    job, created = _queued(request_training, str(args.project), "cli", True, store)
    print(f"training job {job['id']} {'queued' if created else 'already pending: joined'} for project "
          f"{args.project} (GET /jobs/{job['id']} on the backend follows it)", flush=True)
    if not args.wait:
        return 0
    return _end_of(_wait(store, job["id"], f"training project {args.project}", args.timeout), job["id"])


def served_version(project: int, env=None) -> str:
    """The version that answers the project now: its trained version in service, else the base model's
    (``base-<stem>`` / ``custom-<stem>``, as /setup names it). NotFound when there is none."""
    from labelloop.core.labelconfig import parse_label_config
    from labelloop.workflows.pipeline import model_source

    env = env or settings()
    registry = _registry()
    serving = registry.serving(project)
    if serving is not None:
        return serving.version
    info = _check_project(project, env)
    source = model_source(registry, project, parse_label_config(info["label_config"]), env)
    if source is None:
        raise NotFound(f"project {project} has no model yet: no trained version in {registry.root} and no "
                       "LABELLOOP_BASE_MODEL (or model_path); annotate tasks or train one first")
    return source[1]


def cmd_predict(args) -> int:
    """Backlog prediction: every task without a human annotation gets the served version's prediction."""
    from labelloop.tasks.jobs import request_prediction_job

    _check_project(args.project)
    version = served_version(args.project)
    store = _job_store()
    job, created = _queued(request_prediction_job, str(args.project), version, "cli", store, countdown=0)
    print(f"prediction job {job['id']} {'queued' if created else 'already pending: joined'}: {version} for the "
          f"unlabeled tasks of project {args.project}", flush=True)
    if not args.wait:
        return 0
    return _end_of(_wait(store, job["id"], f"predicting project {args.project} with {version}", args.timeout),
                   job["id"])


def cmd_fiftyone_sync(args) -> int:
    from labelloop.fo.sync import sync_project

    bar, update = _progress_bar(f"syncing project {args.project}")
    runner = _celery_files() if args.celery and not args.no_predict else None
    report = sync_project(args.project, args.dataset, predict=not args.no_predict, progress=update, runner=runner)
    bar.close()
    print(json.dumps(report.__dict__, indent=2))
    return 0


def _celery_files():
    """The FiftyOne forward passes' Celery runner, once a worker takes the prediction queue."""
    from labelloop.tasks.jobs import predict_files_on_celery, prediction_workers

    if not prediction_workers():
        raise Unreachable("--celery: no worker takes the prediction queue (start `labelloop worker --queues predict`)")
    return predict_files_on_celery


def _celery_folds():
    from labelloop.tasks.jobs import run_folds_on_celery

    return run_folds_on_celery


def cmd_fiftyone_score(args) -> int:
    from labelloop.fo import analysis as fo_analysis
    from labelloop.fo.env import import_fiftyone

    fo = import_fiftyone()
    dataset = fo.load_dataset(args.dataset)
    bar, update = _progress_bar(args.analysis)
    try:
        if args.analysis == "mislabels":
            result = fo_analysis.compute_mislabel_scores(dataset, args.mode, args.folds, update,
                                                         fold_runner=_celery_folds() if args.celery else None)
        elif args.analysis == "uncertainty":
            result = fo_analysis.uncertainty_sampling(dataset, args.k, args.method, args.diversity, True, update)
            if args.send:
                result["label_studio"] = fo_analysis.send_to_label_studio(dataset.select(result["selected"]))
            result["selected"] = len(result["selected"])
        else:
            result = fo_analysis.compute_embeddings(dataset, args.method_2d, progress=update,
                                                    runner=_celery_files() if args.celery else None)
    except LabelloopError as exc:
        bar.close()
        print(f"cannot run {args.analysis}: {exc}", file=sys.stderr)
        return 1
    bar.close()
    print(json.dumps(result, indent=2, default=str))
    return 0


def cmd_fiftyone_plugin(args) -> int:
    """Link (or copy) the installed plugin into FiftyOne's plugins folder (fo/env.py: install_plugin)."""
    from labelloop.fo.env import install_plugin, plugin_source

    target = install_plugin(Path(args.dir) if args.dir else None, copy=args.copy)
    print(f"plugin {plugin_source()} installed at {target}")
    print(f"FiftyOne finds it when its plugins folder is {target.parent} (FIFTYONE_PLUGINS_DIR or plugins_dir in "
          "its config); to see labelloop's datasets too, point it at their MongoDB: "
          'eval "$(labelloop stack env)" (the local stack), or export FIFTYONE_DATABASE_URI')
    return 0


def cmd_delegated(args) -> int:
    """FiftyOne's delegated-operation service with labelloop's FiftyOne environment (fo/env.py)."""
    from labelloop.fo.env import database_answers, launch_delegated

    if args.check:  # the container's health check: the service has no port, its database must answer
        problem = database_answers()
        if problem:
            print(problem, file=sys.stderr)
        return 1 if problem else 0
    launch_delegated(monitor=args.monitor)
    return 0


def cmd_app(args) -> int:
    """FiftyOne's App server, its /media route limited to labelloop's media folders (fo/app.py)."""
    from labelloop.fo.app import serve_app

    serve_app(args.address, args.port)
    return 0


def cmd_stack(args) -> int:
    from labelloop.dev import stack

    if args.action == "up":
        state = stack.up(workers=not args.no_workers, app=not args.no_app)
        ls = state["label_studio"]
        print(f"Label Studio  {state['services']['label-studio']['url']}  login {ls['username']} / {ls['password']}"
              f"  (API token {ls['token']})")
        print(f"ML backend    {state['services']['backend']['url']}")
        if "flower" in state["services"]:
            print(f"Flower        {state['services']['flower']['url']}  (Celery jobs, workers, queues)")
        if "fiftyone" in state["services"]:
            print(f"FiftyOne App  {state['services']['fiftyone']['url']}")
        if "delegated" in state["services"]:
            print("FiftyOne delegated operations: `labelloop delegated` runs what the App schedules "
                  f"(log: {state['services']['delegated']['log']})")
        print('point this shell\'s labelloop commands at it: eval "$(labelloop stack env)"')
        print("stop everything with: labelloop stack down")
    elif args.action == "env":
        print(stack.shell_exports())
    elif args.action == "down":
        stack.down()
    elif args.action == "status":
        report = stack.status()
        for name, info in report.items():
            state = "running" if info["running"] else "stopped"
            health = "" if info.get("healthy") is None else (" healthy" if info["healthy"] else " UNHEALTHY")
            print(f"{name:15s} {state}{health}  {info.get('url') or ''}")
        return 0 if all(i["running"] for i in report.values()) else 3
    else:
        print(stack.log_tail(args.service, args.lines))
    return 0


def cmd_demo(args) -> int:
    from labelloop.dev.demo import run_demo

    return run_demo(args)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, except defaults that say nothing (None, False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """The parser of ``labelloop`` and, through add_subparsers' parser_class, of every subcommand."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="labelloop", description=__doc__)
    parser.add_argument("--version", action="version", version=f"labelloop {__version__}",
                        help="print labelloop's version and exit")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the Label Studio ML backend (HTTP)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on; any but loopback needs BASIC_AUTH_USER/PASS "
                            "or LABELLOOP_INSECURE=true")
    serve.add_argument("--port", type=int, default=9090, help="port to listen on")
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.set_defaults(func=cmd_serve)

    hook = sub.add_parser("install-webhook-secret",
                          help="make a project's Label Studio webhook send LABELLOOP_WEBHOOK_SECRET (after "
                               "connecting the backend in the Label Studio UI)")
    hook.add_argument("--project", required=True, type=int, help="Label Studio project id")
    hook.add_argument("--backend-url", required=True,
                      help="the backend URL as entered in Label Studio's model connection, e.g. http://backend:9090")
    hook.set_defaults(func=cmd_install_webhook_secret)

    worker = sub.add_parser("worker", help="run a Celery worker for training and/or prediction jobs")
    worker.add_argument("--queues", default="train,predict",
                        help="comma-separated: train (GPU-worthy), predict (CPU is fine)")
    worker.add_argument("--concurrency", type=int, default=1, help="jobs at once (each uses all its cores)")
    worker.add_argument("--pool", default="prefork", choices=["prefork", "solo", "threads"], help="Celery pool")
    worker.add_argument("--max-tasks-per-child", type=int, default=20,
                        help="recycle a child after this many jobs (torch keeps memory between jobs)")
    worker.add_argument("--max-memory-mb", type=int, default=6000, help="recycle a child above this resident size")
    worker.add_argument("--hostname", default=None, help="Celery node name (default <queues>@<host>)")
    worker.set_defaults(func=cmd_worker)

    flower = sub.add_parser("flower", help="Celery Flower: live jobs, workers and queues (basic auth as for serve)")
    flower.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; anything but loopback needs BASIC_AUTH_USER/_PASS")
    flower.add_argument("--port", type=int, default=5555)
    flower.set_defaults(func=cmd_flower)

    data = sub.add_parser("data", help="embedded data generators")
    data_sub = data.add_subparsers(dest="generator", required=True)
    shapes = data_sub.add_parser("shapes", help="synthetic shapes with exact ground truth and optional label noise")
    shapes.add_argument("--out", required=True, help="output directory")
    shapes.add_argument("--n", type=int, default=200, help="number of images")
    shapes.add_argument("--seed", type=int, default=0, help="image i depends only on (seed, i)")
    shapes.add_argument("--size", type=int, default=160, help="image side in pixels")
    shapes.add_argument("--noise", type=float, default=0.0, help="fraction of images with one injected label error")
    shapes.add_argument("--max-objects", type=int, default=4, help="most shapes in one image")
    shapes.set_defaults(func=cmd_data_shapes)

    connect = sub.add_parser("connect", help="connect the backend to a Label Studio project as the UI does, plus the "
                                             "webhook secret, uncertainty sampling and the served model version "
                                             "(idempotent)")
    connect.add_argument("--project", required=True, type=int, help="Label Studio project id")
    connect.add_argument("--backend-url", default=DEFAULT_BACKEND_URL,
                         help="the backend's URL as Label Studio reaches it (e.g. http://backend:9090 in Compose)")
    connect.set_defaults(func=cmd_connect)

    versions = sub.add_parser("versions", help="a project's model versions, newest first (* = serving)")
    versions.add_argument("--project", required=True, type=int, help="Label Studio project id")
    versions.add_argument("--json", action="store_true", help="print the rows as JSON")
    versions.set_defaults(func=cmd_versions)

    tests = sub.add_parser("model-tests", help="a project's model tests (promotion gates) and the newest versions' "
                                               "results on them; --set a suite from a JSON file")
    tests.add_argument("--project", required=True, type=int, help="Label Studio project id")
    tests.add_argument("--set", metavar="FILE", help='replace the suite with FILE ({"tests": [...]}, see README)')
    tests.add_argument("--clear", action="store_true", help="remove every test")
    tests.add_argument("--no-check", action="store_true",
                       help="with --set: do not read the project's labels from Label Studio to check the suite")
    tests.add_argument("--last", type=int, default=4, help="versions shown beside the tests")
    tests.add_argument("--json", action="store_true", help="print the suite and the results as JSON")
    tests.set_defaults(func=cmd_model_tests)

    promote = sub.add_parser("promote", help="serve a version (as POST /versions/{version}/promote) and queue its "
                                             "predictions")
    promote.add_argument("version", help="a version of the project, e.g. p3-v2")
    promote.add_argument("--project", required=True, type=int, help="Label Studio project id")
    promote.add_argument("--reason", default=None, help="why, kept with the promotion")
    promote.set_defaults(func=cmd_promote)

    rollback = sub.add_parser("rollback", help="serve the version that served before the current one (its parent) "
                                               "and queue its predictions")
    rollback.add_argument("--project", required=True, type=int, help="Label Studio project id")
    rollback.add_argument("--reason", default=None, help="why, kept with the promotion")
    rollback.set_defaults(func=cmd_rollback)

    train = sub.add_parser("train", help="queue a training of a project through the loop (the queue, pending slot "
                                         "and lock the webhooks use; forced like Start training)")
    train.add_argument("--project", required=True, type=int, help="Label Studio project id")
    train.add_argument("--wait", action="store_true", help="follow the job until it ends; exit 1 if it fails")
    train.add_argument("--timeout", type=float, default=None, help="with --wait: give up after this many seconds")
    train.set_defaults(func=cmd_train)

    predict = sub.add_parser("predict", help="queue predictions of the served version (or base model) for every "
                                             "task without a human annotation")
    predict.add_argument("--project", required=True, type=int, help="Label Studio project id")
    predict.add_argument("--wait", action="store_true", help="follow the job until it ends; exit 1 if it fails")
    predict.add_argument("--timeout", type=float, default=None, help="with --wait: give up after this many seconds")
    predict.set_defaults(func=cmd_predict)

    fo_cmd = sub.add_parser("fiftyone", help="the FiftyOne side: sync a project, run analyses, install the plugin")
    fo_sub = fo_cmd.add_subparsers(dest="fo_command", required=True)
    sync = fo_sub.add_parser("sync", help="create/update the FiftyOne dataset of a Label Studio project")
    sync.add_argument("--project", type=int, required=True)
    sync.add_argument("--dataset", default=None, help="dataset name (default labelloop-project-<id>)")
    sync.add_argument("--no-predict", action="store_true", help="do not predict with the version in service")
    sync.add_argument("--celery", action="store_true",
                      help="predict in chunks on the prediction workers (they must share the dataset's media folder)")
    sync.set_defaults(func=cmd_fiftyone_sync)
    score = fo_sub.add_parser("score", help="mislabels | uncertainty | embeddings on a synced dataset")
    score.add_argument("analysis", choices=["mislabels", "uncertainty", "embeddings"], help="what to compute")
    score.add_argument("--dataset", required=True, help="a dataset made by `labelloop fiftyone sync`")
    score.add_argument("--mode", choices=["in_sample", "out_of_sample"], default="in_sample",
                       help="mislabels: the served model's outputs, or K-fold models trained for it")
    score.add_argument("--folds", type=int, default=5, help="mislabels out_of_sample: number of folds")
    score.add_argument("--celery", action="store_true",
                       help="out-of-sample folds as Celery jobs (training queue); embeddings in chunks on the "
                            "prediction workers")
    score.add_argument("--method", choices=["least_confidence", "margin", "entropy"], default="least_confidence",
                       help="uncertainty: how a sample's uncertainty is measured")
    score.add_argument("--k", type=int, default=20, help="uncertainty: how many samples to pick")
    score.add_argument("--diversity", action="store_true", help="uncertainty: spread the pick over the embeddings")
    score.add_argument("--send", action="store_true", help="send the uncertainty pick to Label Studio as a tab")
    score.add_argument("--method-2d", choices=["umap", "pca"], default="umap", help="embeddings: the 2-D map")
    score.set_defaults(func=cmd_fiftyone_score)
    plugin = fo_sub.add_parser("install-plugin", help="link (or --copy) the installed plugin into FiftyOne's "
                                                      "plugins folder")
    plugin.add_argument("--dir", default=None,
                        help="target plugins folder (default: FiftyOne's own, $FIFTYONE_PLUGINS_DIR or plugins_dir "
                             "of its config, else ~/fiftyone/__plugins__)")
    plugin.add_argument("--copy", action="store_true", help="copy the plugin instead of linking it")
    plugin.set_defaults(func=cmd_fiftyone_plugin)

    app = sub.add_parser("app", help="run the FiftyOne App (with the plugin); /media serves only the datasets' "
                                     "media folders and LABELLOOP_APP_MEDIA_ROOTS")
    app.add_argument("--address", default="127.0.0.1", help="address to listen on (the App has no login)")
    app.add_argument("--port", type=int, default=5151, help="port to listen on")
    app.set_defaults(func=cmd_app)

    delegated = sub.add_parser("delegated", help="run the FiftyOne operations scheduled in the App (fiftyone "
                                                 "delegated launch, with labelloop's FiftyOne environment)")
    delegated.add_argument("--monitor", action="store_true",
                           help="run each operation in a child process watched by the service")
    delegated.add_argument("--check", action="store_true",
                           help="exit 0 if FiftyOne's database answers, else 1 (the service's health check)")
    delegated.set_defaults(func=cmd_delegated)

    stack_cmd = sub.add_parser("stack", help="the whole stack as local processes: up | down | status | logs | env")
    stack_cmd.add_argument("action", choices=["up", "down", "status", "logs", "env"],
                           help="env prints the exports that point a shell at the running stack")
    stack_cmd.add_argument("service", nargs="?", default="backend", help="for logs: which service")
    stack_cmd.add_argument("--lines", type=int, default=50, help="for logs: how many of the last lines")
    stack_cmd.add_argument("--no-workers", action="store_true", help="up: without the Celery workers")
    stack_cmd.add_argument("--no-app", action="store_true", help="up: without the FiftyOne App")
    stack_cmd.set_defaults(func=cmd_stack)

    demo = sub.add_parser("demo", help="the main job: the whole loop on the embedded data, with a report")
    demo.add_argument("--workdir", default=None, help="where data and the report go (default $LABELLOOP_HOME/demo)")
    demo.add_argument("--quick", action="store_true", help="fewer images and rounds: a few minutes on 2 CPU cores")
    demo.add_argument("--no-app", action="store_true", help="do not start the FiftyOne App")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, settings().log_level, logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per HTTP call drowns the CLI's own output
    try:
        return int(args.func(args) or 0)
    except LabelloopError as exc:  # our own errors say what to do: no traceback for them
        print(f"labelloop: {exc}", file=sys.stderr)
        return exit_code_of(exc)


if __name__ == "__main__":
    sys.exit(main())
