"""What the service accepts: request bodies validated before they reach the engine, the pydantic models
that make the OpenAPI document the real contract, and the one error shape (``{"error": "..."}``)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from labelloop.config import Settings
from labelloop.errors import LabelloopError
from labelloop.labelstudio.client import WEBHOOK_SECRET_HEADER

WEBHOOK_ACTIONS = {
    "ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED", "ANNOTATIONS_CREATED",
    "START_TRAINING", "TASKS_CREATED", "TASKS_DELETED", "PROJECT_CREATED", "PROJECT_UPDATED",
    "PROJECT_DELETED", "REVIEW_CREATED", "REVIEW_UPDATED", "REVIEWS_DELETED", "LABEL_LINK_CREATED",
    "LABEL_LINK_UPDATED", "LABEL_LINK_DELETED",
}
MAX_ID = 2**53  # Label Studio ids are database integers; anything larger (or <= 0) is invented


class BadRequest(LabelloopError):
    """A request the service cannot take; answered with ``status`` (4xx) and the message."""

    kind = "bad_request"

    def __init__(self, message: str, status: int = 400):
        super().__init__(message, http_status=status)


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def project_key(value: Any, field: str = "project") -> str | None:
    """Label Studio's project uid "<id>.<created_at>" (or a bare id) → "<id>"; None when absent."""
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise BadRequest(f"'{field}' must be a string like \"12.1700000000\" or an integer id", 422)
    key = str(value).split(".")[0]
    if len(key) > 64:  # becomes a directory name and a Redis key: keep it short
        raise BadRequest(f"'{field}' is not a valid project id: longer than 64 characters", 422)
    # isascii: str.isdigit()/isalnum() accept "¹" or "١", which the registry refuses (was a 404 on /setup)
    if not key.isascii() or not key.replace("-", "").replace("_", "").isalnum():
        raise BadRequest(f"'{field}' is not a valid project id: {value!r}", 422)
    return key


def validate_tasks(tasks: Any, limit: int | None = None) -> list[dict[str, Any]]:
    if not isinstance(tasks, list):
        raise BadRequest("'tasks' must be a list of task objects", 422)
    if limit is not None and len(tasks) > limit:
        raise BadRequest(f"{len(tasks)} tasks in one /predict, more than the {limit} allowed "
                         "(LABELLOOP_MAX_TASKS_PER_PREDICT): select fewer tasks in the Data Manager", 413)
    for i, task in enumerate(tasks):
        if not isinstance(task, dict):
            raise BadRequest(f"tasks[{i}] must be an object, got {type(task).__name__}", 422)
        if not isinstance(task.get("data"), dict):
            raise BadRequest(f"tasks[{i}].data must be an object holding the image URL", 422)
    return tasks


def webhook_id(value: Any) -> int | None:
    """A Label Studio id from a webhook body, or None: only validated integers reach the event log."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < MAX_ID:
        return None
    return value


# -- the contract in the OpenAPI document ---------------------------------------------------------------
# The handlers validate bodies by hand (bounded parsing, precise messages, the {"error": ...} shape);
# these models only *declare* what Label Studio 1.23.2 sends, so /openapi.json is the real contract
# and schemathesis can fuzz it. Every model allows extra fields: Label Studio adds some across versions.

class _LabelStudioBody(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorBody(BaseModel):
    """Every 4xx (and the last-resort 500) carries one human-readable sentence."""

    error: str = Field(description="what was wrong and, where it helps, how to fix it",
                       examples=["'schema' (the label config XML) is required"])


LABEL_CONFIG_EXAMPLE = ('<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
                        '<Label value="circle"/></RectangleLabels></View>')
ProjectUid = Annotated[str | int | None, Field(
    description='Label Studio\'s project uid "<id>.<created_at>" or a bare id; the part before the dot '
                "(digits, letters, '-', '_', at most 64 characters) names the project",
    examples=["1.1795358080"])]


class SetupRequest(_LabelStudioBody):
    """Sent right after each /health when Label Studio connects the backend to a project."""

    project: ProjectUid = None
    label_config: str = Field(alias="schema", description="the project's label config (XML)",
                              examples=[LABEL_CONFIG_EXAMPLE])
    hostname: str | None = Field(None, description="Label Studio's URL", examples=["http://localhost:8080"])
    access_token: str | None = Field(None, description="the connecting user's legacy token (unused: labelloop "
                                                       "uses its own LABEL_STUDIO_API_KEY)")
    extra_params: dict[str, Any] | None = None


class Task(_LabelStudioBody):
    """A Label Studio task as exported; only ``data`` (which holds the image URL) is read."""

    id: int | None = None
    data: dict[str, Any] = Field(description="the task's data; the label config's $variable names the image URL",
                                 examples=[{"image": "/data/upload/1/abc-x.png"}])
    meta: dict[str, Any] | None = None
    annotations: list[Any] | None = None
    predictions: list[Any] | None = None
    drafts: list[Any] | None = None


class PredictParams(_LabelStudioBody):
    login: str | None = None
    password: str | None = None
    context: Any = None


class PredictRequest(_LabelStudioBody):
    """"Retrieve Predictions", opening a task, interactive annotation. One result per task, in order.

    More tasks than LABELLOOP_MAX_TASKS_PER_PREDICT is a 413 (select fewer tasks in the Data Manager)."""

    tasks: list[Task]
    project: ProjectUid = None
    label_config: str | None = Field(None, description="required unless /setup was called for this project",
                                     examples=[LABEL_CONFIG_EXAMPLE])
    params: PredictParams | None = None


class WebhookProject(_LabelStudioBody):
    id: int = Field(gt=0, lt=MAX_ID, description="the Label Studio project id")


class WebhookObject(_LabelStudioBody):
    """An annotation or a task of the event. A hint, never trusted: only a valid integer ``id`` reaches
    the event log, anything else in it (or a value that is not an object) is ignored."""

    id: int | None = None


class WebhookRequest(_LabelStudioBody):
    """A Label Studio webhook event (or "Start training", which sends only action and project)."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [
        {"action": "ANNOTATION_CREATED", "project": {"id": 1}, "annotation": {"id": 3, "result": []},
         "task": {"id": 4, "data": {"image": "/data/upload/1/abc-x.png"}}},
        {"action": "START_TRAINING", "project": {"id": 1}},
    ]})

    action: Literal[tuple(sorted(WEBHOOK_ACTIONS))]  # type: ignore[valid-type]
    project: WebhookProject | Annotated[int, Field(gt=0, lt=MAX_ID)]
    annotation: WebhookObject | None = Field(None, description="ANNOTATION_* events")
    task: WebhookObject | None = Field(None, description="ANNOTATION_* events")
    annotations: list[WebhookObject] | None = Field(None, description="ANNOTATIONS_DELETED: [{\"id\": 2}, ...]")


class ModelTestsRequest(BaseModel):
    """A project's model tests (``core/modeltests.py``): what every new version must pass on the tuning split
    before it may serve."""

    model_config = ConfigDict(extra="forbid")

    tests: list[dict[str, Any]] = Field(max_length=50, examples=[[
        {"name": "stars are stars", "kind": "confidence", "cohort": {"label": "star"}, "min": 0.8},
        {"name": "flip", "kind": "invariance", "perturbation": "flip_lr", "max_change": 0.1},
        {"name": "known stars", "kind": "examples", "tasks": [12, 15], "label": "star"}]])
    costs: dict[str, Any] | None = Field(None, examples=[{"default": 1, "classes": {"star": 5},
                                                          "confusions": {"star->circle": 20}}])


REQUEST_MODELS = (SetupRequest, PredictRequest, WebhookRequest, ModelTestsRequest)

_ERRORS = {
    400: "The body is not a JSON object: empty, malformed, nested too deeply or with a huge integer.",
    401: "Authentication required: the backend's basic auth (when BASIC_AUTH_USER/PASS are set); on /webhook "
         "the X-Labelloop-Webhook-Secret header (when LABELLOOP_WEBHOOK_SECRET is set) or the basic auth.",
    403: "START_TRAINING from an unauthenticated caller.",
    404: "No such job, version or project.",
    413: "The body is over LABELLOOP_MAX_BODY_MB (LABELLOOP_MAX_WEBHOOK_MB on /webhook), or more tasks than "
         "LABELLOOP_MAX_TASKS_PER_PREDICT.",
    422: "A field is missing or has the wrong type, or the label config cannot be served; the message names it.",
    429: "Too many job-triggering events for this project (LABELLOOP_TRIGGER_BURST, LABELLOOP_TRIGGER_RATE).",
    503: "The job store (Redis) is unavailable; on /webhook the event was not queued.",
}
_ERROR_HEADERS = {
    401: {"WWW-Authenticate": {"schema": {"type": "string"}, "description": 'Basic realm="labelloop"'}},
    429: {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds until the next event is taken"}},
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for FastAPI: the documented {"error": ...} answers of one route."""
    return {code: {"model": ErrorBody, "description": _ERRORS[code], **({"headers": _ERROR_HEADERS[code]}
                                                                         if code in _ERROR_HEADERS else {})}
            for code in codes}


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra=`` declaring the request body; the handler still parses it itself (bounded)."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def contract(app: FastAPI, env: Settings) -> dict[str, Any]:
    """The OpenAPI document: FastAPI's, plus the request models and the auth this deployment enforces."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    _, defs = models_json_schema([(m, "validation") for m in REQUEST_MODELS],
                                 ref_template="#/components/schemas/{model}")
    components = doc.setdefault("components", {})
    components.setdefault("schemas", {}).update(defs.get("$defs", {}))
    # Security follows the settings: an operation marked as authenticated must really refuse without it.
    auth_on = bool(env.basic_auth_user or env.basic_auth_pass)
    schemes: dict[str, Any] = {}
    if auth_on:
        schemes["basicAuth"] = {"type": "http", "scheme": "basic"}
    if env.webhook_secret:
        schemes["webhookSecret"] = {"type": "apiKey", "in": "header", "name": WEBHOOK_SECRET_HEADER}
    if schemes:
        components["securitySchemes"] = schemes
        for path, operations in doc.get("paths", {}).items():
            if path in ("/", "/health"):  # open: "/" is upstream's alias of /health
                continue
            if path == "/webhook":
                security = [{name: []} for name in ("webhookSecret", "basicAuth") if name in schemes]
                if not env.webhook_secret:
                    security.append({})  # open: anyone may send events (START_TRAINING needs auth: 403)
            elif auth_on:
                security = [{"basicAuth": []}]
            else:
                continue
            for operation in operations.values():
                operation["security"] = security
    app.openapi_schema = doc
    return doc


async def read_json_object(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw:
        raise BadRequest("request body is empty; expected a JSON object")
    try:
        body = json.loads(raw)
    except RecursionError:  # Python's parser recurses per nesting level
        raise BadRequest("request body is nested too deeply to be a Label Studio request") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, and integers over 4300 digits
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(body).__name__}")
    return body
