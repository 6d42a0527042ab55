"""The FiftyOne App server, with its ``/media`` route limited to the folders labelloop's datasets use.

FiftyOne's ``/media?filepath=<path>`` answers with any file the server process can read (its
``Media`` endpoint stats and streams the path as given), and the App has no login. ``labelloop app``
runs the same server the way ``fiftyone/server/main.py`` does, with its Starlette app wrapped in
:class:`MediaRootsMiddleware`: a ``filepath`` outside the allowed roots gets 403 before FiftyOne sees
the request. The allowed roots:

* ``<LABELLOOP_HOME>/fiftyone-media/`` — every synced image lives there (fo/sync.py, own_copy);
* ``<LABELLOOP_CACHE_DIR>/media/`` — samples of datasets synced before they owned their images;
* each folder of ``LABELLOOP_APP_MEDIA_ROOTS`` (comma-separated), for datasets made by hand.

No other route of the server reads a file named by the request: ``/plugins`` and ``/`` are
Starlette ``StaticFiles`` under fixed folders (they refuse ``..``), and the remaining routes take
sample ids, not paths.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from labelloop.config import Settings
from labelloop.config import settings as current_settings

log = logging.getLogger(__name__)

MEDIA_ROUTE = "/media"
ROOTS_VARIABLE = "LABELLOOP_APP_MEDIA_ROOTS"


def media_roots(env: Settings | None = None) -> list[Path]:
    """The folders whose files the App may serve, symlinks resolved."""
    env = env or current_settings()
    roots = [env.home / "fiftyone-media", env.cache_dir / "media"]
    roots += [Path(p.strip()).expanduser() for p in os.environ.get(ROOTS_VARIABLE, "").split(",") if p.strip()]
    return [root.resolve() for root in roots]


def is_allowed(filepath: str, roots: list[Path]) -> bool:
    """Whether ``filepath``, once symlinks and ``..`` are resolved, lies inside one of ``roots``."""
    try:
        # resolve() against the process's cwd, as FiftyOne's os.stat/open of a relative path would
        resolved = Path(filepath).resolve()
    except (OSError, ValueError, RuntimeError):  # NUL byte, symlink loop, unreadable parent
        return False
    return any(resolved.is_relative_to(root) for root in roots)


class MediaRootsMiddleware:
    """ASGI middleware: ``/media`` requests whose ``filepath`` is outside the roots get 403.

    Every other request (other routes, websockets, lifespan) passes through untouched.
    """

    def __init__(self, app, roots=media_roots):
        self.app = app
        # a callable, evaluated per request: a root created (or re-linked) after the start still counts
        self.roots = roots

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and _route_path(scope) == MEDIA_ROUTE:
            from starlette.requests import Request
            from starlette.responses import PlainTextResponse

            # the same parsing FiftyOne's endpoint uses; every value is checked, whichever it would pick
            paths = Request(scope).query_params.getlist("filepath")
            roots = self.roots()
            if any(p and not is_allowed(p, roots) for p in paths):
                # %.300s: the paths come from the client, so the log line stays bounded
                log.warning("refused /media filepath outside the media roots: %.300s", paths)
                response = PlainTextResponse("Forbidden: this file is outside the App's media folders "
                                             f"(see {ROOTS_VARIABLE})", status_code=403)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _route_path(scope) -> str:
    """The path Starlette's router matches: starlette._utils.get_route_path (private, so copied)."""
    path, root = scope["path"], scope.get("root_path", "")
    if not root or not path.startswith(root):
        return path
    if path == root:
        return ""
    return path[len(root):] if path[len(root)] == "/" else path


def serve_app(address: str = "127.0.0.1", port: int = 5151) -> None:
    """Run FiftyOne's App server (``fiftyone.server.main.start_server``'s setup) with the media check."""
    # What fiftyone/server/main.py sets before importing fiftyone: the process is the App server
    # (no singleton cache, no last-loaded writes) and may start services.
    os.environ.pop("FIFTYONE_DISABLE_SERVICES", None)
    os.environ["FIFTYONE_SERVER"] = "1"
    from labelloop.fo.env import import_fiftyone

    fo = import_fiftyone()
    import asyncio

    import fiftyone.constants as foc
    from fiftyone.server.app import app
    from fiftyone.server.events import set_port
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    debug = fo.config.logging_level == "DEBUG"
    if debug:
        logging.getLogger("asyncio").setLevel(logging.DEBUG)
    config = Config()
    config.bind = [f"{address}:{port}"]
    set_port(port)
    config.use_reloader = foc.DEV_INSTALL
    log.info("FiftyOne App on http://%s:%s; /media serves only %s", address, port,
             ", ".join(str(r) for r in media_roots()))
    asyncio.run(serve(MediaRootsMiddleware(app), config), debug=debug)
