"""Container health check for the labelloop image (backend, workers, FiftyOne App).

    healthcheck.py http URL   exit 0 if URL answers 2xx within 5 s (backend /health, the App)
    healthcheck.py worker     exit 0 if this container's Celery worker answers a ping through Redis
    healthcheck.py            auto: look at the running command and do one of the above

The worker check pings the node name the worker really runs under (its ``-n`` argument, read
from /proc), so it is right whatever ``--queues``/``--hostname`` the command was given. A worker
busy training still answers: the prefork parent handles control messages, the child trains.
Standard library only, except the worker check (celery, from the image's venv).
"""

from __future__ import annotations

import os
import sys
import urllib.request
from pathlib import Path


def check_http(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            ok = 200 <= response.status < 300
    except Exception as exc:  # any failure is "unhealthy"
        print(f"{url}: {exc}", file=sys.stderr)
        return 1
    return 0 if ok else 1


def _commands() -> list[list[str]]:
    """argv of every process in this container (PID namespace), own process excluded."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        found.append([a.decode(errors="replace") for a in argv if a])
    return found


def _worker_node() -> str | None:
    for argv in _commands():
        if "celery" in " ".join(argv) and "worker" in argv and "-n" in argv:
            index = argv.index("-n")
            if index + 1 < len(argv):
                return argv[index + 1]
    return None


def check_worker() -> int:
    node = _worker_node()
    if node is None:
        print("no Celery worker process in this container (yet)", file=sys.stderr)
        return 1
    from labelloop.tasks.celery_app import app

    try:
        replies = app.control.ping(destination=[node], timeout=5)
    except Exception as exc:  # Redis down or similar
        print(f"ping {node}: {exc}", file=sys.stderr)
        return 1
    if not any(node in reply for reply in replies or []):
        print(f"worker {node} did not answer a ping", file=sys.stderr)
        return 1
    return 0


def check_auto() -> int:
    for argv in _commands():
        text = " ".join(argv)
        if "celery" in text and "worker" in argv:
            return check_worker()
        if "labelloop" in text and "serve" in argv:
            port = argv[argv.index("--port") + 1] if "--port" in argv[:-1] else "9090"
            return check_http(f"http://127.0.0.1:{port}/health")
        if ("fiftyone" in text and "app" in argv and "launch" in argv) or ("labelloop" in text and "app" in argv):
            port = argv[argv.index("--port") + 1] if "--port" in argv[:-1] else "5151"
            return check_http(f"http://127.0.0.1:{port}/")
    print("none of labelloop serve / labelloop worker / labelloop app runs here", file=sys.stderr)
    return 1


def main(argv: list[str]) -> int:
    if not argv:
        return check_auto()
    if argv[0] == "http" and len(argv) == 2:
        return check_http(argv[1])
    if argv[0] == "worker" and len(argv) == 1:
        return check_worker()
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
