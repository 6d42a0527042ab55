"""Start the parts of the stack as local processes: Label Studio (its own venv) and the ML backend.

The test suite and the demo use these, so they run Label Studio the way a user does: the real
server, with the settings a backend on a loopback address needs (see README "Troubleshooting").
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

LS_VERSION = "1.23.2"


def label_studio_venv() -> Path:
    default = Path.home() / ".cache" / "labelloop" / f"label-studio-{LS_VERSION}"
    return Path(os.environ.get("LABELLOOP_LS_VENV", str(default))).expanduser()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(log: Path | None, lines: int = 40) -> str:
    if log is None or not log.exists():
        return ""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class ManagedProcess:
    name: str
    process: subprocess.Popen
    url: str
    log: Path
    info: dict = field(default_factory=dict)

    def stop(self, timeout: float = 20) -> None:
        """Stop the process group we started (and only that)."""
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=timeout)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=5)


def postgres_env(url: str) -> dict[str, str]:
    """Label Studio's database settings (``DJANGO_DB``, ``POSTGRE_*``) for a ``postgresql://`` URL."""
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    if parts.scheme not in ("postgres", "postgresql") or not parts.hostname or not name:
        raise ValueError(f"not a postgresql://user@host:port/name URL: {url!r}")
    return {"DJANGO_DB": "default", "POSTGRE_HOST": parts.hostname, "POSTGRE_PORT": str(parts.port or 5432),
            "POSTGRE_USER": unquote(parts.username or "postgres"), "POSTGRE_PASSWORD": unquote(parts.password or ""),
            "POSTGRE_NAME": name}


def _on_postgres(server: str, statement: str) -> None:
    """Run one statement on a PostgreSQL server with Label Studio's own driver (psycopg, in its venv); the URL
    goes through the environment, not the command line (it may hold a password)."""
    code = ("import os, psycopg\n"
            "with psycopg.connect(os.environ['LABELLOOP_PG_URL'], dbname='postgres', autocommit=True,\n"
            "                     connect_timeout=5) as c:\n"
            "    c.execute(os.environ['LABELLOOP_PG_STATEMENT'])")
    done = subprocess.run([str(label_studio_venv() / "bin" / "python"), "-c", code], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "LABELLOOP_PG_URL": server, "LABELLOOP_PG_STATEMENT": statement})
    if done.returncode:
        raise RuntimeError(f"PostgreSQL: {statement.split(' ')[0]} failed: {done.stderr.strip().splitlines()[-1:]}")


def _database_name(name: str) -> str:
    if not name or not name.replace("_", "").isalnum() or not name.isascii() or len(name) > 63:
        raise ValueError(f"database name {name!r}: up to 63 ASCII letters, digits and _")
    return name


def create_postgres_database(server: str, name: str) -> str:
    """A new empty database ``name`` on ``server`` (``postgresql://user@host:port``); returns its URL."""
    _on_postgres(server, f'CREATE DATABASE "{_database_name(name)}"')
    return f"{server.rstrip('/')}/{name}"


def drop_postgres_database(url: str) -> None:
    """Drop the database a ``create_postgres_database`` URL names (its connections closed first)."""
    server, name = url.rsplit("/", 1)
    _on_postgres(server, f'DROP DATABASE IF EXISTS "{_database_name(name)}" WITH (FORCE)')


def start_label_studio(data_dir: Path, port: int | None = None, files_root: Path | None = None,
                       username: str = "admin@example.com", password: str | None = None,
                       token: str | None = None, timeout: float = 240, postgres: str | None = None) -> ManagedProcess:
    """Label Studio with an admin user and a legacy API token, ready for a backend on loopback. Its database:
    SQLite in ``data_dir``, or ``postgres`` (``postgresql://user[:password]@host[:port]/name``, an existing and
    empty database: Label Studio creates its tables), as the Compose stack runs it."""
    binary = label_studio_venv() / "bin" / "label-studio"
    if not binary.exists():
        raise FileNotFoundError(f"Label Studio is not installed at {binary}; run `make setup` (scripts/setup.sh)")
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    files_root = files_root or data_dir / "files"
    files_root.mkdir(parents=True, exist_ok=True)
    password = password or secrets.token_hex(8)
    token = token or secrets.token_hex(20)  # 40 hex chars, the legacy token format
    env = {
        **os.environ,
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LABEL_STUDIO_USERNAME": username,
        "LABEL_STUDIO_PASSWORD": password,
        "LABEL_STUDIO_USER_TOKEN": token,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        # A backend on a loopback/private address needs both (Label Studio 1.23).
        "ML_BLOCK_LOCAL_IP": "false",
        "SSRF_PROTECTION_ENABLED": "false",
        "LOCAL_FILES_SERVING_ENABLED": "true",
        "LOCAL_FILES_DOCUMENT_ROOT": str(files_root),
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        "COLLECT_ANALYTICS": "false",
        "LATEST_VERSION_CHECK": "false",
        # bulk prediction imports update the counters of the tasks they touch, not every task's (as Compose)
        "fflag_fix_back_4620_memory_efficient_predictions_import_08012025_short": "true",
    }
    for leaked in ("VIRTUAL_ENV", "PYTHONPATH", "DJANGO_SETTINGS_MODULE"):
        env.pop(leaked, None)
    for database_setting in [key for key in env if key.removeprefix("LABEL_STUDIO_").startswith(("DJANGO_DB", "POSTGRE_"))]:
        env.pop(database_setting)  # Label Studio reads LABEL_STUDIO_<name> before <name>: only ours count
    env.update(postgres_env(postgres) if postgres else {"DJANGO_DB": "sqlite"})
    log = data_dir / "label-studio.log"
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [str(binary), "start", "-b", "--internal-host", "127.0.0.1", "-p", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=data_dir, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    managed = ManagedProcess("label-studio", process, url, log,
                             {"username": username, "password": password, "token": token, "files_root": str(files_root)})
    return _wait_until(lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200, managed, timeout,
                       f"{managed.name} at {url}", every=0.5)


def start_backend(home: Path, port: int | None = None, env: dict[str, str] | None = None,
                  timeout: float = 90) -> ManagedProcess:
    """``labelloop serve`` as its own process, with LABELLOOP_HOME (models, cache) under ``home``."""
    return _start_labelloop_http("backend", "serve", "/health", home, port, env, timeout)


def _start_labelloop_http(name: str, command: str, health: str, home: Path, port: int | None,
                          env: dict[str, str] | None, timeout: float) -> ManagedProcess:
    """``labelloop <command> --host 127.0.0.1 --port <port>`` as its own process group (LABELLOOP_HOME
    under ``home``, log there); ready when ``health`` answers 200."""
    port = port or free_port()
    home.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "LABELLOOP_HOME": str(home), **(env or {})}
    log = home / f"{name}-{port}.log"
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "labelloop.cli", command, "--host", "127.0.0.1", "--port", str(port)],
            env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    managed = ManagedProcess(name, process, url, log)
    return _wait_until(lambda: httpx.get(f"{url}{health}", timeout=2).status_code == 200, managed, timeout,
                       f"{name} at {url}", every=0.5)


def start_redis(data_dir: Path, port: int | None = None, timeout: float = 20) -> ManagedProcess:
    """A private redis-server (nothing kept on disk) for tests and the local stack."""
    import shutil

    binary = shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError("redis-server not found; install Debian's redis-server (scripts/setup.sh does)")
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir / f"redis-{port}.log"
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(data_dir)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    managed = ManagedProcess("redis", process, f"redis://127.0.0.1:{port}/0", log)

    def pong() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")

    return _wait_until(pong, managed, timeout, f"redis-server on {port}")


def _wait_until(probe, managed: ManagedProcess, timeout: float, what: str, every: float = 0.2) -> ManagedProcess:
    """Poll ``probe()`` (exceptions count as not yet) until true; stop the process and fail on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if probe():
                return managed
        except Exception:
            pass
        if managed.process.poll() is not None or time.monotonic() > deadline:
            managed.stop()
            raise RuntimeError(f"{what} did not start\n{_tail(managed.log)}")
        time.sleep(every)


def start_worker(home: Path, queues: str = "train,predict", env: dict[str, str] | None = None,
                 name: str | None = None, timeout: float = 60) -> ManagedProcess:
    """``labelloop worker`` as its own process group; ready when Celery says so in its log."""
    home.mkdir(parents=True, exist_ok=True)
    name = name or f"{queues.replace(',', '+')}-{secrets.token_hex(3)}"
    full_env = {**os.environ, "LABELLOOP_HOME": str(home), **(env or {})}
    log = home / f"worker-{name}.log"
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "labelloop.cli", "worker", "--queues", queues, "--hostname", f"{name}@%h"],
            env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    managed = ManagedProcess("worker", process, "", log, {"name": name})
    return _wait_until(lambda: b"ready." in log.read_bytes(), managed, timeout, f"worker {name}", every=0.3)


def start_flower(home: Path, port: int | None = None, env: dict[str, str] | None = None,
                 timeout: float = 60) -> ManagedProcess:
    """``labelloop flower`` on 127.0.0.1 as its own process group; ready when /healthcheck answers."""
    return _start_labelloop_http("flower", "flower", "/healthcheck", home, port, env, timeout)


def start_mongod(data_dir: Path, port: int | None = None, timeout: float = 30) -> ManagedProcess:
    """A private mongod (the one scripts/setup.sh installs apart) for FiftyOne: tests and the local stack.

    Every process that uses FiftyOne gets ``FIFTYONE_DATABASE_URI=<url>``; FiftyOne then starts no
    mongod of its own (and does not share one with other runs of the same user).
    """
    from labelloop.fo.env import mongod_binary

    binary = mongod_binary()
    if not binary.exists():
        raise FileNotFoundError(f"mongod not found at {binary}; run `make setup` (scripts/setup.sh)")
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    db_dir = data_dir / "db"
    db_dir.mkdir(exist_ok=True)
    log = data_dir / f"mongod-{port}.log"
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [str(binary), "--dbpath", str(db_dir), "--port", str(port), "--bind_ip", "127.0.0.1"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"mongodb://127.0.0.1:{port}"
    managed = ManagedProcess("mongod", process, url, log)

    def ping() -> bool:
        import pymongo

        client = pymongo.MongoClient(url, serverSelectionTimeoutMS=1000, connectTimeoutMS=1000)
        try:
            return bool(client.admin.command("ping"))
        finally:
            client.close()

    return _wait_until(ping, managed, timeout, f"mongod on {port}")


def start_fiftyone_app(env: dict[str, str], port: int | None = None, dataset: str | None = None,
                       timeout: float = 90, log_dir: Path | None = None) -> ManagedProcess:
    """``labelloop app`` (FiftyOne's App server, /media limited to the media folders) as its own process group.

    ``env`` is the whole environment of the App: FIFTYONE_DATABASE_URI, FIFTYONE_PLUGINS_DIR, ... (see
    labelloop.fo.env), LABELLOOP_HOME / LABELLOOP_CACHE_DIR / LABELLOOP_APP_MEDIA_ROOTS for the media it
    may serve (labelloop.fo.app). ``dataset`` only names the one to open: ``info["dataset_url"]``. Ready
    when ``GET /`` answers 200 (~15-18 s: the import and the server's start).
    """
    port = port or free_port()
    if log_dir is None:  # the App's LABELLOOP_HOME, as labelloop.config reads it
        log_dir = Path(env.get("LABELLOOP_HOME", str(Path.home() / ".labelloop"))).expanduser() / "fiftyone-app"
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"app-{port}.log"
    command = [sys.executable, "-m", "labelloop.cli", "app", "--address", "127.0.0.1", "--port", str(port)]
    with open(log, "ab") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=log_dir,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    info = {"dataset": dataset, "dataset_url": f"{url}/datasets/{dataset}" if dataset else url}
    managed = ManagedProcess("fiftyone-app", process, url, log, info)
    return _wait_until(lambda: httpx.get(f"{url}/", timeout=2).status_code == 200, managed, timeout,
                       f"{managed.name} at {url}", every=0.5)


def start_delegated(env: dict[str, str], log_dir: Path, timeout: float = 90) -> ManagedProcess:
    """``labelloop delegated`` (FiftyOne's delegated-operation service) as its own process group.

    ``env`` is its whole environment, as for the App (FIFTYONE_DATABASE_URI, LABEL_STUDIO_*, REDIS_URL for
    out-of-sample folds on Celery, ...). Ready when it says it is running (after importing FiftyOne).
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"delegated-{secrets.token_hex(3)}.log"
    with open(log, "ab") as out:
        # unbuffered: the readiness line is a print of FiftyOne's CLI, into a file
        process = subprocess.Popen([sys.executable, "-m", "labelloop.cli", "delegated"],
                                   env={**env, "PYTHONUNBUFFERED": "1"}, stdout=out,
                                   stderr=subprocess.STDOUT, cwd=log_dir, start_new_session=True)
    managed = ManagedProcess("delegated", process, "", log)
    return _wait_until(lambda: b"Delegated operation service running" in log.read_bytes(), managed, timeout,
                       "labelloop delegated", every=0.5)
