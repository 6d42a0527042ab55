"""What a label-studio-ml-backend user brings along works here (issue 11, first slice): GET /, GET /versions
as Label Studio calls it, the ``score_threshold`` tag attribute, upstream's environment names, the CLI's
``--version`` and help defaults, and model weights by name (``yolo11n.pt``) — the last without a network:
the download and the network check are injected, and the suite runs with LABELLOOP_OFFLINE=true.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from labelloop import __version__, config
from labelloop.config import is_weights_name, settings
from labelloop.core.labelconfig import LabelConfigError, parse_label_config, resolve_model_path, threshold_for
from labelloop.core.registry import Registry
from labelloop.core.safe_load import UnsafeWeightsError
from labelloop.core.yolo_env import WeightsUnavailableError, fetch_weights, network_available

pytestmark = pytest.mark.unit  # pure logic and in-process requests, no server: `make test-fast`

AUTH = {"Authorization": "Basic " + base64.b64encode(b"ls:secret").decode()}
DETECT = ('<View><Image name="image" value="$image"/>'
          '<RectangleLabels name="label" toName="image"><Label value="a"/></RectangleLabels></View>')


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Each test sees config's once-per-process deprecation lines afresh; no Redis is reached."""
    monkeypatch.setattr(config, "_warned", set())
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:9/0")  # the discard port: refused at once
    for name in ("LABEL_STUDIO_HOST", "LABEL_STUDIO_ACCESS_TOKEN", "MODEL_SCORE_THRESHOLD", "THREADS", "WORKERS"):
        monkeypatch.delenv(name, raising=False)


def harmless_checkpoint(path: Path) -> Path:
    """A file check_weights accepts (a legacy-format pickle of plain values): no torch needed."""
    path.write_bytes(pickle.dumps({"epoch": 3, "names": {0: "a"}}, protocol=2))
    return path


def evil_checkpoint(path: Path, marker: Path) -> Path:
    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path.write_bytes(pickle.dumps(Payload(), protocol=2))
    return path


def add_version(registry: Registry, project: int, tmp_path: Path, promote: bool = True) -> str:
    weights = harmless_checkpoint(tmp_path / f"w{project}.pt")
    version = registry.add_version(project, weights, {"parent": None, "task": "detect", "task_type": "detection",
                                                      "classes": ["a"]}).version
    if promote:
        registry.promote(project, version, "test")
    return version


def app_client(tmp_path: Path, **changes) -> TestClient:
    from labelloop.service.app import create_app

    env = dataclasses.replace(settings(), model_dir=tmp_path / "models", warm_start_steps=0, **changes)
    return TestClient(create_app(env), raise_server_exceptions=False)


# -- GET / ------------------------------------------------------------------------------------------------

def test_root_answers_like_upstreams_health_without_auth_and_tells_nothing_about_projects(tmp_path):
    registry = Registry(tmp_path / "models")
    version = add_version(registry, 41, tmp_path)
    base = harmless_checkpoint(tmp_path / "secret-base-name.pt")
    client = app_client(tmp_path, basic_auth_user="ls", basic_auth_pass="secret", base_model=str(base))
    answer = client.get("/")  # no credentials, like /health
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["status"] == "UP" and body["model_class"] == "labelloop" and body["version"] == __version__
    assert version not in answer.text and "41" not in answer.text and "secret-base-name" not in answer.text
    # open on purpose, like /health; everything else still needs the basic auth
    assert client.get("/versions").status_code == 401
    assert client.get("/health").json()["models"] == {"41": version}
    doc = client.get("/openapi.json", headers=AUTH).json()
    assert "security" not in doc["paths"]["/"]["get"] and doc["paths"]["/versions"]["get"]["security"]
    # "/" has its own Prometheus label; an invented path still falls into "other"
    client.get("/no-such-path")
    metrics = client.get("/metrics", headers=AUTH).text
    assert 'labelloop_http_requests_total{endpoint="/",method="GET",status="200"} 1.0' in metrics
    assert 'endpoint="other"' in metrics and 'endpoint="/no-such-path"' not in metrics


# -- GET /versions ------------------------------------------------------------------------------------

def test_versions_never_mixes_projects_when_the_request_names_none(tmp_path):
    registry = Registry(tmp_path / "models")
    first = add_version(registry, 1, tmp_path, promote=False)
    second = add_version(registry, 1, tmp_path)
    other = add_version(registry, 2, tmp_path)
    client = app_client(tmp_path)
    # Label Studio's GET /api/ml/{id}/versions sends GET /versions and nothing that names its project
    blind = client.get("/versions")
    assert blind.status_code == 200, blind.text
    body = blind.json()
    assert body["versions"] == [] and body["details"] == [] and body["serving"] == {}
    assert "?project=" in body["message"] and "2 projects" in body["message"]
    for project, uid in (("1", "1"), ("1", "1.1700000000")):  # a bare id or Label Studio's project uid
        scoped = client.get("/versions", params={"project": uid}).json()
        assert scoped["project"] == project and scoped["versions"] == [second, first]  # newest first
        assert scoped["serving"] == {"1": second}
        assert [d["version"] for d in scoped["details"]] == [second, first]
        assert [d["serving"] for d in scoped["details"]] == [True, False]
        assert other not in str(scoped) and "message" not in scoped
    assert client.get("/versions", params={"project": "2"}).json()["versions"] == [other]
    assert client.get("/versions", params={"project": "3"}).json()["versions"] == []
    assert client.get("/versions", params={"project": "../1"}).status_code == 422


def test_versions_answers_the_one_project_it_knows_and_counts_projects_connected_by_setup(tmp_path):
    registry = Registry(tmp_path / "models")
    version = add_version(registry, 5, tmp_path)
    client = app_client(tmp_path)
    assert client.get("/versions").json()["versions"] == [version]  # one project: Label Studio's call is its
    # a second project connects (no model yet): the same blind call could now come from either
    assert client.post("/setup", json={"project": "6.1700000000", "schema": DETECT}).status_code == 200
    blind = client.get("/versions").json()
    assert blind["versions"] == [] and "?project=" in blind["message"]
    assert client.get("/versions", params={"project": 5}).json()["versions"] == [version]
    empty = app_client(tmp_path / "nothing").get("/versions").json()
    assert empty["versions"] == [] and empty["project"] is None and "message" not in empty


# -- score_threshold ----------------------------------------------------------------------------------

def _tag(attributes: str) -> str:
    return ('<View><Image name="image" value="$image"/>'
            f'<RectangleLabels name="r" toName="image" {attributes}><Label value="a"/></RectangleLabels></View>')


def test_the_older_score_threshold_attribute_is_honoured_and_validated():
    env = dataclasses.replace(settings(), score_threshold=0.5)
    spec = parse_label_config(_tag('score_threshold="0.35"'))
    assert spec.score_threshold == pytest.approx(0.35) and threshold_for(spec, env) == pytest.approx(0.35)
    both = parse_label_config(_tag('model_score_threshold="0.2" score_threshold="0.9"'))
    assert threshold_for(both, env) == pytest.approx(0.2)  # the upstream YOLO example's name wins
    assert threshold_for(parse_label_config(_tag("")), env) == pytest.approx(0.5)
    for raw, message in (("1.5", "score_threshold must be in [0, 1]"), ("-0.1", "must be in [0, 1]"),
                         ("nan", "must be in [0, 1]"), ("high", "score_threshold='high' is not a number")):
        with pytest.raises(LabelConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            parse_label_config(_tag(f'score_threshold="{raw}"'))
    with pytest.raises(LabelConfigError, match="model_score_threshold"):  # the one that was read is named
        parse_label_config(_tag('model_score_threshold="2" score_threshold="0.3"'))


# -- upstream environment names -----------------------------------------------------------------------

def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "labelloop.config" and r.levelno == logging.WARNING]


def test_upstream_env_names_are_read_with_one_deprecation_line_each(monkeypatch, caplog):
    for ours in config.UPSTREAM_ALIASES:
        monkeypatch.delenv(ours, raising=False)
    monkeypatch.setenv("LABEL_STUDIO_HOST", "http://studio:8080/")
    monkeypatch.setenv("LABEL_STUDIO_ACCESS_TOKEN", "legacy-token")
    monkeypatch.setenv("MODEL_SCORE_THRESHOLD", "0.3")
    monkeypatch.setenv("THREADS", "5")
    caplog.set_level(logging.WARNING, logger="labelloop.config")
    env = settings()
    assert env.label_studio_url == "http://studio:8080" and env.label_studio_api_key == "legacy-token"
    assert env.score_threshold == pytest.approx(0.3) and env.predict_workers == 5
    settings()
    settings()  # read again and again (every request does): still one line per name
    lines = _warnings(caplog)
    assert len(lines) == 4, lines
    for upstream, ours in (("LABEL_STUDIO_HOST", "LABEL_STUDIO_URL"), ("LABEL_STUDIO_ACCESS_TOKEN", "LABEL_STUDIO_API_KEY"),
                           ("MODEL_SCORE_THRESHOLD", "LABELLOOP_SCORE_THRESHOLD"), ("THREADS", "LABELLOOP_PREDICT_WORKERS")):
        assert sum(upstream in line and ours in line and "deprecated" in line for line in lines) == 1, upstream
    assert "legacy-token" not in " ".join(lines)  # the line names variables, never their values


def test_our_names_win_over_upstreams_and_say_so_once(monkeypatch, caplog):
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://ours:8080")
    monkeypatch.setenv("LABEL_STUDIO_HOST", "http://theirs:8080")
    monkeypatch.setenv("LABELLOOP_PREDICT_WORKERS", "3")
    monkeypatch.setenv("THREADS", "8")
    caplog.set_level(logging.WARNING, logger="labelloop.config")
    env = settings()
    settings()
    assert env.label_studio_url == "http://ours:8080" and env.predict_workers == 3
    lines = _warnings(caplog)
    assert len(lines) == 2, lines
    assert all("is ignored" in line for line in lines)
    assert any("LABEL_STUDIO_HOST" in line and "LABEL_STUDIO_URL is set and wins" in line for line in lines)


def test_upstream_workers_is_ignored_with_the_reason(monkeypatch, caplog):
    monkeypatch.delenv("LABELLOOP_PREDICT_WORKERS", raising=False)
    monkeypatch.setenv("WORKERS", "4")
    caplog.set_level(logging.WARNING, logger="labelloop.config")
    assert settings().predict_workers == 2  # not read as anything
    settings()
    (line,) = _warnings(caplog)
    assert "WORKERS=4" in line and "ignored" in line and "LABELLOOP_PREDICT_WORKERS" in line


def test_a_warning_line_is_once_per_process_not_per_import():
    """A fresh process that reads its settings three times prints the deprecation line once."""
    code = "from labelloop.config import settings\nfor _ in range(3): settings()\n"
    env = {**os.environ, "MODEL_SCORE_THRESHOLD": "0.4"}
    env.pop("LABELLOOP_SCORE_THRESHOLD", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("MODEL_SCORE_THRESHOLD") == 1, done.stderr


# -- the CLI ------------------------------------------------------------------------------------------

def test_version_flag_prints_the_package_version(capsys):
    from importlib.metadata import version

    from labelloop.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"labelloop {__version__}"
    assert version("labelloop") == __version__  # the installed distribution and the package agree
    script = Path(sys.executable).with_name("labelloop")
    for argv in ([sys.executable, "-m", "labelloop.cli", "--version"], [str(script), "--version"]):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and done.stdout.strip() == f"labelloop {__version__}", (argv, done.stderr)


def _parsers():
    import argparse

    from labelloop.cli import build_parser

    todo = [("labelloop", build_parser())]
    while todo:
        name, parser = todo.pop()
        yield name, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo += [(f"{name} {sub}", p) for sub, p in action.choices.items()]


def test_every_help_shows_each_options_default_once():
    import argparse

    seen = 0
    for name, parser in _parsers():
        text = " ".join(parser.format_help().split())  # argparse wraps lines anywhere
        for action in parser._actions:
            if action.default in (None, False, argparse.SUPPRESS) or not action.help:
                continue
            assert f"(default: {action.default})" in text, f"{name} {action.dest}: default not shown"
            assert "default" not in action.help, f"{name} {action.dest}: the default is stated twice"
            seen += 1
    assert seen >= 15  # every subcommand has some
    serve = dict(_parsers())["labelloop serve"].format_help()
    assert "(default: 9090)" in serve and "(default: 127.0.0.1)" in " ".join(serve.split())


# -- weights by name ----------------------------------------------------------------------------------

def _never(*_args):
    raise AssertionError("must not be called")


def test_the_suite_runs_offline():
    assert settings().offline is True  # tests/conftest.py: nothing in the suite downloads


@pytest.mark.parametrize("value,is_name", [
    ("yolo11n.pt", True), ("yolov8n-seg.pt", True), ("yolov5su.pt", True), ("my_model.v2.pt", True),
    ("dir/yolo11n.pt", False), ("../yolo11n.pt", False), ("/abs/yolo11n.pt", False), ("..pt", False),
    (".hidden.pt", False), ("yolo11n", False), ("yolo11n.yaml", False), ("yolo11n.PT", False),
    ("yolo11n.pt\n", False), ("yolo 11n.pt", False), ("x" * 98 + ".pt", False), ("c:yolo.pt", False),
])
def test_a_model_name_is_one_plain_file_name_ending_in_pt(value, is_name):
    assert is_weights_name(value) is is_name


def test_offline_or_without_network_a_name_is_a_clear_error_and_nothing_is_fetched(tmp_path):
    with pytest.raises(WeightsUnavailableError) as offline:
        fetch_weights("yolo11n.pt", tmp_path, offline=True, online=_never, download=_never)
    message = str(offline.value)
    assert "yolo11n.pt is not a local file and LABELLOOP_OFFLINE=true" in message
    assert "MODEL_ROOT" in message and str(tmp_path) in message
    with pytest.raises(WeightsUnavailableError, match="no network"):
        fetch_weights("yolo11n.pt", tmp_path, offline=False, online=lambda: False, download=_never)
    with pytest.raises(WeightsUnavailableError, match="not an ultralytics model name"):
        fetch_weights("../yolo11n.pt", tmp_path, offline=False, online=_never, download=_never)
    assert list(tmp_path.iterdir()) == []
    present = harmless_checkpoint(tmp_path / "yolo11n.pt")  # already there: no network needed, even offline
    assert fetch_weights("yolo11n.pt", tmp_path, offline=True, online=_never, download=_never) == present


def test_online_a_name_is_downloaded_into_the_weights_dir_and_checked(tmp_path):
    calls = []

    def download(name, target):
        calls.append((name, target))
        return harmless_checkpoint(target)

    weights = tmp_path / "weights"
    got = fetch_weights("yolo11n.pt", weights, offline=False, online=lambda: True, download=download)
    assert got == weights / "yolo11n.pt" and got.is_file() and calls == [("yolo11n.pt", weights / "yolo11n.pt")]
    # ultralytics renames a few legacy names (yolov5s.pt -> yolov5su.pt): the file lands under the asked name
    renamed = fetch_weights("yolov5s.pt", weights, offline=False, online=lambda: True,
                            download=lambda name, target: harmless_checkpoint(target.with_name("yolov5su.pt")))
    assert renamed == weights / "yolov5s.pt" and renamed.is_file() and not (weights / "yolov5su.pt").exists()
    # what the download brings goes through the restricted unpickler, and a refused file does not stay
    marker = tmp_path / "ran"
    with pytest.raises(UnsafeWeightsError, match="os.system|posix.system"):
        fetch_weights("evil.pt", weights, offline=False, online=lambda: True,
                      download=lambda name, target: evil_checkpoint(target, marker))
    assert not (weights / "evil.pt").exists() and not marker.exists()


def test_a_failed_or_empty_download_says_so(tmp_path):
    def broken(name, target):
        raise ConnectionError("Download failure for https://github.com/...")

    with pytest.raises(WeightsUnavailableError, match="download failed .*ConnectionError"):
        fetch_weights("yolo11n.pt", tmp_path, offline=False, online=lambda: True, download=broken)
    with pytest.raises(WeightsUnavailableError, match="ultralytics publishes no weights of that name"):
        fetch_weights("yolo99z.pt", tmp_path, offline=False, online=lambda: True, download=lambda n, t: t)


def test_network_check_is_a_bounded_connect(tmp_path):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert network_available("127.0.0.1", port, timeout=1.0) is True
    assert network_available("127.0.0.1", port, timeout=1.0) is False  # closed now


def test_a_tags_model_path_name_is_fetched_into_model_root_only_when_allowed(tmp_path, monkeypatch):
    from labelloop.core import yolo_env

    spec = parse_label_config(_tag('model_path="yolo11n.pt"'))
    with pytest.raises(LabelConfigError, match="ALLOW_CUSTOM_MODEL_PATH"):
        resolve_model_path(spec, allow_custom=False, model_root=tmp_path, offline=False)
    with pytest.raises(WeightsUnavailableError, match="model_path yolo11n.pt is not a local file and LABELLOOP_OFFLINE"):
        resolve_model_path(spec, allow_custom=True, model_root=tmp_path)  # the suite's LABELLOOP_OFFLINE=true
    monkeypatch.setattr(yolo_env, "network_available", lambda: True)
    monkeypatch.setattr(yolo_env, "_ultralytics_download", lambda name, target: harmless_checkpoint(target))
    got = resolve_model_path(spec, allow_custom=True, model_root=tmp_path, offline=False)
    assert got == (tmp_path / "yolo11n.pt").resolve() and got.is_file()
    # a path with a directory part is never a name: missing is missing
    nested = parse_label_config(_tag('model_path="sub/yolo11n.pt"'))
    with pytest.raises(LabelConfigError, match="does not exist under MODEL_ROOT"):
        resolve_model_path(nested, allow_custom=True, model_root=tmp_path, offline=False)


def test_base_model_name_means_model_root_and_is_fetched_at_start(tmp_path, monkeypatch, caplog):
    from labelloop.cli import fetch_named_base_model
    from labelloop.core import yolo_env

    root = tmp_path / "weights"
    monkeypatch.setenv("MODEL_ROOT", str(root))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LABELLOOP_BASE_MODEL", "yolo11n.pt")
    assert settings().base_model == str(root / "yolo11n.pt")  # not a file here: the weights dir
    caplog.set_level(logging.ERROR, logger="labelloop.cli")
    assert fetch_named_base_model() is None  # offline: logged, and the service starts anyway
    assert any("LABELLOOP_BASE_MODEL yolo11n.pt is not a local file and LABELLOOP_OFFLINE=true" in r.getMessage()
               for r in caplog.records)
    monkeypatch.setenv("LABELLOOP_OFFLINE", "false")
    monkeypatch.setattr(yolo_env, "network_available", lambda: True)
    monkeypatch.setattr(yolo_env, "_ultralytics_download", lambda name, target: harmless_checkpoint(target))
    assert fetch_named_base_model() == root / "yolo11n.pt"
    assert Path(settings().base_model).is_file()
    # ultralytics' order: a file of that name in the working directory is used as it is
    harmless_checkpoint(tmp_path / "local.pt")
    monkeypatch.setenv("LABELLOOP_BASE_MODEL", "local.pt")
    assert settings().base_model == "local.pt"
    monkeypatch.setattr(yolo_env, "_ultralytics_download", _never)
    assert fetch_named_base_model() == Path("local.pt")
    monkeypatch.setenv("LABELLOOP_BASE_MODEL", str(tmp_path / "missing" / "x.pt"))  # a path: never fetched
    assert settings().base_model == str(tmp_path / "missing" / "x.pt") and fetch_named_base_model() is None
