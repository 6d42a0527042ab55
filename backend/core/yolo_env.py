"""Make ultralytics run offline, in a project-owned config dir, before it is first imported.

ultralytics downloads fonts, checks for updates and may pip-install missing packages; on a machine
without internet each of those is a failure or a stall. ``prepare()`` is called by every code path
that imports ultralytics (through ``import_yolo()``), so no face can forget it.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from labelloop.config import settings

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
