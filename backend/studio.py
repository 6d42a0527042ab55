"""Label Studio API client for the engine's jobs: read projects and annotations, write predictions.

Auth comes from label-studio-sdk (legacy token or personal access token, refreshed by the SDK);
requests go through httpx with those headers so every call has one timeout and one error type.
We only ever *read* annotations; the only writes are predictions and project.model_version.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from .config import Settings, settings as current_settings


class StudioError(RuntimeError):
    """Label Studio could not be reached or refused a call; the message says which and why."""


class StudioClient:
    def __init__(self, url: str, api_key: str, timeout: float = 60.0):
        if not url or not api_key:
            raise StudioError("LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY must be set to talk to Label Studio")
        from label_studio_sdk.client import LabelStudio

        self.url = url.rstrip("/")
        self._sdk = LabelStudio(base_url=self.url, api_key=api_key, timeout=timeout)
        self._http = httpx.Client(base_url=self.url, timeout=timeout)

    @classmethod
    def from_settings(cls, env: Settings | None = None) -> "StudioClient":
        env = env or current_settings()
        return cls(env.label_studio_url, env.label_studio_api_key)

    def headers(self) -> dict[str, str]:
        try:
            return {"Authorization": self._sdk._client_wrapper.get_headers()["Authorization"]}
        except Exception as exc:  # token refresh failed: LS down or the key is wrong
            raise StudioError(f"cannot authenticate to Label Studio at {self.url}: {exc}") from exc

    def request(self, method: str, path: str, **kwargs) -> Any:
        try:
            response = self._http.request(method, path, headers=self.headers(), **kwargs)
        except httpx.HTTPError as exc:
            raise StudioError(f"Label Studio at {self.url} unreachable ({method} {path}): {exc}") from exc
        if response.status_code >= 400:
            raise StudioError(f"Label Studio answered {response.status_code} to {method} {path}: "
                              f"{response.text[:300]}")
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

    def close(self) -> None:
        self._http.close()
