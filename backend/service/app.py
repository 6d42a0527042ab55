"""The Label Studio face: the ML backend HTTP contract (Label Studio 1.23), auth, errors, metrics.

Endpoints: GET / and GET /health, POST /setup, POST /predict, POST /webhook, GET /versions, GET /events,
GET /metrics. The contract (request and response shapes, timeouts) is recorded in README.md.
Every request body is validated here; the engine (workflows/pipeline.py) only sees well-formed input.
A bad request gets a 4xx with ``{"error": "..."}`` and the server keeps serving.

Secure and bounded by default (README "Security"): ``labelloop serve`` refuses a non-loopback address
without basic auth unless LABELLOOP_INSECURE=true; /webhook checks LABELLOOP_WEBHOOK_SECRET when set,
honours START_TRAINING only from an authenticated caller, ignores projects it does not know and
rate-limits the jobs a project's events can start; /predict work runs in its own small thread pool so
/health, /webhook and /metrics keep answering in milliseconds while predictions run.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from labelloop import __version__
from labelloop.config import Settings
from labelloop.config import settings as current_settings
from labelloop.core import modeltests
from labelloop.core.labelconfig import parse_label_controls
from labelloop.core.predict import cached_model_count, loaded_versions
from labelloop.core.registry import Registry
from labelloop.errors import LabelloopError
from labelloop.labelstudio.client import WEBHOOK_SECRET_HEADER  # installed on the project's webhook by labelloop
from labelloop.labelstudio.media import MediaFetcher
from labelloop.service.guards import LimitBodyMiddleware, TokenBuckets, authorized, secret_ok
from labelloop.service.metrics import CONTENT_TYPE, ServiceMetrics, method_label
from labelloop.service.schemas import (
    MAX_ID,
    WEBHOOK_ACTIONS,
    BadRequest,
    ModelTestsRequest,
    PredictRequest,
    SetupRequest,
    WebhookRequest,
    contract,
    error,
    errors,
    json_body,
    project_key,
    read_json_object,
    validate_tasks,
    webhook_id,
)
from labelloop.workflows.drift_check import latest_reports
from labelloop.workflows.pipeline import (
    combined_version,
    control_source,
    model_source,
    predict_controls,
    predict_tasks,
    resolve_control_models,
    resolve_model,
)

log = logging.getLogger(__name__)

# Label Studio sends webhooks without any auth; "/" is upstream's alias of /health (label-studio-ml-backend
# answers both from one handler), open like /health and answering less: that the server is up, nothing else.
OPEN_PATHS = {"/", "/health", "/webhook"}
KNOWN_PATHS = {"/", "/health", "/setup", "/predict", "/webhook", "/versions", "/events", "/metrics", "/jobs"}
# Events that can change what the model should learn; START_TRAINING ("Start training") forces a try.
TRAINING_ACTIONS = {"ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED",
                    "START_TRAINING"}
NO_MODEL_VERSION = "labelloop-untrained"
KNOWN_PROJECTS_CAP = 10_000  # projects remembered from /setup (oldest forgotten first)


def create_app(env: Settings | None = None) -> FastAPI:
    env = env or current_settings()
    app = FastAPI(title="labelloop ML backend", version=__version__, docs_url=None, redoc_url=None)
    metrics = ServiceMetrics()
    registry = Registry(env.model_dir)
    fetcher = MediaFetcher.from_settings(env)
    schemas: dict[str, str] = {}  # project -> label config seen at /setup (fallback for /predict)
    setup_projects: dict[str, None] = {}  # projects seen at an (authenticated) /setup, oldest first
    events: deque[dict[str, Any]] = deque(maxlen=1000)  # validated scalars only (see webhook())
    buckets = TokenBuckets(env.trigger_burst, env.trigger_rate)
    # Prediction work (model load, image fetches, inference) gets its own few threads: with it in
    # the shared pool, a few slow /predicts took every thread and /webhook answers (1 s budget in
    # Label Studio) and /metrics waited behind them.
    predict_pool = ThreadPoolExecutor(max_workers=env.predict_workers, thread_name_prefix="labelloop-predict")
    app.router.on_shutdown.append(lambda: predict_pool.shutdown(wait=False, cancel_futures=True))
    auth_on = bool(env.basic_auth_user or env.basic_auth_pass)
    started = time.time()
    app.state.metrics, app.state.registry, app.state.events = metrics, registry, events
    jobs = _LazyJobStore()
    metrics.watch_jobs(jobs.list_quietly)
    metrics.watch_drift(functools.partial(latest_reports, registry))

    async def in_predict_pool(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(predict_pool, functools.partial(fn, *args))

    def known_project(project: str) -> bool:
        return project in setup_projects or project in registry.projects()

    @app.middleware("http")
    async def observe(request: Request, call_next):
        path = request.url.path
        endpoint = _endpoint_label(path)
        if path not in OPEN_PATHS and auth_on and not authorized(request, env):
            response = JSONResponse({"error": "authentication required"}, status_code=401,
                                    headers={"WWW-Authenticate": 'Basic realm="labelloop"'})
        else:
            t0 = time.perf_counter()
            try:
                response = await call_next(request)
            except Exception:  # last resort: log, answer, keep serving
                log.exception("unhandled error on %s", path)
                response = error(500, "internal error; see the backend log")
            metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
        metrics.requests.labels(endpoint, method_label(request.method), str(response.status_code)).inc()
        if response.status_code >= 400:
            metrics.errors.labels(endpoint, str(response.status_code)).inc()
        return response

    @app.exception_handler(LabelloopError)
    async def labelloop_error(_: Request, exc: LabelloopError):
        # one error base: a bad request, an unservable label config (422), an unknown version (404), ...
        return error(exc.http_status, str(exc))

    @app.exception_handler(404)
    async def not_found(request: Request, _exc):
        return error(404, f"no such endpoint: {request.method} {request.url.path}")

    @app.exception_handler(405)
    async def not_allowed(request: Request, exc):
        # RFC 9110: a 405 lists every method the path supports. Starlette's header names only the first route
        # that matched the path, so a path served by two routes (GET and PUT model-tests) is listed whole here.
        methods = sorted({m for route in app.routes if getattr(route, "path_regex", None) is not None
                          and route.path_regex.match(request.url.path) for m in (getattr(route, "methods", None) or ())})
        headers = {**(getattr(exc, "headers", None) or {}), **({"Allow": ", ".join(methods)} if methods else {})}
        return error(405, f"method {request.method} not allowed on {request.url.path}", headers or None)

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(_: Request, exc: RequestValidationError):
        # FastAPI's own check of typed query parameters (?limit=abc): the same {"error": ...} as the rest
        where = [f"{'.'.join(str(p) for p in e.get('loc', ())[1:])}: {e.get('msg', 'invalid')}" for e in exc.errors()]
        return error(422, "invalid request parameter: " + "; ".join(where)[:500])

    @app.get("/")
    async def root():
        # upstream's GET / is its /health: {"status": "UP", "model_class": ...}; ours says what to call next
        # and nothing about projects or models (those are /health's and /versions' business)
        return {"status": "UP", "model_class": "labelloop", "version": __version__, "health": "/health"}

    @app.get("/health")
    async def health():
        projects = {p: (registry.serving_info(p) or {}).get("version") for p in registry.projects()}
        return {
            "status": "UP",
            "model_class": "labelloop",
            "version": __version__,
            "uptime_s": round(time.time() - started, 1),
            "models": {p: v for p, v in projects.items() if v},
            "base_model": env.base_model or None,
            "model_ready": any(projects.values()) or bool(env.base_model),
            "loaded": loaded_versions(),  # warmed in memory: a /predict for these pays no load
        }

    warm_start_asked: set[str] = set()  # projects whose warm start this process queued (bounded below)

    def _ask_for_warm_start(project: str, spec, trigger: str) -> dict[str, Any] | None:
        """Queue the project's self-supervised warm start (classification trained from the recipe's own
        architecture) once: at connect and on imports. Never fails the request that asked."""
        if not spec.kind.whole_image or env.base_model or env.model_config or not env.warm_start_steps:
            return None
        if trigger == "setup" and (project in warm_start_asked or registry.has_warm_start(project)):
            return None
        from labelloop.tasks.jobs import request_warm_start

        if len(warm_start_asked) >= KNOWN_PROJECTS_CAP:
            warm_start_asked.clear()
        warm_start_asked.add(project)  # asked once per process even if the queue is down: /setup stays fast
        try:
            job, _ = request_warm_start(project, trigger, jobs.store())
        except Exception as exc:  # the queue is down: trainings simply start from scratch
            log.warning("project %s: warm start not queued: %s", project, exc)
            return None
        return job

    backlog_asked: set[tuple[str, str]] = set()  # (project, version) this process asked for (bounded below)

    def _ask_for_backlog(project: str, version: str) -> None:
        """The backlog prediction job of a project a base model serves (``request_backlog_prediction``:
        once per project and version, in Redis); never fails the /setup that asked."""
        if (project, version) in backlog_asked:
            return
        from labelloop.tasks.jobs import request_backlog_prediction

        try:
            job = request_backlog_prediction(project, version, "setup", jobs.store())
        except Exception as exc:  # the queue is down: the next /setup asks again
            log.warning("project %s: backlog predictions of %s not queued: %s", project, version, exc)
            return
        if len(backlog_asked) >= KNOWN_PROJECTS_CAP:
            backlog_asked.clear()
        backlog_asked.add((project, version))
        if job is not None:
            log.info("project %s: predictions of %s for its unlabeled tasks queued (job %s)", project, version,
                     job["id"])

    @app.post("/setup", openapi_extra=json_body(SetupRequest), responses=errors(400, 401, 413, 422))
    async def setup(request: Request):
        body = await read_json_object(request)
        schema = body.get("schema")
        if not isinstance(schema, str):
            raise BadRequest("'schema' (the label config XML) is required", 422)
        specs = parse_label_controls(schema)
        project = project_key(body.get("project"))
        if project:
            schemas[project] = schema
            # passed the auth middleware: Label Studio connected this project, its webhooks count
            setup_projects.pop(project, None)
            setup_projects[project] = None
            while len(setup_projects) > KNOWN_PROJECTS_CAP:
                setup_projects.pop(next(iter(setup_projects)))
        if len(specs) > 1:  # several controls: each answered from its own model (no warm start, no backlog job)
            return await run_in_threadpool(_setup_controls, project, specs)
        spec = specs[0]
        if project:
            await run_in_threadpool(_ask_for_warm_start, project, spec, "setup")
        source = await run_in_threadpool(model_source, registry, project, spec, env)
        if source is None:
            return {"model_version": NO_MODEL_VERSION, "model_ready": False,
                    "message": _no_model_message(project)}
        # Load and warm the model in the background: Label Studio gives /setup 3 s (ML_TIMEOUT_SETUP) and
        # a first load with its warm-up can take longer; a /predict arriving meanwhile waits for this load.
        if source[1] not in loaded_versions():  # Label Studio calls /setup before most requests: usually loaded
            loading = predict_pool.submit(resolve_model, registry, project, spec, env)
            loading.add_done_callback(functools.partial(_report_failed_load, source[1]))
        if project and registry.serving_info(project) is None:
            # a base model serves a project before its first training: its predictions for every unlabeled
            # task, queued once per (project, version), in the background (Label Studio waits 3 s at most)
            asyncio.get_running_loop().run_in_executor(None, _ask_for_backlog, project, source[1])
        return {"model_version": source[1], "model_ready": True, "task_type": spec.task_type}

    @app.post("/predict", openapi_extra=json_body(PredictRequest), responses=errors(400, 401, 413, 422))
    async def predict(request: Request):
        body = await read_json_object(request)
        tasks = validate_tasks(body.get("tasks"), env.max_tasks_per_predict)
        project = project_key(body.get("project"))
        config = body.get("label_config")
        if config is None and project in schemas:
            config = schemas[project]
        if not isinstance(config, str):
            raise BadRequest("'label_config' (string) is required unless /setup was called for this project", 422)
        specs = parse_label_controls(config)
        params = body.get("params")
        if params is not None and not isinstance(params, dict):
            raise BadRequest("'params' must be an object", 422)
        if not tasks:
            return {"results": []}
        if len(specs) > 1:
            return await _predict_controls(project, specs, tasks)
        spec = specs[0]
        t_model = time.perf_counter()
        model = await in_predict_pool(resolve_model, registry, project, spec, env)
        if model is None:
            metrics.no_model.inc()
            return {"results": [], "message": _no_model_message(project)}
        return await _predict_in_chunks(functools.partial(predict_tasks, spec=spec, model=model, fetcher=fetcher),
                                        tasks, t_model, {"model_version": model.version})

    async def _predict_in_chunks(predict_chunk, tasks, t_model: float, answer: dict[str, Any]) -> JSONResponse:
        """Run ``predict_chunk(tasks=…, timings=…)`` chunk by chunk in the predict pool; the Label Studio
        answer (``answer`` adds to it), metrics and the Server-Timing header."""
        t0 = time.perf_counter()
        timings: dict[str, float] = {"model": t0 - t_model}  # "model": loading (and warming) a version not in memory
        # In chunks: a big request holds a thread (and its images) one chunk at a time, and
        # concurrent requests take turns between chunks instead of waiting for a whole batch.
        chunk = max(1, env.predict_batch or 1) * 4
        preds = []
        for start in range(0, len(tasks), chunk):
            preds += await in_predict_pool(functools.partial(predict_chunk, tasks[start : start + chunk],
                                                             timings=timings))
        metrics.predict_seconds.observe(time.perf_counter() - t0)
        for phase, seconds in timings.items():
            metrics.predict_phase_seconds.labels(phase).observe(seconds)
        results = []
        for p in preds:
            item = p.to_label_studio()
            if p.error:
                item["error"] = p.error
                metrics.prediction_errors.labels(p.error_kind or "error").inc()
            else:
                metrics.predictions.labels(p.model_version).inc()
            results.append(item)
        metrics.models_loaded.set(cached_model_count())
        server_timing = ", ".join(f"{phase};dur={1000 * seconds:.1f}" for phase, seconds in timings.items())
        return JSONResponse({"results": results, **answer}, headers={"Server-Timing": server_timing})

    def _setup_controls(project: str | None, specs) -> dict[str, Any]:
        """/setup of a config with several servable controls: the combined version (``combined_version``)
        and each control's model; models load in the background as for one control."""
        sources = [control_source(registry, project, spec, env) for spec in specs]
        version = combined_version([s[1] if s else None for s in sources])
        controls = [{"from_name": spec.from_name, "task_type": spec.task_type,
                     "model_version": source[1] if source else None} for spec, source in zip(specs, sources)]
        if version is None:
            return {"model_version": NO_MODEL_VERSION, "model_ready": False, "controls": controls,
                    "message": _no_model_message(project)}
        if any(s is not None and s[1] not in loaded_versions() for s in sources):
            loading = predict_pool.submit(resolve_control_models, registry, project, specs, env)
            loading.add_done_callback(functools.partial(_report_failed_load, version))
        return {"model_version": version, "model_ready": True, "task_types": [spec.task_type for spec in specs],
                "controls": controls}

    async def _predict_controls(project: str | None, specs, tasks) -> JSONResponse:
        t_model = time.perf_counter()
        served, skipped, version = await in_predict_pool(resolve_control_models, registry, project, specs, env)
        if not served:
            metrics.no_model.inc()
            return JSONResponse({"results": [], "message": "; ".join(skipped) or _no_model_message(project)})
        answer: dict[str, Any] = {"model_version": version}
        if skipped:
            answer["message"] = "; ".join(skipped)
        return await _predict_in_chunks(functools.partial(predict_controls, served=served, fetcher=fetcher,
                                                          version=version, env=env), tasks, t_model, answer)

    @app.post("/webhook", openapi_extra=json_body(WebhookRequest),
              responses=errors(400, 401, 403, 413, 422, 429, 503))
    async def webhook(request: Request):
        # An untrusted hint unless authenticated: Label Studio's webhooks carry only the headers set on
        # the webhook (our secret, when labelloop installed it); "Start training" comes through its ML
        # connector, which sends the backend's basic auth. Validate, keep scalars, answer fast.
        authenticated = (secret_ok(request, env) if env.webhook_secret else False) or \
            (auth_on and authorized(request, env))
        # No secret and no basic auth configured: an open service by the operator's choice (loopback, or
        # LABELLOOP_INSECURE), where nobody can authenticate; the local stack's "Start training" must work.
        open_service = not env.webhook_secret and not auth_on
        if env.webhook_secret and not authenticated:
            metrics.webhooks_refused.labels("unauthenticated").inc()
            return error(401, f"webhook not authenticated: the {WEBHOOK_SECRET_HEADER} header must carry "
                              "LABELLOOP_WEBHOOK_SECRET (labelloop installs it on the project's Label Studio "
                              "webhook) or the request must carry the backend's basic auth")
        body = await read_json_object(request)
        action = body.get("action")
        if not isinstance(action, str) or not action:
            raise BadRequest("'action' (string) is required", 422)
        if action not in WEBHOOK_ACTIONS:
            raise BadRequest(f"unknown webhook action {action[:64]!r}", 422)
        project = body.get("project")
        project_id = project.get("id") if isinstance(project, dict) else project
        if isinstance(project_id, bool) or not isinstance(project_id, int):
            raise BadRequest("'project.id' (integer) is required", 422)
        if webhook_id(project_id) is None:
            raise BadRequest(f"'project.id' must be a positive integer below {MAX_ID}", 422)
        if action == "START_TRAINING" and not (authenticated or open_service):
            metrics.webhooks_refused.labels("start_training_unauthenticated").inc()
            return error(403, "START_TRAINING refused: it forces a training, so it is honoured only from an "
                              "authenticated caller; set BASIC_AUTH_USER/PASS here and in Label Studio's model "
                              "connection (its Start training button sends them), or send the "
                              f"{WEBHOOK_SECRET_HEADER} header with LABELLOOP_WEBHOOK_SECRET set")
        if not known_project(str(project_id)):
            metrics.webhooks_refused.labels("unknown_project").inc()
            return {"status": "ignored", "action": action, "project": project_id,
                    "reason": f"project {project_id} is unknown to this backend: it becomes known when Label "
                              "Studio calls /setup for it (connect the backend to the project) or once it has "
                              "a model in the registry"}
        serving = registry.serving(str(project_id)) if action == "TASKS_CREATED" else None
        if action in TRAINING_ACTIONS or action == "TASKS_CREATED":  # this event would start (or join) a job
            wait = buckets.take(str(project_id))
            if wait > 0:
                metrics.webhooks_refused.labels("rate_limited").inc()
                retry = max(1, math.ceil(wait))
                return JSONResponse(
                    {"error": f"too many job-triggering events for project {project_id}: at most "
                              f"{env.trigger_burst} at once, then {env.trigger_rate:g} per second "
                              f"(LABELLOOP_TRIGGER_BURST, LABELLOOP_TRIGGER_RATE); retry in {retry} s"},
                    status_code=429, headers={"Retry-After": str(retry)})
        # Only validated scalars are kept: a body can be megabytes of anything.
        event: dict[str, Any] = {"action": action, "project": str(project_id), "received_at": time.time(),
                                 "authenticated": authenticated}
        for field in ("annotation", "task"):
            value = webhook_id(body[field].get("id")) if isinstance(body.get(field), dict) else None
            if value is not None:
                event[field] = value
        events.append(event)
        metrics.webhooks.labels(action).inc()
        answer = {"status": "accepted", "action": action, "project": project_id}
        if action in TRAINING_ACTIONS:
            from labelloop.tasks.jobs import request_training

            try:
                job, created = await run_in_threadpool(request_training, str(project_id), action,
                                                       action == "START_TRAINING", jobs.store())
            except Exception as exc:  # Redis (the queue) is down: say so at once, count the lost event
                metrics.webhooks_dropped.labels(action).inc()
                log.error("webhook %s for project %s dropped: job queue unavailable: %s", action, project_id, exc)
                return error(503, f"job queue unavailable, event not queued: {type(exc).__name__}: {exc}")
            answer.update(job=job["id"], coalesced=not created)
        elif serving is not None:
            # new tasks get the served version's predictions without anyone pressing a button
            from labelloop.tasks.jobs import request_prediction

            version = serving.version
            try:
                job = await run_in_threadpool(request_prediction, str(project_id), version, action, jobs.store())
            except Exception as exc:
                metrics.webhooks_dropped.labels(action).inc()
                return error(503, f"job queue unavailable, event not queued: {type(exc).__name__}: {exc}")
            answer.update(job=job["id"])
        if action == "TASKS_CREATED" and str(project_id) in schemas:
            # new images: the warm start is rebuilt when the project has grown enough (build_warm_start)
            controls = parse_label_controls(schemas[str(project_id)])
            warm = None if len(controls) > 1 else \
                await run_in_threadpool(_ask_for_warm_start, str(project_id), controls[0], action)
            if warm is not None:
                answer.update(warm_start_job=warm["id"])
        return answer

    @app.get("/jobs", responses=errors(401, 422, 503))
    async def list_jobs(project: str | None = None, limit: int = 50):
        key = project_key(project) if project else None
        try:
            found = await run_in_threadpool(jobs.store().list, key, max(1, min(limit, 1000)))
        except Exception as exc:
            return error(503, f"job store unavailable: {exc}")
        return {"jobs": found}

    @app.get("/jobs/{job_id}", responses=errors(401, 404, 422, 503))
    async def get_job(job_id: str):
        if not (job_id.isascii() and job_id.isalnum()) or len(job_id) > 64:
            raise BadRequest("invalid job id", 422)
        try:
            job = await run_in_threadpool(jobs.store().get, job_id)
        except Exception as exc:
            return error(503, f"job store unavailable: {exc}")
        if job is None:
            return error(404, f"no job {job_id}")
        return job

    @app.post("/versions/{version}/promote", responses=errors(401, 404, 422))
    async def promote(version: str):
        """Serve an earlier (or a kept-out) version: rollback. Its predictions then flow to Label Studio."""
        from labelloop.tasks.jobs import promote_version  # the CLI's promote and rollback do the same

        return await run_in_threadpool(promote_version, registry, version, "promoted through the API", "api",
                                       jobs.store())

    @app.get("/projects/{project}/model-tests", responses=errors(401, 422))
    async def get_model_tests(project: str):
        """The project's model tests: what every new version must pass on the tuning split to serve."""
        key = project_key(project, "project") or ""
        tests = await run_in_threadpool(modeltests.load_suite, registry.project_dir(key))
        costs = await run_in_threadpool(modeltests.load_costs, registry.project_dir(key))
        return {"project": key, **modeltests.suite_json(tests), **({"costs": costs.to_json()} if costs else {})}

    @app.put("/projects/{project}/model-tests", openapi_extra=json_body(ModelTestsRequest),
             responses=errors(400, 401, 413, 422))
    async def put_model_tests(project: str, request: Request):
        """Replace the project's model tests (an empty list removes them); checked against the project's
        labels when this backend has its label config."""
        key = project_key(project, "project") or ""
        body = await read_json_object(request)
        if "tests" not in body or set(body) - {"tests", "costs"}:
            raise BadRequest('expected {"tests": [...], "costs": {...} (optional)} and nothing else', 422)
        specs = parse_label_controls(schemas[key]) if key in schemas else None
        labels = specs[0].labels if specs and len(specs) == 1 else None
        tests = modeltests.parse_suite(body, labels)
        costs = modeltests.parse_costs(body.get("costs"), labels)
        if specs and len(specs) == 1:
            modeltests.check_kind(specs[0].kind, [*tests, *([costs] if costs else [])])
        await run_in_threadpool(modeltests.save_suite, registry.project_dir(key), tests, costs)
        return {"project": key, **modeltests.suite_json(tests), **({"costs": costs.to_json()} if costs else {})}

    @app.get("/events", responses=errors(401, 422))
    async def list_events(project: str | None = None, limit: int = 100):
        chosen = [e for e in events if project is None or e["project"] == str(project)]
        return {"events": chosen[-max(0, min(limit, 1000)):]}

    @app.get("/versions", responses=errors(401, 422))
    async def versions(project: str | None = None):
        # Label Studio's GET /api/ml/{id}/versions calls GET /versions with nothing that names the project
        # (ml/api_connector.py get_versions: its {'project': uid} is a POST body, dropped for a GET). So the
        # answer is one project's or none: ?project=<id>; else the one project this backend knows (through
        # /setup or the registry); with several, no versions and a message, never a mix of projects.
        key = project_key(project) if project else None
        message = None
        if key is None:
            known = sorted(set(registry.projects()) | set(setup_projects))
            if len(known) == 1:
                key = known[0]
            elif known:
                message = (f"this backend serves {len(known)} projects and the request names none: "
                           "ask for one with ?project=<id>")
        manifests = sorted(registry.versions(key), key=lambda m: m.created_at, reverse=True) if key else []
        serving = (registry.serving_info(key) or {}).get("version") if key else None
        answer: dict[str, Any] = {
            "project": key,
            "versions": [m.version for m in manifests],
            "serving": {key: serving} if key and serving else {},
            "details": [{**m.to_json(), "serving": m.version == serving} for m in manifests],
        }
        if message:
            answer["message"] = message
        return answer

    @app.get("/metrics", response_class=Response,
             responses={200: {"description": "Prometheus text format", "content": {"text/plain": {}}}, **errors(401)})
    async def prometheus():
        # rendering reads the job store (Redis): off the event loop, so a slow Redis stalls only this
        return Response(await run_in_threadpool(metrics.render), media_type=CONTENT_TYPE)

    app.openapi = lambda: contract(app, env)
    return app


class _LazyJobStore:
    """One Redis connection pool per service process, made on first use (Redis may start later)."""

    def __init__(self):
        self._store = None

    def store(self):
        if self._store is None:
            from labelloop.tasks.jobstore import JobStore

            self._store = JobStore()
        return self._store

    def list_quietly(self) -> list[dict[str, Any]]:
        try:
            return self.store().list(limit=200)
        except Exception:
            return []


def _report_failed_load(version: str, future) -> None:
    """A background load that failed is logged; the next /predict loads again and answers with the reason."""
    if not future.cancelled() and future.exception() is not None:
        log.warning("loading %s failed: %s", version, future.exception())


def _no_model_message(project: str | None) -> str:
    return (f"no model yet for project {project}: annotate some tasks so labelloop can train one, "
            "or set LABELLOOP_BASE_MODEL to an ultralytics .pt file")


def _endpoint_label(path: str) -> str:
    """A fixed set of label values: a label per invented path would grow the metrics without end."""
    if path in KNOWN_PATHS:
        return path
    if path.startswith("/jobs/"):
        return "/jobs/{id}"
    if path.startswith("/versions/") and path.endswith("/promote"):
        return "/versions/{version}/promote"
    return "other"


def build_app_with_limits(env: Settings | None = None):
    """The ASGI app as served: the FastAPI app wrapped by the body-size limit."""
    env = env or current_settings()
    return LimitBodyMiddleware(create_app(env), env.max_body_bytes,
                               {"/webhook": (env.max_webhook_bytes, "LABELLOOP_MAX_WEBHOOK_MB")})
