"""The Label Studio face: the ML backend HTTP contract (Label Studio 1.23), auth, errors, metrics.

Endpoints: GET /health, POST /setup, POST /predict, POST /webhook, GET /versions, GET /events,
GET /metrics. The contract (request and response shapes, timeouts) is recorded in README.md.
Every request body is validated here; the engine (pipeline.py) only sees well-formed input.
A bad request gets a 4xx with ``{"error": "..."}`` and the server keeps serving.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import secrets
import time
from collections import deque
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from . import __version__
from .config import Settings, settings as current_settings
from .labelconfig import LabelConfigError, parse_label_config
from .media import MediaFetcher
from .metrics import CONTENT_TYPE, ServiceMetrics
from .pipeline import predict_tasks, resolve_model
from .predict import cached_model_count
from .registry import Registry, RegistryError

log = logging.getLogger(__name__)

OPEN_PATHS = {"/health", "/webhook"}  # Label Studio sends webhooks without any auth
KNOWN_PATHS = {"/health", "/setup", "/predict", "/webhook", "/versions", "/events", "/metrics", "/jobs"}
# Events that can change what the model should learn; START_TRAINING ("Start training") forces a try.
TRAINING_ACTIONS = {"ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED",
                    "START_TRAINING"}
WEBHOOK_ACTIONS = {
    "ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED", "ANNOTATIONS_CREATED",
    "START_TRAINING", "TASKS_CREATED", "TASKS_DELETED", "PROJECT_CREATED", "PROJECT_UPDATED",
    "PROJECT_DELETED", "REVIEW_CREATED", "REVIEW_UPDATED", "REVIEWS_DELETED", "LABEL_LINK_CREATED",
    "LABEL_LINK_UPDATED", "LABEL_LINK_DELETED",
}
NO_MODEL_VERSION = "labelloop-untrained"


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class LimitBodyMiddleware:
    """Refuse bodies over the limit with 413, also when no Content-Length is sent (chunked)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _send_413(send, self.max_bytes)
        seen, exceeded = 0, False

        async def limited_receive():
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    exceeded = True  # the app sees a disconnect; the client gets our 413
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if not exceeded:
                await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded:
            await _send_413(send, self.max_bytes)


async def _send_413(send, max_bytes: int) -> None:
    body = json.dumps({"error": f"request body larger than {max_bytes // (1024 * 1024)} MB "
                                "(LABELLOOP_MAX_BODY_MB)"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


# -- request validation -----------------------------------------------------------------------------

async def read_json_object(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw:
        raise BadRequest("request body is empty; expected a JSON object")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(body).__name__}")
    return body


def project_key(value: Any, field: str = "project") -> str | None:
    """Label Studio's project uid "<id>.<created_at>" (or a bare id) → "<id>"; None when absent."""
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise BadRequest(f"'{field}' must be a string like \"12.1700000000\" or an integer id", 422)
    key = str(value).split(".")[0]
    if not key.isdigit() and not key.replace("-", "").replace("_", "").isalnum():
        raise BadRequest(f"'{field}' is not a valid project id: {value!r}", 422)
    return key


def validate_tasks(tasks: Any) -> list[dict[str, Any]]:
    if not isinstance(tasks, list):
        raise BadRequest("'tasks' must be a list of task objects", 422)
    for i, task in enumerate(tasks):
        if not isinstance(task, dict):
            raise BadRequest(f"tasks[{i}] must be an object, got {type(task).__name__}", 422)
        if not isinstance(task.get("data"), dict):
            raise BadRequest(f"tasks[{i}].data must be an object holding the image URL", 422)
    return tasks


# -- the app ----------------------------------------------------------------------------------------

def create_app(env: Settings | None = None) -> FastAPI:
    env = env or current_settings()
    app = FastAPI(title="labelloop ML backend", version=__version__, docs_url=None, redoc_url=None)
    metrics = ServiceMetrics()
    registry = Registry(env.model_dir)
    fetcher = MediaFetcher.from_settings(env)
    schemas: dict[str, str] = {}  # project -> label config seen at /setup (fallback for /predict)
    events: deque[dict[str, Any]] = deque(maxlen=1000)
    started = time.time()
    app.state.metrics, app.state.registry, app.state.events = metrics, registry, events
    jobs = _LazyJobStore()
    metrics.watch_jobs(jobs.list_quietly)

    @app.middleware("http")
    async def observe(request: Request, call_next):
        path = request.url.path
        endpoint = path if path in KNOWN_PATHS else "other"
        if path not in OPEN_PATHS and env.basic_auth_user and not _authorized(request, env):
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
        metrics.requests.labels(endpoint, request.method, str(response.status_code)).inc()
        if response.status_code >= 400:
            metrics.errors.labels(endpoint, str(response.status_code)).inc()
        return response

    @app.exception_handler(BadRequest)
    async def bad_request(_: Request, exc: BadRequest):
        return error(exc.status, str(exc))

    @app.exception_handler(LabelConfigError)
    async def bad_config(_: Request, exc: LabelConfigError):
        return error(422, str(exc))

    @app.exception_handler(RegistryError)
    async def bad_registry(_: Request, exc: RegistryError):
        return error(404, str(exc))

    @app.exception_handler(404)
    async def not_found(request: Request, _exc):
        return error(404, f"no such endpoint: {request.method} {request.url.path}")

    @app.exception_handler(405)
    async def not_allowed(request: Request, _exc):
        return error(405, f"method {request.method} not allowed on {request.url.path}")

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
        }

    @app.post("/setup")
    async def setup(request: Request):
        body = await read_json_object(request)
        schema = body.get("schema")
        if not isinstance(schema, str):
            raise BadRequest("'schema' (the label config XML) is required", 422)
        spec = parse_label_config(schema)
        project = project_key(body.get("project"))
        if project:
            schemas[project] = schema
        model = await run_in_threadpool(resolve_model, registry, project, spec, env)
        if model is None:
            return {"model_version": NO_MODEL_VERSION, "model_ready": False,
                    "message": _no_model_message(project)}
        return {"model_version": model.version, "model_ready": True, "task_type": spec.task_type}

    @app.post("/predict")
    async def predict(request: Request):
        body = await read_json_object(request)
        tasks = validate_tasks(body.get("tasks"))
        project = project_key(body.get("project"))
        config = body.get("label_config")
        if config is None and project in schemas:
            config = schemas[project]
        if not isinstance(config, str):
            raise BadRequest("'label_config' (string) is required unless /setup was called for this project", 422)
        spec = parse_label_config(config)
        params = body.get("params")
        if params is not None and not isinstance(params, dict):
            raise BadRequest("'params' must be an object", 422)
        if not tasks:
            return {"results": []}
        model = await run_in_threadpool(resolve_model, registry, project, spec, env)
        if model is None:
            metrics.no_model.inc()
            return {"results": [], "message": _no_model_message(project)}
        t0 = time.perf_counter()
        preds = await run_in_threadpool(predict_tasks, tasks, spec, model, fetcher)
        metrics.predict_seconds.observe(time.perf_counter() - t0)
        results = []
        for p in preds:
            item = p.to_label_studio()
            if p.error:
                item["error"] = p.error
                metrics.prediction_errors.labels(_reason_kind(p.error)).inc()
            else:
                metrics.predictions.labels(p.model_version).inc()
            results.append(item)
        metrics.models_loaded.set(cached_model_count())
        return {"results": results, "model_version": model.version}

    @app.post("/webhook")
    async def webhook(request: Request):
        # Untrusted hint: Label Studio sends it without auth. Validate the shape, record, answer fast.
        body = await read_json_object(request)
        action = body.get("action")
        if not isinstance(action, str) or not action:
            raise BadRequest("'action' (string) is required", 422)
        if action not in WEBHOOK_ACTIONS:
            raise BadRequest(f"unknown webhook action {action!r}", 422)
        project = body.get("project")
        project_id = project.get("id") if isinstance(project, dict) else project
        if isinstance(project_id, bool) or not isinstance(project_id, int):
            raise BadRequest("'project.id' (integer) is required", 422)
        event = {"action": action, "project": str(project_id), "received_at": time.time()}
        if isinstance(body.get("annotation"), dict):
            event["annotation"] = body["annotation"].get("id")
        if isinstance(body.get("task"), dict):
            event["task"] = body["task"].get("id")
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
        elif action == "TASKS_CREATED" and registry.serving(str(project_id)) is not None:
            # new tasks get the served version's predictions without anyone pressing a button
            from labelloop.tasks.jobs import request_prediction

            version = registry.serving(str(project_id)).version
            try:
                job = await run_in_threadpool(request_prediction, str(project_id), version, action, jobs.store())
            except Exception as exc:
                metrics.webhooks_dropped.labels(action).inc()
                return error(503, f"job queue unavailable, event not queued: {type(exc).__name__}: {exc}")
            answer.update(job=job["id"])
        return answer

    @app.get("/jobs")
    async def list_jobs(project: str | None = None, limit: int = 50):
        key = project_key(project) if project else None
        try:
            found = await run_in_threadpool(jobs.store().list, key, max(1, min(limit, 1000)))
        except Exception as exc:
            return error(503, f"job store unavailable: {exc}")
        return {"jobs": found}

    @app.get("/jobs/{job_id}")
    async def get_job(job_id: str):
        if not job_id.isalnum() or len(job_id) > 64:
            raise BadRequest("invalid job id", 422)
        try:
            job = await run_in_threadpool(jobs.store().get, job_id)
        except Exception as exc:
            return error(503, f"job store unavailable: {exc}")
        if job is None:
            return error(404, f"no job {job_id}")
        return job

    @app.post("/versions/{version}/promote")
    async def promote(version: str):
        """Serve an earlier (or a kept-out) version: rollback. Its predictions then flow to Label Studio."""
        from .registry import version_project

        project = version_project(version)
        manifest = registry.promote(project, version, reason="promoted through the API")
        answer: dict[str, Any] = {"project": project, "serving": manifest.version}
        try:
            from labelloop.tasks.jobs import request_prediction

            answer["prediction_job"] = (await run_in_threadpool(
                request_prediction, project, version, f"promotion of {version} through the API", jobs.store()))["id"]
        except Exception as exc:
            answer["warning"] = f"served now, but predictions were not queued: {exc}"
        return answer

    @app.get("/events")
    async def list_events(project: str | None = None, limit: int = 100):
        chosen = [e for e in events if project is None or e["project"] == str(project)]
        return {"events": chosen[-max(0, min(limit, 1000)):]}

    @app.get("/versions")
    async def versions(project: str | None = None):
        # Label Studio asks without naming the project; with one project in the registry that is it.
        key = project_key(project) if project else None
        projects = [key] if key else registry.projects()
        manifests = [m for p in projects for m in registry.versions(p)]
        manifests.sort(key=lambda m: m.created_at, reverse=True)
        serving = {p: (registry.serving_info(p) or {}).get("version") for p in projects}
        return {
            "versions": [m.version for m in manifests],
            "serving": {p: v for p, v in serving.items() if v},
            "details": [{**m.to_json(), "serving": serving.get(m.project) == m.version} for m in manifests],
        }

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

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


def _no_model_message(project: str | None) -> str:
    return (f"no model yet for project {project}: annotate some tasks so labelloop can train one, "
            "or set LABELLOOP_BASE_MODEL to an ultralytics .pt file")


def _reason_kind(reason: str) -> str:
    lowered = reason.lower()
    for kind in ("not allowed", "refused", "timeout", "http", "decodable", "larger", "no image"):
        if kind in lowered:
            return kind.replace(" ", "_")
    return "other"


def _authorized(request: Request, env: Settings) -> bool:
    header = request.headers.get("authorization", "")
    if not header.lower().startswith("basic "):
        return False
    try:
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    return secrets.compare_digest(user, env.basic_auth_user) and secrets.compare_digest(password, env.basic_auth_pass)


def build_app_with_limits(env: Settings | None = None):
    """The ASGI app as served: the FastAPI app wrapped by the body-size limit."""
    env = env or current_settings()
    return LimitBodyMiddleware(create_app(env), env.max_body_bytes)
