"""The calls a labeler's browser (or an admin's script) makes: what the demo, the tests and the
benchmarks do to a real Label Studio to play the human. Built on the engine's one client, so auth,
retries and errors are the same; the engine itself never calls these (it never writes annotations).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from labelloop.labelstudio.client import StudioClient


class LabelerClient(StudioClient):
    def __init__(self, url: str, token: str, timeout: float = 120.0):
        super().__init__(url, token, timeout=timeout)

    def create_project(self, title: str, label_config: str) -> dict[str, Any]:
        return self.request("POST", "/api/projects", json={"title": title, "label_config": label_config})

    def upload_images(self, project: int, paths: list[Path]) -> list[dict[str, Any]]:
        """Upload image files as tasks (as the browser's import dialog does); returns the project's tasks."""
        files = [(f"file{i}", (p.name, p.read_bytes(), "image/png")) for i, p in enumerate(paths)]
        self.request("POST", f"/api/projects/{int(project)}/import", files=files)
        return self.tasks(project)

    def annotate(self, task_id: int, result: list[dict[str, Any]]) -> dict[str, Any]:
        return self.request("POST", f"/api/tasks/{int(task_id)}/annotations", json={"result": result})

    def connect_backend(self, project: int, url: str, **extra: Any) -> dict[str, Any]:
        """Settings → Model → Connect Model: Label Studio calls the backend's /setup and creates its webhook."""
        return self.request("POST", "/api/ml", json={"url": url, "project": int(project), "title": "labelloop", **extra})

    def retrieve_predictions(self, project: int) -> dict[str, Any]:
        """Data Manager → Actions → Retrieve Predictions on every task."""
        return self.request("POST", "/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": int(project)},
                            json={"selectedItems": {"all": True, "excluded": []}, "project": int(project)})
