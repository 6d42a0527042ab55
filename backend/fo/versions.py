"""What the FiftyOne panel shows and does for a project: its versions (from the registry), its jobs and
promotions (through the backend's HTTP API, so promotion is the service's own code, never a copy).

The registry is read directly (the App shares ``MODEL_DIR`` with the backend and the workers, as every
labelloop process does). Jobs and promotion go through ``labelloop serve``: ``GET /jobs?project=`` and
``POST /versions/{version}/promote`` — the service promotes and queues the new version's predictions
for Label Studio (a Celery job), which this layer may not do itself (``fo/`` never imports Celery).

Where the backend is: ``LABELLOOP_BACKEND_URL`` (default ``http://127.0.0.1:9090``), with the basic-auth
pair ``BASIC_AUTH_USER``/``BASIC_AUTH_PASS`` when the backend has one. The plugin passes the values of
its secrets (``ctx.secrets``, read from the environment by FiftyOne's default secrets provider).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import httpx

from labelloop.config import Settings
from labelloop.config import settings as current_settings
from labelloop.core.registry import Registry, version_project
from labelloop.errors import LabelloopError

DEFAULT_BACKEND_URL = "http://127.0.0.1:9090"


class BackendError(LabelloopError, RuntimeError):
    """The backend did not answer, refused the credentials, or refused the request; the message says which."""

    kind, http_status = "backend", 502


@dataclass(frozen=True)
class Backend:
    """Where ``labelloop serve`` listens and how to authenticate to it."""

    url: str = DEFAULT_BACKEND_URL
    user: str = ""
    password: str = ""
    timeout: float = 10.0

    @classmethod
    def from_values(cls, url: str | None = None, user: str | None = None, password: str | None = None) -> Backend:
        """Each value given (a secret's), else the environment's, else the default."""
        return cls(url=(url or os.environ.get("LABELLOOP_BACKEND_URL") or DEFAULT_BACKEND_URL).rstrip("/"),
                   user=user if user is not None else os.environ.get("BASIC_AUTH_USER", ""),
                   password=password if password is not None else os.environ.get("BASIC_AUTH_PASS", ""))

    def _request(self, method: str, path: str, **kwargs) -> dict[str, Any]:
        auth = (self.user, self.password) if self.user else None
        try:
            response = httpx.request(method, f"{self.url}{path}", auth=auth, timeout=self.timeout, **kwargs)
        except httpx.HTTPError as exc:
            raise BackendError(f"the labelloop backend at {self.url} did not answer ({type(exc).__name__}): start it "
                               "(`labelloop serve`, or `labelloop stack up`) or set LABELLOOP_BACKEND_URL") from None
        if response.status_code == 401:
            raise BackendError(f"the labelloop backend at {self.url} refused the credentials: set BASIC_AUTH_USER and "
                               "BASIC_AUTH_PASS to the backend's pair (the plugin's secrets)")
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.status_code >= 400:
            detail = body.get("error") if isinstance(body, dict) else None
            raise BackendError(f"the labelloop backend answered {response.status_code} to {method} {path}: "
                               f"{detail or response.text[:300]}")
        return body if isinstance(body, dict) else {"value": body}

    def jobs(self, project: int | str, limit: int = 20) -> list[dict[str, Any]]:
        """The project's newest job records (training, prediction, warm start), newest first."""
        return list(self._request("GET", "/jobs", params={"project": str(project), "limit": limit}).get("jobs", []))

    def model_tests(self, project: int | str) -> dict[str, Any]:
        """The project's model tests and costs (``GET /projects/{id}/model-tests``)."""
        return self._request("GET", f"/projects/{int(project)}/model-tests")

    def set_model_tests(self, project: int | str, suite: dict[str, Any]) -> dict[str, Any]:
        """Replace them (``PUT``): the backend checks the suite and says what is wrong with it."""
        return self._request("PUT", f"/projects/{int(project)}/model-tests", json=suite)

    def promote(self, version: str) -> dict[str, Any]:
        """Serve ``version`` (a promotion, or a rollback to an older one): the service's own endpoint."""
        return self._request("POST", f"/versions/{version}/promote")


def versions(project: int | str, env: Settings | None = None) -> list[dict[str, Any]]:
    """The project's versions, newest first: name, when, primary metric, data counts, whether serving."""
    env = env or current_settings()
    registry = Registry(env.model_dir)
    serving = (registry.serving_info(project) or {}).get("version")
    rows = []
    for manifest in sorted(registry.versions(project), key=lambda m: m.number, reverse=True):
        metrics = manifest.metrics or {}
        counts = manifest.counts or {}
        rows.append({
            "version": manifest.version,
            "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(manifest.created_at)),
            "primary": _rounded(metrics.get("primary")),
            "metrics": {k: _rounded(v) for k, v in metrics.items() if isinstance(v, (int, float))},
            "train_images": counts.get("train"),
            "tuning_images": counts.get("val"),
            "parent": manifest.parent,
            "serving": manifest.version == serving,
            "tests": tests_summary(manifest.model_tests),
            "cost": _rounded((manifest.model_tests.get("costs") or {}).get("cost")) if manifest.model_tests else None,
            "regressed": (manifest.changes or {}).get("regressed_count"),
        })
    return rows


def tests_summary(model_tests: dict[str, Any] | None) -> str:
    """"3/3 passed", "2/3 passed, failed: stars", or "" without tests."""
    results = (model_tests or {}).get("results") or []
    if not results:
        return ""
    failed = [r["name"] for r in results if not r.get("passed")]
    text = f"{len(results) - len(failed)}/{len(results)} passed"
    return text + (f", failed: {', '.join(failed)}" if failed else "")


def test_matrix(project: int | str, last: int = 3, env: Settings | None = None) -> dict[str, Any]:
    """The project's model tests beside its newest versions that ran them: {"versions": [...], "rows": [{"test",
    "bar", "v0", "v1", ...}]} — cell k is version k's verdict ("ok 0.93", "FAIL 0.20", "n/a")."""
    env = env or current_settings()
    registry = Registry(env.model_dir)
    ran = [m for m in sorted(registry.versions(project), key=lambda m: m.number, reverse=True)
           if (m.model_tests or {}).get("results")][:last]
    names: list[str] = []
    bars: dict[str, str] = {}
    for manifest in ran:
        for result in manifest.model_tests["results"]:
            if result["name"] not in bars:
                names.append(result["name"])
                bars[result["name"]] = result.get("bar", "") + ("" if result.get("required", True) else " (advisory)")
    rows = []
    for name in names:
        row: dict[str, Any] = {"test": name, "bar": bars[name]}
        for k, manifest in enumerate(ran):
            result = next((r for r in manifest.model_tests["results"] if r["name"] == name), None)
            value = "n/a" if result is None or result.get("value") is None else f"{result['value']:.2f}"
            row[f"v{k}"] = "-" if result is None else f"{'ok' if result['passed'] else 'FAIL'} {value}"
        rows.append(row)
    return {"versions": [m.version for m in ran], "rows": rows}


def failing_tasks(project: int | str, version: str | None = None, env: Settings | None = None) -> dict[str, list[int]]:
    """Test name → the failing task ids of ``version``'s model tests (default: the newest version that ran them)."""
    env = env or current_settings()
    registry = Registry(env.model_dir)
    manifests = sorted(registry.versions(project), key=lambda m: m.number, reverse=True)
    chosen = next((m for m in manifests if (version is None or m.version == version)
                   and (m.model_tests or {}).get("results")), None)
    if chosen is None:
        return {}
    return {r["name"]: [int(t) for t in r.get("failing") or []] for r in chosen.model_tests["results"] if r.get("failing")}


def regressed_tasks(project: int | str, version: str | None = None, env: Settings | None = None) -> tuple[str, list[int]]:
    """(version, the tuning tasks it got wrong that the version in service then got right): ``version``, default
    the newest version that was compared with one in service."""
    env = env or current_settings()
    manifests = sorted(Registry(env.model_dir).versions(project), key=lambda m: m.number, reverse=True)
    chosen = next((m for m in manifests if (version is None or m.version == version) and m.changes), None)
    if chosen is None:
        return "", []
    return chosen.version, [int(t) for t in chosen.changes.get("regressed") or []]


def rollback_target(rows: list[dict[str, Any]]) -> str | None:
    """What "roll back" serves: the serving version's parent (the version that served before it, as
    ``labelloop rollback`` has it) when the registry still holds it, else None."""
    serving = next((row for row in rows if row["serving"]), None)
    if serving is None or not serving.get("parent"):
        return None
    return serving["parent"] if any(row["version"] == serving["parent"] for row in rows) else None


def check_promotable(project: int | str, version: str, env: Settings | None = None) -> str:
    """``version`` when it is one of ``project``'s versions in the registry, else a BackendError saying so."""
    env = env or current_settings()
    try:
        if version_project(version) != str(project):
            raise BackendError(f"{version} is not a version of project {project}")
        Registry(env.model_dir).get(project, version)
    except LabelloopError as exc:
        raise BackendError(str(exc)) from None
    return version


def _rounded(value: Any) -> Any:
    return round(float(value), 4) if isinstance(value, (int, float)) else value
