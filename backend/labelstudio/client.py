"""The one Label Studio API client: read projects and annotations, write predictions and review tabs.

Auth is labelloop's own (``labelstudio/auth.py``, shared with the media fetcher): a legacy token or a
personal access token refreshed before it expires and after a 401. Every call has one timeout, retries
an unreachable or failing (5xx) Label Studio with backoff, and raises ``StudioError`` with the reason.
The engine only ever *reads* annotations; its writes are predictions, the project's model version and
sampling, Data Manager tabs, and its own ML backend connection and webhook (``labelloop connect``).
Use it as a context manager (or call ``close``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from labelloop.config import Settings
from labelloop.config import settings as current_settings
from labelloop.core.labelconfig import ControlSpec, parse_label_config
from labelloop.errors import LabelloopError
from labelloop.labelstudio.auth import LabelStudioAuth, StudioAuthError

log = logging.getLogger(__name__)

# Unreachable Label Studio: try again after 1, 2, 4, 8 s (15 s in all), then fail with the reason.
RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0)
# Projects above this many tasks are read through an export snapshot rather than the easy export
# (one request that must build the whole JSON within Label Studio's timeout).
SNAPSHOT_ABOVE_TASKS = 2000
SNAPSHOT_TIMEOUT_S = 600
PREDICTION_CHUNK = 100  # predictions per bulk import request
TASK_PAGE = 500  # tasks per page of a paged read (``iter_tasks``)
# Data Manager filter items (``iter_tasks``): tasks with / without an annotation that is not cancelled
LABELED = {"filter": "filter:tasks:total_annotations", "operator": "greater", "type": "Number", "value": 0}
UNLABELED = {"filter": "filter:tasks:total_annotations", "operator": "equal", "type": "Number", "value": 0}
WEBHOOK_SECRET_HEADER = "X-Labelloop-Webhook-Secret"  # installed on the project's webhook; checked by /webhook


class StudioError(LabelloopError, RuntimeError):
    """Label Studio could not be reached or refused a call; the message says which and why."""

    kind, http_status = "label_studio", 502

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class StudioProject:
    """A project as the engine reads it: its settings, the control it serves, every task with annotations."""

    id: int
    info: dict[str, Any]  # Label Studio's project object (title, label_config, model_version, ...)
    spec: ControlSpec
    tasks: list[dict[str, Any]]


def read_labeled(project_id: int | str, env: Settings | None = None) -> StudioProject:
    """``StudioClient.load_labeled`` with a client opened and closed for it."""
    with StudioClient.from_settings(env) as client:
        return client.load_labeled(project_id)


class StudioClient:
    def __init__(self, url: str, api_key: str, timeout: float = 60.0, retry_delays: tuple[float, ...] = RETRY_DELAYS):
        if not url or not api_key:
            raise StudioError("LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY must be set to talk to Label Studio")
        self.url = url.rstrip("/")
        self.retry_delays = tuple(retry_delays)  # a person at a terminal waits less than a job (the CLI: 1 s)
        self._http = httpx.Client(base_url=self.url, timeout=timeout)
        self._auth = LabelStudioAuth(self.url, api_key, self._http)

    @classmethod
    def from_settings(cls, env: Settings | None = None, **options: Any) -> StudioClient:
        env = env or current_settings()
        return cls(env.label_studio_url, env.label_studio_api_key, **options)

    def __enter__(self) -> StudioClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _send(self, method: str, path: str, **kwargs) -> httpx.Response:
        """One request with Label Studio's auth (a 401 on a personal access token refreshes it once)."""
        try:
            return self._auth.send(lambda headers: self._http.request(method, path, headers=headers, **kwargs))
        except StudioAuthError as exc:  # token refresh failed: LS down or the key is wrong
            raise StudioError(f"cannot authenticate to Label Studio at {self.url}: {exc}") from exc

    def request(self, method: str, path: str, retry_delays=None, **kwargs) -> Any:
        """One API call; connection failures and 5xx are retried with backoff, then raise StudioError."""
        retry_delays = self.retry_delays if retry_delays is None else retry_delays
        for attempt, delay in enumerate((*retry_delays, None)):
            try:
                response = self._send(method, path, **kwargs)
            except (httpx.HTTPError, StudioError) as exc:
                failure = StudioError(f"Label Studio at {self.url} unreachable ({method} {path}) after "
                                      f"{attempt + 1} attempt(s): {exc}")
            else:
                if response.status_code < 500:
                    break
                failure = StudioError(f"Label Studio answered {response.status_code} to {method} {path} after "
                                      f"{attempt + 1} attempt(s): {response.text[:300]}", response.status_code)
            if delay is None:
                raise failure
            log.warning("%s; retrying in %.0f s", failure, delay)
            time.sleep(delay)
        if response.status_code >= 400:
            raise StudioError(f"Label Studio answered {response.status_code} to {method} {path}: "
                              f"{response.text[:300]}", response.status_code)
        if not response.content:
            return None
        try:
            return response.json()
        except json.JSONDecodeError:
            return response.content

    def project(self, project_id: int | str) -> dict[str, Any]:
        """The project object; a missing project is a StudioError with status 404 that says so."""
        try:
            return self.request("GET", f"/api/projects/{int(project_id)}")
        except StudioError as exc:
            if exc.status == 404:
                raise StudioError(f"Label Studio at {self.url} has no project {int(project_id)} (or this API "
                                  "key may not see it)", 404) from None
            raise

    def load_project(self, project_id: int | str) -> StudioProject:
        """The project, its parsed label config and every task with its annotations (the truth)."""
        info = self.project(project_id)
        spec = parse_label_config(info["label_config"])
        snapshot = int(info.get("task_number") or 0) > SNAPSHOT_ABOVE_TASKS
        return StudioProject(int(project_id), info, spec, self.export_tasks(project_id, snapshot=snapshot))

    def load_labeled(self, project_id: int | str) -> StudioProject:
        """The project with only its annotated tasks (annotations and predictions included), read page by page:
        what out-of-sample folds need, without exporting every unlabeled task of a large project."""
        info = self.project(project_id)
        tasks = list(self.iter_tasks(project_id, full=True, filters=[LABELED]))
        return StudioProject(int(project_id), info, parse_label_config(info["label_config"]), tasks)

    def image_tasks(self, project_id: int | str) -> list[dict[str, Any]]:
        """Every task's id and data (no annotations or predictions), read page by page: what needs only the images."""
        return [{"id": task["id"], "data": task.get("data") or {}} for task in self.iter_tasks(project_id)]

    def export_tasks(self, project_id: int | str, snapshot: bool = False) -> list[dict[str, Any]]:
        """Every task of the project with its annotations (Label Studio's JSON export).

        ``snapshot``: through an export snapshot (made, downloaded, deleted) instead of the one-request
        "easy export", which Label Studio's maintainers advise against for large projects; what comes
        back is the same JSON.
        """
        if not snapshot:
            return self.request("GET", f"/api/projects/{int(project_id)}/export",
                                params={"exportType": "JSON", "download_all_tasks": "true"})
        base = f"/api/projects/{int(project_id)}/exports"
        made = self.request("POST", base, json={"title": "labelloop read",
                                                "task_filter_options": {"only_with_annotations": False}})
        try:
            deadline = time.monotonic() + SNAPSHOT_TIMEOUT_S
            while (made.get("status") or "created") not in ("completed", "failed"):
                if time.monotonic() > deadline:
                    raise StudioError(f"Label Studio's export snapshot of project {int(project_id)} did not "
                                      f"finish within {SNAPSHOT_TIMEOUT_S} s")
                time.sleep(0.5)
                made = self.request("GET", f"{base}/{int(made['id'])}")
            if made["status"] == "failed":
                raise StudioError(f"Label Studio's export snapshot of project {int(project_id)} failed")
            return self.request("GET", f"{base}/{int(made['id'])}/download", params={"exportType": "JSON"})
        finally:  # snapshots are files in Label Studio's storage: never leave ours behind
            try:
                self._send("DELETE", f"{base}/{int(made['id'])}")
            except (httpx.HTTPError, StudioError):
                log.warning("project %s: export snapshot %s not deleted", project_id, made.get("id"))

    def iter_tasks(self, project_id: int | str, full: bool = False, filters: list[dict[str, Any]] | None = None,
                   page_size: int = TASK_PAGE) -> Iterator[dict[str, Any]]:
        """Every task of the project (matching ``filters``, Data Manager filter items), a page at a time in id
        order, so memory holds one page whatever the project's size. ``full``: with annotations and
        predictions (``fields=all``); else the Data Manager's summary — data, meta, ``total_annotations``
        (not cancelled), ``cancelled_annotations``, ``total_predictions``, ``updated_at`` (which an annotation
        saved, changed or deleted moves; a prediction does not). Task data comes as stored (no resolved URIs)."""
        # keyset pages (ids above the last one read), not page numbers: a task deleted or added while a long read
        # runs (a prediction job predicts as it reads) would shift numbered pages and skip or repeat a task
        params: dict[str, Any] = {"project": int(project_id), "page_size": int(page_size), "resolve_uri": "false",
                                  "page": 1}
        if full:
            params["fields"] = "all"
        last: int | None = None
        while True:
            items = list(filters or [])
            if last is not None:
                items.append({"filter": "filter:tasks:id", "operator": "greater", "type": "Number", "value": last})
            query: dict[str, Any] = {"ordering": ["tasks:id"]}
            if items:
                query["filters"] = {"conjunction": "and", "items": items}
            try:
                answer = self.request("GET", "/api/tasks", params={**params, "query": json.dumps(query)})
            except StudioError as exc:
                if exc.status == 404:  # "Invalid page.": nothing left
                    return
                raise
            tasks = answer.get("tasks") or []
            yield from tasks
            if len(tasks) < page_size or not tasks:
                return
            last = int(tasks[-1]["id"])

    def tasks(self, project_id: int | str, ordering: list[str] | None = None, page_size: int = 10_000) -> list[dict[str, Any]]:
        """Tasks as the Data Manager lists them (``ordering`` e.g. ``["tasks:predictions_score"]``)."""
        params: dict[str, Any] = {"project": int(project_id), "page_size": page_size, "fields": "all"}
        if ordering:
            params["query"] = json.dumps({"ordering": ordering})
        return self.request("GET", "/api/tasks", params=params)["tasks"]

    def task(self, task_id: int | str) -> dict[str, Any]:
        """One task in full. Careful: on a task without predictions, with a backend connected, Label Studio asks
        the backend for one (as when a labeler opens it); ``task_metas`` reads without that side effect."""
        return self.request("GET", f"/api/tasks/{int(task_id)}")

    def select_tasks(self, project_id: int | str, task_ids: Iterable[int], full: bool = False) -> Iterator[dict[str, Any]]:
        """The tasks ``task_ids`` of the project as the Data Manager lists them (``full``: with annotations and
        predictions), a page at a time in id order; deleted ones are left out. Unlike ``task``, never makes Label
        Studio ask the ML backend for predictions."""
        ids = sorted({int(t) for t in task_ids})
        for start in range(0, len(ids), TASK_PAGE):
            part = ids[start : start + TASK_PAGE]
            query = {"selectedItems": {"all": False, "included": part}, "ordering": ["tasks:id"]}
            params: dict[str, Any] = {"project": int(project_id), "page": 1, "page_size": len(part),
                                      "resolve_uri": "false", "query": json.dumps(query)}
            if full:
                params["fields"] = "all"
            yield from self.request("GET", "/api/tasks", params=params).get("tasks") or []

    def task_metas(self, project_id: int | str, task_ids: Iterable[int]) -> dict[int, Any]:
        """Task id -> its ``meta`` as Label Studio holds it now (``select_tasks``; deleted tasks left out)."""
        return {int(task["id"]): task.get("meta") for task in self.select_tasks(project_id, task_ids)}

    def set_task_meta(self, task_id: int | str, meta: dict[str, Any]) -> None:
        """Replace a task's ``meta`` (its data, annotations and predictions are left alone): callers pass the
        task's meta with their own key changed, so the user's keys survive."""
        self.request("PATCH", f"/api/tasks/{int(task_id)}", json={"meta": meta})

    def model_version_counts(self, project_id: int | str) -> dict[str, int]:
        """How many predictions each model version has in the project (one request, whatever its size)."""
        answer = self.request("GET", f"/api/projects/{int(project_id)}/model-versions/")
        return {str(k): int(v) for k, v in (answer or {}).items()} if isinstance(answer, dict) else {}

    def predictions(self, project_id: int | str) -> list[dict[str, Any]]:
        return self.request("GET", "/api/predictions", params={"project": int(project_id)})

    def import_predictions(self, project_id: int | str, predictions: list[dict[str, Any]]) -> int:
        """Bulk-create predictions ({task, result, score, model_version}); returns how many were created."""
        created = 0
        for start in range(0, len(predictions), PREDICTION_CHUNK):
            chunk = predictions[start : start + PREDICTION_CHUNK]
            answer = self.request("POST", f"/api/projects/{int(project_id)}/import/predictions", json=chunk)
            created += int((answer or {}).get("created", len(chunk)))
        return created

    def set_model_version(self, project_id: int | str, version: str) -> None:
        """What labelers see and what the Data Manager's prediction score averages (see README).

        Label Studio accepts only an ML backend's title or a version some prediction of the project
        already has: anything else is a StudioError with status 400."""
        self.request("PATCH", f"/api/projects/{int(project_id)}", json={"model_version": version})

    def set_sampling(self, project_id: int | str, sampling: str = "Uncertainty sampling") -> None:
        """How ``/next`` (Label All Tasks) hands out tasks: "Uncertainty sampling" gives the lowest score first."""
        self.request("PATCH", f"/api/projects/{int(project_id)}", json={"sampling": sampling})

    # -- the backend's own connection (what Settings -> Model -> Connect Model does) ---------------------
    def ml_backends(self, project_id: int | str) -> list[dict[str, Any]]:
        """The project's ML backend connections, as Label Studio lists them (it health-checks each)."""
        return self.request("GET", "/api/ml", params={"project": int(project_id)}) or []

    def connect_ml_backend(self, project_id: int | str, backend_url: str, title: str = "labelloop",
                           basic_auth: tuple[str, str] | None = None) -> tuple[dict[str, Any], bool]:
        """(connection, created): connect ``backend_url`` to the project, or update the connection the
        project already has to that URL — never a second one. Label Studio then calls the backend's
        ``/health`` and ``/setup`` (so the answer's ``model_version`` is what the backend serves) and, for
        a new connection, creates the webhook ``<backend_url>/webhook`` once per URL.

        ``basic_auth``: the backend's BASIC_AUTH_USER/PASS, which Label Studio sends on health, setup,
        predict and "Start training" (never on webhooks: see ``install_webhook_secret``).
        """
        url = backend_url.rstrip("/")
        body: dict[str, Any] = {"url": url, "project": int(project_id), "title": title, "is_interactive": False}
        if basic_auth:
            body.update(auth_method="BASIC_AUTH", basic_auth_user=basic_auth[0], basic_auth_pass=basic_auth[1])
        else:
            body.update(auth_method="NONE")
        existing = [b for b in self.ml_backends(project_id) if str(b.get("url", "")).rstrip("/") == url]
        try:
            if existing:  # PATCH needs url and project in the body (a 500 without them)
                return self.request("PATCH", f"/api/ml/{int(existing[0]['id'])}", json=body), False
            return self.request("POST", "/api/ml", json=body), True
        except StudioError as exc:
            if exc.status == 400:  # Label Studio could not reach or set up the backend: say why, in one line
                raise StudioError(f"Label Studio could not connect project {int(project_id)} to {url}: "
                                  f"{_validation_message(str(exc))}", 400) from None
            raise

    def webhooks(self, project_id: int | str) -> list[dict[str, Any]]:
        return self.request("GET", "/api/webhooks/", params={"project": int(project_id)}) or []

    def create_review_tab(self, project_id: int | str, title: str, task_ids: list[int]) -> dict[str, Any]:
        """A Data Manager tab showing exactly ``task_ids`` (a review queue labelers open and label in order)."""
        items = [{"filter": "filter:tasks:id", "operator": "equal", "type": "Number", "value": int(t)}
                 for t in task_ids]
        data = {"title": title, "filters": {"conjunction": "or", "items": items}, "ordering": ["tasks:id"]}
        return self.request("POST", "/api/dm/views", json={"project": int(project_id), "data": data})

    def put_tab(self, project_id: int | str, title: str, task_ids: list[int],
                ordering: tuple[str, ...] = ("tasks:id",)) -> dict[str, Any]:
        """The Data Manager tab ``title`` shows exactly ``task_ids``: the first tab of that title is
        rewritten, or one is made. Tabs of other titles (the user's) are never touched."""
        items = [{"filter": "filter:tasks:id", "operator": "equal", "type": "Number", "value": int(t)}
                 for t in task_ids]
        if not items:  # an empty "or" shows every task: show none instead
            items = [{"filter": "filter:tasks:id", "operator": "equal", "type": "Number", "value": 0}]
        data = {"title": title, "filters": {"conjunction": "or", "items": items}, "ordering": list(ordering)}
        views = self.request("GET", "/api/dm/views", params={"project": int(project_id)})
        mine = [v for v in views if (v.get("data") or {}).get("title") == title]
        body = {"project": int(project_id), "data": data}
        if mine:
            return self.request("PUT", f"/api/dm/views/{int(mine[0]['id'])}", json=body)
        return self.request("POST", "/api/dm/views", json=body)

    def tab_tasks(self, project_id: int | str, view_id: int, page_size: int = 1000) -> list[dict[str, Any]]:
        """The tasks a Data Manager tab lists, in its order."""
        params = {"project": int(project_id), "view": int(view_id), "page_size": page_size, "fields": "all"}
        return self.request("GET", "/api/tasks", params=params)["tasks"]

    def install_webhook_secret(self, project_id: int | str, backend_url: str, secret: str) -> dict[str, Any]:
        """Make the project's webhook to ``<backend_url>/webhook`` send LABELLOOP_WEBHOOK_SECRET.

        Label Studio creates that webhook itself when the backend is connected (``POST /api/ml``), with
        ``headers={}``: without our header its events are indistinguishable from forged ones. Its other
        headers are kept; the webhook is created when missing.
        """
        return self.ensure_webhook(project_id, backend_url, secret)[0]

    def ensure_webhook(self, project_id: int | str, backend_url: str,
                       secret: str | None = None) -> tuple[dict[str, Any], str]:
        """(webhook, what was done): the project's one webhook to ``<backend_url>/webhook``, sending every
        action with its payload and, when ``secret`` is given, the X-Labelloop-Webhook-Secret header.
        What was done is "created", "updated" or "unchanged"; other webhooks and headers are left alone."""
        url = backend_url.rstrip("/") + "/webhook"
        for hook in self.webhooks(project_id):
            if str(hook.get("url", "")).rstrip("/") == url:
                headers = dict(hook.get("headers") or {})
                if secret is None or headers.get(WEBHOOK_SECRET_HEADER) == secret:
                    return hook, "unchanged"
                headers[WEBHOOK_SECRET_HEADER] = secret
                return self.request("PATCH", f"/api/webhooks/{int(hook['id'])}/", json={"headers": headers}), "updated"
        return self.request("POST", "/api/webhooks/", json={
            "project": int(project_id), "url": url, "send_payload": True, "send_for_all_actions": True,
            "headers": {WEBHOOK_SECRET_HEADER: secret} if secret else {}}), "created"

    def close(self) -> None:
        self._http.close()


def _validation_message(text: str) -> str:
    """Label Studio's 400 on a connect is a JSON of messages with HTML links: the first one, as plain text."""
    import re

    raw = text.split(": ", 1)[-1]
    try:
        data: Any = json.loads(raw[raw.index("{"):])
    except (ValueError, json.JSONDecodeError):
        data = raw
    while isinstance(data, dict) and data:
        data = next(iter(data.values()))
    while isinstance(data, list) and data:
        data = data[0]
    message = re.sub(r"<[^>]+>", "", str(data))
    return " ".join(message.split())[:400]


