"""Shared fixtures: real Label Studio, real `labelloop serve`, models trained by the suite.

Everything is started as the user would start it (see labelloop.dev.localstack) and stopped at the end
of the session. Models are trained once per run on generated data through the engine itself.
"""

from __future__ import annotations

import functools
import http.server
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

# Nothing in the suite downloads: a model name (yolo11n.pt) is never fetched, here or in the processes it starts.
os.environ["LABELLOOP_OFFLINE"] = "true"
# Isolate every process of the run (this one included) before labelloop reads its settings.
_RUN_HOME = Path(os.environ.get("LABELLOOP_TEST_HOME", "")) if os.environ.get("LABELLOOP_TEST_HOME") else None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A private Redis for the whole run; every process started by the suite inherits REDIS_URL."""
    from labelloop.dev.localstack import start_redis

    process = start_redis(tmp_path_factory.mktemp("redis"))
    os.environ["REDIS_URL"] = process.url
    yield process
    process.stop()


@pytest.fixture(scope="session")
def run_home(tmp_path_factory, redis_server) -> Path:
    home = _RUN_HOME or tmp_path_factory.mktemp("labelloop-home")
    os.environ["LABELLOOP_HOME"] = str(home)
    # ultralytics config and fonts are shared across runs: prepared once, never downloaded.
    os.environ.setdefault("YOLO_CONFIG_DIR", str(Path.home() / ".cache" / "labelloop" / "ultralytics"))
    return home


# -- data and models ----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def shapes_train(tmp_path_factory, run_home):
    from labelloop.dev.shapes import generate_shapes

    return generate_shapes(tmp_path_factory.mktemp("shapes-train"), n=80, seed=11)


@pytest.fixture(scope="session")
def shapes_single(tmp_path_factory, run_home):
    """One object per image: the classification variant."""
    from labelloop.dev.shapes import generate_shapes

    return generate_shapes(tmp_path_factory.mktemp("shapes-single"), n=80, seed=12, max_objects=1)


@pytest.fixture(scope="session")
def shapes_eval(tmp_path_factory, run_home):
    """Unseen images the tests predict on."""
    from labelloop.dev.shapes import generate_shapes

    return generate_shapes(tmp_path_factory.mktemp("shapes-eval"), n=12, seed=99)


EPOCHS = {"detection": 30, "segmentation": 30, "classification": 20}


@dataclass
class TrainedModel:
    task_type: str
    weights: Path
    manifest: dict


@pytest.fixture(scope="session")
def trained(tmp_path_factory, run_home, shapes_train, shapes_single):
    """task type → a small model trained by the engine on generated data (once per run, lazily)."""
    from labelloop.core.labelconfig import parse_label_config
    from labelloop.core.registry import Registry
    from labelloop.dev.shapes import label_config, to_label_studio_tasks
    from labelloop.labelstudio.media import LocalFileFetcher
    from labelloop.workflows.pipeline import train_new_version

    registry = Registry(tmp_path_factory.mktemp("trained-models"))
    cache: dict[str, TrainedModel] = {}

    def get(task_type: str) -> TrainedModel:
        if task_type not in cache:
            data = shapes_single if task_type == "classification" else shapes_train
            spec = parse_label_config(label_config(task_type))
            os.environ["LABELLOOP_EPOCHS"] = str(EPOCHS[task_type])
            try:
                outcome = train_new_version(registry, task_type, to_label_studio_tasks(data, task_type), spec,
                                            LocalFileFetcher())
            finally:
                os.environ.pop("LABELLOOP_EPOCHS", None)
            cache[task_type] = TrainedModel(task_type, outcome.manifest.weights, outcome.manifest.to_json())
        return cache[task_type]

    return get


@pytest.fixture(scope="session")
def simple_classifier(tmp_path_factory, run_home):
    """(manifest, data, folder): a classifier the engine trained on 120 of the demo's 'simple' shapes (light
    shapes on a dark ground, 64 px), with its own registry; for tests that need a model that learned."""
    from labelloop.core.labelconfig import parse_label_config
    from labelloop.core.registry import Registry
    from labelloop.dev.shapes import generate_shapes, label_config, to_label_studio_tasks
    from labelloop.labelstudio.media import LocalFileFetcher
    from labelloop.workflows.pipeline import train_new_version

    home = tmp_path_factory.mktemp("simple-classifier")
    data = generate_shapes(home / "train", n=120, seed=5, size=64, max_objects=1, style="simple")
    outcome = train_new_version(Registry(home / "models"), "simple", to_label_studio_tasks(data, "classification"),
                                parse_label_config(label_config("classification")), LocalFileFetcher())
    return outcome.manifest, data, home


def install_model(model_dir: Path, project: int | str, model: TrainedModel) -> str:
    """Put a trained model into a registry as the project's version in service (what a training job does)."""
    from labelloop.core.registry import Registry

    registry = Registry(model_dir)
    keep = {k: v for k, v in model.manifest.items() if k not in ("version", "project", "created_at", "weights_sha256")}
    version = registry.add_version(project, model.weights, keep).version
    registry.promote(project, version, "installed by the test suite")
    return version


def wait_for(condition, timeout: float, what: str, every: float = 0.5):
    """Poll ``condition`` until it returns something truthy (returned), or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# -- Label Studio -------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def label_studio(tmp_path_factory, run_home):
    from labelloop.dev.localstack import start_label_studio

    process = start_label_studio(tmp_path_factory.mktemp("label-studio"))
    yield process
    process.stop()


@pytest.fixture(scope="session")
def ls_api(label_studio):
    """The labeler's and admin's REST calls (the same client the demo uses)."""
    from labelloop.dev.labeler import LabelerClient

    with LabelerClient(label_studio.url, label_studio.info["token"]) as client:
        yield client


@pytest.fixture(scope="session")
def backend_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("backend-home")


@pytest.fixture(scope="session")
def backend(label_studio, backend_home):
    """`labelloop serve` connected to the test Label Studio with the admin's legacy token."""
    from labelloop.dev.localstack import start_backend

    process = start_backend(backend_home, env={
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": label_studio.info["token"],
        "YOLO_CONFIG_DIR": os.environ["YOLO_CONFIG_DIR"],
    })
    process.info["model_dir"] = backend_home / "models"
    yield process
    process.stop()


# -- a plain image host (for http(s) URLs in tasks) ----------------------------------------------------

@pytest.fixture(scope="session")
def image_host(shapes_eval):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(shapes_eval.images_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


# -- FiftyOne ------------------------------------------------------------------------------------------
# No test module imports fiftyone at import time: the environment below must be set first.

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def mongod(tmp_path_factory, run_home):
    """A private mongod for the run; every FiftyOne of the run (this process, the App, workers) uses it.

    FiftyOne's settings go into os.environ before anything imports fiftyone, so processes started by
    the suite inherit them; its dirs live under the run's home, its plugins are the project's.
    """
    from labelloop.dev.localstack import start_mongod

    process = start_mongod(tmp_path_factory.mktemp("mongod"))
    home = run_home / "fiftyone"
    os.environ.update({
        "FIFTYONE_DATABASE_URI": process.url,
        "FIFTYONE_DATABASE_VALIDATION": "false",
        "FIFTYONE_DO_NOT_TRACK": "true",
        "FIFTYONE_PLUGINS_DIR": str(REPO / "fiftyone_plugins"),
        "FIFTYONE_MODEL_ZOO_DIR": str(home / "zoo" / "models"),
        "FIFTYONE_DATASET_ZOO_DIR": str(home / "zoo" / "datasets"),
        "FIFTYONE_DEFAULT_DATASET_DIR": str(home / "datasets"),
        "FIFTYONE_CONFIG_PATH": str(home / "config.json"),
        "FIFTYONE_APP_CONFIG_PATH": str(home / "app_config.json"),
    })
    yield process
    _close_fiftyone()
    process.stop()


def _close_fiftyone() -> None:
    """Do FiftyOne's exit-time clean-up now, while the mongod is up, and drop its connection.

    FiftyOne registers an atexit handler that queries the database; run after the mongod stopped,
    it waits for pymongo's 30 s server selection timeout before the interpreter exits.
    """
    import atexit
    import sys

    database = sys.modules.get("fiftyone.core.odm.database")
    if database is None:  # nothing imported fiftyone in this process
        return
    cleanup = database._delete_non_persistent_datasets_if_allowed
    atexit.unregister(cleanup)
    if database._client is not None:
        cleanup()
    database._disconnect()


@pytest.fixture(scope="session")
def fo(mongod):
    """The ``fiftyone`` module, imported once the environment points at the run's mongod."""
    from labelloop.fo.env import import_fiftyone

    return import_fiftyone()
