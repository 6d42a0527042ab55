"""Label Studio API client for the engine's jobs: read projects and annotations, write predictions.

Auth comes from label-studio-sdk (legacy token or personal access token, refreshed by the SDK);
requests go through httpx with those headers so every call has one timeout and one error type.
We only ever *read* annotations; the only writes are predictions and project.model_version.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import httpx

from labelloop.config import Settings
from labelloop.config import settings as current_settings
from labelloop.errors import LabelloopError

log = logging.getLogger(__name__)

# Unreachable Label Studio: try again after 1, 2, 4, 8 s (15 s in all), then fail with the reason.
RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0)
PREDICTION_CHUNK = 100  # predictions per bulk import request


class StudioError(LabelloopError, RuntimeError):
    kind, http_status = "label_studio", 502

    """Label Studio could not be reached or refused a call; the message says which and why."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class StudioClient:
    def __init__(self, url: str, api_key: str, timeout: float = 60.0):
        if not url or not api_key:
            raise StudioError("LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY must be set to talk to Label Studio")
        from label_studio_sdk.client import LabelStudio

        self.url = url.rstrip("/")
        self._sdk = LabelStudio(base_url=self.url, api_key=api_key, timeout=timeout)
        self._http = httpx.Client(base_url=self.url, timeout=timeout)

    @classmethod
    def from_settings(cls, env: Settings | None = None) -> StudioClient:
        env = env or current_settings()
        return cls(env.label_studio_url, env.label_studio_api_key)

    def headers(self) -> dict[str, str]:
        try:
            return {"Authorization": self._sdk._client_wrapper.get_headers()["Authorization"]}
        except Exception as exc:  # token refresh failed: LS down or the key is wrong
            raise StudioError(f"cannot authenticate to Label Studio at {self.url}: {exc}") from exc

    def request(self, method: str, path: str, retry_delays=RETRY_DELAYS, **kwargs) -> Any:
        """One API call; connection failures and 5xx are retried with backoff, then raise StudioError."""
        for attempt, delay in enumerate((*retry_delays, None)):
            try:
                response = self._http.request(method, path, headers=self.headers(), **kwargs)
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
        return self.request("GET", f"/api/projects/{int(project_id)}")

    def export_tasks(self, project_id: int | str) -> list[dict[str, Any]]:
        """Every task of the project with its annotations (Label Studio's JSON export)."""
        return self.request("GET", f"/api/projects/{int(project_id)}/export",
                            params={"exportType": "JSON", "download_all_tasks": "true"})

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
        """What labelers see and what the Data Manager's prediction score averages (see README)."""
        self.request("PATCH", f"/api/projects/{int(project_id)}", json={"model_version": version})

    def create_review_tab(self, project_id: int | str, title: str, task_ids: list[int]) -> dict[str, Any]:
        """A Data Manager tab showing exactly ``task_ids`` (a review queue labelers open and label in order)."""
        items = [{"filter": "filter:tasks:id", "operator": "equal", "type": "Number", "value": int(t)}
                 for t in task_ids]
        data = {"title": title, "filters": {"conjunction": "or", "items": items}, "ordering": ["tasks:id"]}
        return self.request("POST", "/api/dm/views", json={"project": int(project_id), "data": data})

    def install_webhook_secret(self, project_id: int | str, backend_url: str, secret: str) -> dict[str, Any]:
        return install_webhook_secret(self.request, project_id, backend_url, secret)

    def close(self) -> None:
        self._http.close()


WEBHOOK_SECRET_HEADER = "X-Labelloop-Webhook-Secret"  # checked by service.py's /webhook


def install_webhook_secret(call, project_id: int | str, backend_url: str, secret: str) -> dict[str, Any]:
    """Make the project's webhook to ``<backend_url>/webhook`` send LABELLOOP_WEBHOOK_SECRET.

    Label Studio creates that webhook itself when the backend is connected (``POST /api/ml``), with
    ``headers={}``: without our header its events are indistinguishable from forged ones. Its other
    headers are kept; the webhook is created when missing. ``call(method, path, **kwargs)`` is any
    Label Studio API caller returning the decoded JSON (StudioClient.request, the demo's client).
    """
    url = backend_url.rstrip("/") + "/webhook"
    for hook in call("GET", "/api/webhooks/", params={"project": int(project_id)}) or []:
        if hook.get("url") == url:
            headers = {**(hook.get("headers") or {}), WEBHOOK_SECRET_HEADER: secret}
            return call("PATCH", f"/api/webhooks/{int(hook['id'])}/", json={"headers": headers})
    return call("POST", "/api/webhooks/", json={"project": int(project_id), "url": url, "send_payload": True,
                                                "send_for_all_actions": True,
                                                "headers": {WEBHOOK_SECRET_HEADER: secret}})
