"""Make ultralytics run offline, in a project-owned config dir, before it is first imported; fetch
weights named the ultralytics way (``yolo11n.pt``) when the machine is online.

ultralytics downloads fonts, checks for updates and may pip-install missing packages; on a machine
without internet each of those is a failure or a stall. ``prepare()`` is called by every code path
that imports ultralytics (through ``import_yolo()``), so no face can forget it. Its own offline mode
(``YOLO_OFFLINE=1``: no update check, no telemetry, no DNS probe at import) stays on everywhere.

Weights are the one download labelloop makes for you: ``fetch_weights`` turns a bare model name
(``LABELLOOP_BASE_MODEL=yolo11n.pt``, or a tag's ``model_path`` with ALLOW_CUSTOM_MODEL_PATH) that is
no local file into ``MODEL_ROOT/<name>`` with ultralytics' own downloader (its GitHub release assets),
unless ``LABELLOOP_OFFLINE=true`` or there is no network, which get an error saying what to do instead.
A fetched file goes through the restricted unpickler (``safe_load.check_weights``) before it is kept.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from labelloop.config import is_weights_name, settings
from labelloop.core.labelconfig import LabelConfigError

_prepared = False
log = logging.getLogger(__name__)


def prepare() -> Path:
    """Set ultralytics' offline environment and provide its fonts; idempotent. Returns the config dir."""
    global _prepared
    config_dir = settings().yolo_config_dir
    if _prepared:
        return config_dir
    config_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("YOLO_CONFIG_DIR", str(config_dir))
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    os.environ.setdefault("YOLO_VERBOSE", "false")
    # ultralytics pins OMP_NUM_THREADS=1 when unset, which leaves all but one core idle on CPU.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, os.cpu_count() or 1)))
    _provide_fonts(config_dir)
    _prepared = True
    return config_dir


def _provide_fonts(config_dir: Path) -> None:
    """Plots and dataset checks want Arial.ttf and fetch it from GitHub; give them DejaVuSans instead."""
    wanted = [config_dir / "Arial.ttf", config_dir / "Arial.Unicode.ttf"]
    if all(p.exists() for p in wanted):
        return
    import matplotlib

    source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for target in wanted:
        if not target.exists():
            tmp = target.with_suffix(".tmp")
            shutil.copyfile(source, tmp)
            os.replace(tmp, target)


class _SplitWithoutEveryClass(logging.Filter):
    """ultralytics logs a red ERROR when a classification split lacks a class ("found 13 images in 3
    classes (requires 4 ...)"). With a few dozen labels the tuning split often does: that is
    expected, training and evaluation handle it, and the manifest's per-class counts show it. The
    line is demoted to DEBUG on our own logger instead of alarming a labeler's admin."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.levelno >= logging.ERROR and " classes (requires " in message:
            log.debug("ultralytics: %s", message)
            return False
        return True


def import_yolo():
    """``ultralytics.YOLO``, imported only after ``prepare()``."""
    prepare()
    from ultralytics import YOLO
    from ultralytics.utils import LOGGER, SETTINGS

    if SETTINGS.get("sync"):
        SETTINGS.update({"sync": False})  # no analytics calls
    if not any(isinstance(f, _SplitWithoutEveryClass) for f in LOGGER.filters):
        LOGGER.addFilter(_SplitWithoutEveryClass())
    return YOLO


# -- weights by name ------------------------------------------------------------------------------------

class WeightsUnavailableError(LabelConfigError):
    """A model name that is no local file and cannot be fetched (offline, no network, no such asset).
    A ``LabelConfigError``: the service answers it as a 422 with this message, a training as its reason."""

    kind = "weights_unavailable"


def network_available(host: str = "github.com", port: int = 443, timeout: float = 3.0) -> bool:
    """Whether ultralytics' download host answers a TCP connect within ``timeout`` (name lookup included:
    it runs in a thread so a dead resolver cannot hold the caller longer)."""
    reached: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                reached.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True, name="labelloop-network-probe")
    thread.start()
    thread.join(timeout + 1.0)
    return bool(reached)


def _ultralytics_download(name: str, target: Path) -> Path:
    """ultralytics' own resolution of a model name: its release assets on GitHub, saved at ``target``."""
    prepare()
    from ultralytics.utils.downloads import attempt_download_asset

    return Path(attempt_download_asset(target))


_fetch_lock = threading.Lock()  # one download at a time per process (two requests naming one model)


def fetch_weights(name: str, weights_dir: Path, *, offline: bool, what: str = "model name",
                  online: Callable[[], bool] | None = None,
                  download: Callable[[str, Path], Path] | None = None) -> Path:
    """``weights_dir/<name>`` for an ultralytics model name, downloaded there first when it is missing.

    ``name`` must be a bare ``.pt`` file name (``config.is_weights_name``: no directory part). Nothing is
    downloaded when ``offline`` (LABELLOOP_OFFLINE=true) or ``online()`` says there is no network: a
    ``WeightsUnavailableError`` says where to put the file instead. A downloaded file must pass
    ``safe_load.check_weights`` (else it is deleted and refused). ``online`` and ``download`` default to
    ``network_available`` and ultralytics' downloader (tests pass their own: the suite never downloads)."""
    if not is_weights_name(name):
        raise WeightsUnavailableError(f"{what} {name!r} is not an ultralytics model name (a bare file name "
                                      "ending in .pt, e.g. yolo11n.pt)")
    target = Path(weights_dir) / name
    if target.is_file():
        return target
    hint = (f"put the .pt under MODEL_ROOT ({weights_dir}) or point LABELLOOP_BASE_MODEL / model_path "
            "at a local file")
    if offline:
        raise WeightsUnavailableError(f"{what} {name} is not a local file and LABELLOOP_OFFLINE=true: {hint}")
    with _fetch_lock:
        if target.is_file():  # fetched by another thread meanwhile
            return target
        if not (online or network_available)():
            raise WeightsUnavailableError(f"{what} {name} is not a local file and there is no network "
                                          f"(github.com unreachable): {hint}")
        target.parent.mkdir(parents=True, exist_ok=True)
        log.info("%s %s is not a local file: downloading it into %s", what, name, weights_dir)
        try:
            got = (download or _ultralytics_download)(name, target)
        except Exception as exc:  # the downloader's errors vary (requests, ConnectionError, OSError)
            raise WeightsUnavailableError(f"{what} {name}: download failed ({type(exc).__name__}: {exc}); "
                                          f"{hint}") from None
        got = Path(got)
        if got != target and got.is_file():
            os.replace(got, target)  # ultralytics renames a few legacy names (yolov5s.pt -> yolov5su.pt)
        if not target.is_file():
            raise WeightsUnavailableError(f"{what} {name}: ultralytics publishes no weights of that name; {hint}")
    from labelloop.core.safe_load import check_weights

    try:
        check_weights(target, trusted_roots=())
    except LabelConfigError:
        target.unlink(missing_ok=True)  # never leave a refused file where the next call would find it
        raise
    return target
