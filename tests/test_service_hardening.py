"""The HTTP face under attack: safe defaults, an authenticated webhook, bounded work (issue 9).

Each case runs against a real ``labelloop serve`` process (started as a user starts it) except the
few that need a second configuration, which use the same app in process. The served model is a tiny
untrained classifier put in the registry the way a training job does: the checks are about the
service, not about what the model predicts.
"""

from __future__ import annotations

import base64
import dataclasses
import http.server
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from labelloop.dev.shapes import CLASSES, label_config

CLASSIFY = label_config("classification")
SECRET = "hook-secret-7f3a"
AUTH = {"Authorization": "Basic " + base64.b64encode(b"ls:secret").decode()}
HOOK = {"X-Labelloop-Webhook-Secret": SECRET}
SERVED_PROJECT = 7  # has a model in the registry, so the backend knows it without /setup
PREDICT_WORKERS = 2
MAX_TASKS = 20
BURST = 3

TINY_MODEL = """
import sys, torch
from ultralytics.nn.tasks import ClassificationModel
model = ClassificationModel("yolov8n-cls.yaml", nc=len(sys.argv) - 2, verbose=False)
model.names = dict(enumerate(sys.argv[2:]))
torch.save({"model": model.half(), "train_args": {"task": "classify", "imgsz": 64}}, sys.argv[1])
"""


def _png() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(out, format="PNG")
    return out.getvalue()


class ImageHost:
    """Serves one PNG; under /slow/ it holds each request until ``release`` is set (a busy /predict)."""

    def __init__(self):
        self.release = threading.Event()
        self.slow_arrivals = 0
        self._lock = threading.Lock()
        png, host = _png(), self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.startswith("/slow/"):
                    with host._lock:
                        host.slow_arrivals += 1
                    host.release.wait(30)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                self.wfile.write(png)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.server.shutdown()


@pytest.fixture(scope="module")
def images():
    host = ImageHost()
    yield host
    host.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory, run_home, redis_server, images):
    """`labelloop serve` with basic auth, a webhook secret and small limits, on its own Redis database."""
    from labelloop.core.registry import Registry
    from labelloop.dev.localstack import start_backend
    from labelloop.tasks.jobstore import connect

    home = tmp_path_factory.mktemp("hardened")
    weights = home / "tiny-cls.pt"
    subprocess.run([sys.executable, "-c", TINY_MODEL, str(weights), *CLASSES], check=True, capture_output=True,
                   env={**os.environ, "YOLO_CONFIG_DIR": os.environ["YOLO_CONFIG_DIR"]}, timeout=120)
    registry = Registry(home / "models")
    version = registry.add_version(SERVED_PROJECT, weights, {
        "parent": None, "task": "classify", "task_type": "classification", "classes": list(CLASSES)}).version
    registry.promote(SERVED_PROJECT, version, "installed by the test suite")
    redis_url = redis_server.url.rsplit("/", 1)[0] + "/4"  # jobs enqueued here are never run
    connect(redis_url).flushdb()
    process = start_backend(home, env={
        "MODEL_DIR": str(home / "models"),
        "REDIS_URL": redis_url,
        "YOLO_CONFIG_DIR": os.environ["YOLO_CONFIG_DIR"],
        "LABELLOOP_ALLOWED_HOSTS": images.url.removeprefix("http://"),
        "BASIC_AUTH_USER": "ls", "BASIC_AUTH_PASS": "secret",
        "LABELLOOP_WEBHOOK_SECRET": SECRET,
        "LABELLOOP_TRIGGER_BURST": str(BURST), "LABELLOOP_TRIGGER_RATE": "0.001",
        "LABELLOOP_MAX_WEBHOOK_MB": "0.0625",  # 64 KB; /predict keeps the 32 MB default
        "LABELLOOP_MAX_TASKS_PER_PREDICT": str(MAX_TASKS),
        "LABELLOOP_PREDICT_WORKERS": str(PREDICT_WORKERS),
    })
    process.info["version"] = version
    yield process
    process.stop()
    connect(redis_url).flushdb()


def call(served, method, path, headers=None, **kwargs):
    return httpx.request(method, served.url + path, headers={**AUTH, **(headers or {})}, timeout=60, **kwargs)


def setup_project(served, project: int) -> None:
    """What Label Studio does when the backend is connected to a project: /setup, with basic auth."""
    answer = call(served, "POST", "/setup", json={"project": f"{project}.1700000000", "schema": CLASSIFY})
    assert answer.status_code == 200, answer.text


def hook(served, action: str, project: int, headers: dict | None = None, **body):
    return httpx.post(served.url + "/webhook", json={"action": action, "project": {"id": project}, **body},
                      headers=HOOK if headers is None else headers, timeout=10)


def jobs_of(served, project: int, warm_start: bool = False) -> list[dict]:
    """The project's jobs; without the warm-start job an authenticated /setup of a classification
    project queues (pipeline.build_warm_start), unless ``warm_start``."""
    answer = call(served, "GET", "/jobs", params={"project": project})
    assert answer.status_code == 200, answer.text
    return [j for j in answer.json()["jobs"] if warm_start or j["kind"] != "warm-start"]


def events_of(served, project: int) -> list[dict]:
    return call(served, "GET", "/events", params={"project": project}).json()["events"]


# -- secure by default -------------------------------------------------------------------------------

def _serve(host: str, port: int, home: Path, **env) -> subprocess.Popen:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("BASIC_AUTH_USER", "BASIC_AUTH_PASS", "LABELLOOP_INSECURE", "LABELLOOP_WEBHOOK_SECRET")}
    return subprocess.Popen([sys.executable, "-m", "labelloop.cli", "serve", "--host", host, "--port", str(port)],
                            env={**clean, "LABELLOOP_HOME": str(home), **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_serve_refuses_a_public_address_without_auth_unless_told_in_words(tmp_path, run_home):
    from labelloop.cli import build_parser
    from labelloop.dev.localstack import free_port

    for env in ({}, {"LABELLOOP_INSECURE": "1"}, {"BASIC_AUTH_USER": "ls"}):
        process = _serve("0.0.0.0", free_port(), tmp_path, **env)
        try:
            _, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # it started: exactly what must not happen
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            pytest.fail(f"`labelloop serve --host 0.0.0.0` started with {env or 'no auth'}")
        assert process.returncode == 2, (env, stderr)
        line = stderr.strip().splitlines()[-1]
        assert line.startswith("labelloop serve: "), stderr
        if "BASIC_AUTH_USER" in env:
            assert "must be set together" in line
        else:
            assert "refusing to listen on 0.0.0.0 without authentication" in line
            assert "BASIC_AUTH_USER and BASIC_AUTH_PASS" in line and "LABELLOOP_INSECURE=true" in line
    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"  # the default is loopback

    port = free_port()
    process = _serve("0.0.0.0", port, tmp_path, LABELLOOP_INSECURE="true")
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.communicate()[1]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "LABELLOOP_INSECURE=true did not let it start"
            time.sleep(0.3)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.communicate(timeout=20)


# -- an authenticated webhook ------------------------------------------------------------------------

def test_forged_webhooks_are_401_and_queue_nothing(served):
    setup_project(served, 31)
    forged = [{}, {"X-Labelloop-Webhook-Secret": "guess"}, {"X-Labelloop-Webhook-Secret": SECRET + "x"},
              {b"X-Labelloop-Webhook-Secret": "gu\u00e9ss".encode()},
              {"Authorization": "Basic " + base64.b64encode(b"ls:no").decode()}]
    for headers in forged:
        for action in ("ANNOTATION_CREATED", "START_TRAINING"):
            answer = hook(served, action, 31, headers=headers)
            assert answer.status_code == 401, (headers, answer.text)
            assert "X-Labelloop-Webhook-Secret" in answer.json()["error"]
    assert jobs_of(served, 31) == [] and events_of(served, 31) == []
    assert [j["trigger"] for j in jobs_of(served, 31, warm_start=True)] == ["setup"]  # queued by the connect
    # the real thing: Label Studio's webhook with the installed header, and "Start training" with basic auth
    assert hook(served, "ANNOTATION_CREATED", 31).json()["status"] == "accepted"
    started = hook(served, "START_TRAINING", 31, headers=AUTH)
    assert started.status_code == 200 and started.json()["status"] == "accepted"
    assert {j["kind"] for j in jobs_of(served, 31)} == {"train"}


def _app(tmp_path_factory, password: str) -> TestClient:
    """The app in process with basic auth and no webhook secret: Label Studio's default webhooks."""
    from labelloop.config import settings
    from labelloop.service.app import build_app_with_limits

    env = dataclasses.replace(settings(), model_dir=tmp_path_factory.mktemp("in-process-models"),
                              basic_auth_user="ls", basic_auth_pass=password, webhook_secret="")
    return TestClient(build_app_with_limits(env), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def no_secret_app(tmp_path_factory, run_home):
    return _app(tmp_path_factory, "secret")


@pytest.fixture(scope="module")
def non_ascii_app(tmp_path_factory, run_home):
    return _app(tmp_path_factory, "p\u00e4ss\u00e9")


def test_start_training_without_authentication_is_refused(no_secret_app):
    assert no_secret_app.post("/setup", json={"project": "12.1", "schema": CLASSIFY}, headers=AUTH).status_code == 200
    answer = no_secret_app.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 12}})
    assert answer.status_code == 403, answer.text
    assert "START_TRAINING refused" in answer.json()["error"] and "BASIC_AUTH_USER" in answer.json()["error"]
    assert [e for e in no_secret_app.app.app.state.events if e["project"] == "12"] == []
    metrics = no_secret_app.get("/metrics", headers=AUTH).text
    assert 'labelloop_webhook_refused_total{reason="start_training_unauthenticated"} 1.0' in metrics


def test_unknown_projects_are_ignored_with_a_reason(served):
    answer = hook(served, "ANNOTATION_CREATED", 424242, annotation={"id": 1}, task={"id": 2})
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "ignored" and "unknown to this backend" in answer.json()["reason"]
    assert jobs_of(served, 424242) == [] and events_of(served, 424242) == []
    for invented in (-5, 0, int("9" * 4000)):  # never a Label Studio id
        assert hook(served, "ANNOTATION_CREATED", invented).status_code == 422
    # a project with a model in the registry is known without /setup (a restarted backend)
    assert hook(served, "PROJECT_UPDATED", SERVED_PROJECT).json()["status"] == "accepted"


def test_a_webhook_flood_gets_429_after_the_bucket(served):
    setup_project(served, 51)
    setup_project(served, 52)
    answers = [hook(served, "ANNOTATION_CREATED", 51, annotation={"id": i}) for i in range(BURST + 3)]
    assert [a.status_code for a in answers] == [200] * BURST + [429] * 3, [a.text for a in answers]
    error = answers[-1].json()["error"]
    assert "too many job-triggering events for project 51" in error and "LABELLOOP_TRIGGER_BURST" in error
    assert int(answers[-1].headers["Retry-After"]) >= 1
    assert len(jobs_of(served, 51)) == 1  # the accepted ones joined one pending training
    # per project, and only for events that start jobs; the service keeps serving
    assert hook(served, "ANNOTATION_CREATED", 52).status_code == 200
    assert hook(served, "PROJECT_UPDATED", 51).status_code == 200
    assert httpx.get(served.url + "/health").status_code == 200


def test_an_oversized_webhook_body_is_413_though_predict_takes_it(served):
    setup_project(served, 53)
    padding = "x" * 100_000  # over the 64 KB webhook cap, far under /predict's 32 MB
    answer = hook(served, "ANNOTATION_CREATED", 53, annotation={"id": 1, "result": padding})
    assert answer.status_code == 413 and "LABELLOOP_MAX_WEBHOOK_MB" in answer.json()["error"]
    chunked = httpx.post(served.url + "/webhook", headers=HOOK, timeout=10,
                         content=iter([b'{"action": "PROJECT_UPDATED", "x": "' + b"y" * 40_000, b"z" * 40_000 + b'"}']))
    assert chunked.status_code == 413
    assert events_of(served, 53) == []
    predict = call(served, "POST", "/predict", json={"tasks": [{"id": 1, "data": {"text": padding}}],
                                                     "project": str(SERVED_PROJECT), "label_config": CLASSIFY})
    assert predict.status_code == 200, predict.text  # the same size is fine where it belongs


def test_the_event_log_keeps_only_validated_scalars(served):
    setup_project(served, 61)
    body = {"annotation": {"id": "9" * 2000, "result": [{"value": "secret" * 100}]},
            "task": {"id": 17, "data": {"image": "a" * 5000}}, "extra": {"nested": ["x"] * 1000}}
    assert hook(served, "PROJECT_UPDATED", 61, **body).status_code == 200
    assert hook(served, "ANNOTATION_UPDATED", 61, annotation={"id": 5}, task={"id": True}).status_code == 200
    first, second = events_of(served, 61)
    assert set(first) == {"action", "project", "received_at", "authenticated", "task"}
    assert first["task"] == 17 and first["project"] == "61" and first["authenticated"] is True
    assert set(second) == {"action", "project", "received_at", "authenticated", "annotation"}
    assert second["annotation"] == 5
    assert len(json.dumps([first, second])) < 400


# -- bounded -----------------------------------------------------------------------------------------

def test_too_many_tasks_in_one_predict_is_a_clear_413(served):
    tasks = [{"id": i, "data": {}} for i in range(MAX_TASKS + 1)]
    answer = call(served, "POST", "/predict", json={"tasks": tasks, "project": str(SERVED_PROJECT),
                                                    "label_config": CLASSIFY})
    assert answer.status_code == 413, answer.text
    assert f"{MAX_TASKS + 1} tasks" in answer.json()["error"]
    assert "LABELLOOP_MAX_TASKS_PER_PREDICT" in answer.json()["error"]
    answer = call(served, "POST", "/predict", json={"tasks": tasks[:MAX_TASKS], "project": str(SERVED_PROJECT),
                                                    "label_config": CLASSIFY})
    assert answer.status_code == 200 and len(answer.json()["results"]) == MAX_TASKS


def test_non_ascii_credentials_are_401_not_500(served):
    wrong = [("l\u015b", "p\u00e4sswort"), ("ls", "s\u00e9cret")]
    for user, password in wrong:
        for encoding in ("utf-8", "latin-1"):
            try:
                token = base64.b64encode(f"{user}:{password}".encode(encoding)).decode()
            except UnicodeEncodeError:
                continue
            answer = httpx.get(served.url + "/versions", headers={"Authorization": f"Basic {token}"})
            assert answer.status_code == 401, answer.text
    raw = httpx.get(served.url + "/versions", headers=[(b"Authorization", b"Basic \xc3\xa9\xff==")])
    assert raw.status_code == 401
    assert call(served, "GET", "/versions").status_code == 200


def test_non_ascii_configured_password_works_from_utf8_and_latin1_clients(non_ascii_app):
    for encoding in ("utf-8", "latin-1"):  # httpx/browsers vs requests' HTTPBasicAuth (Label Studio)
        token = base64.b64encode("ls:p\u00e4ss\u00e9".encode(encoding)).decode()
        assert non_ascii_app.get("/versions", headers={"Authorization": f"Basic {token}"}).status_code == 200
    token = base64.b64encode("ls:p\u00e4ss\u00e8".encode()).decode()
    assert non_ascii_app.get("/versions", headers={"Authorization": f"Basic {token}"}).status_code == 401


@pytest.mark.parametrize("path", ["/predict", "/setup", "/webhook"])
@pytest.mark.parametrize("body,message", [
    (b"[" * 30_000 + b"]" * 30_000, "nested too deeply"),
    (b'{"a": ' * 8_000 + b"1" + b"}" * 8_000, "nested too deeply"),  # under the 64 KB webhook cap
    (b'{"tasks": [], "project": ' + b"9" * 5000 + b"}", "not valid JSON"),
])
def test_deep_or_huge_integer_json_is_400(served, path, body, message):
    answer = call(served, "POST", path, headers={**HOOK, "content-type": "application/json"}, content=body)
    assert answer.status_code == 400, answer.text[:300]
    assert message in answer.json()["error"]


def test_an_unknown_http_method_adds_no_metrics_label(served):
    assert call(served, "BREW", "/health").status_code == 405
    assert call(served, "PURGE", "/nope").status_code == 404
    assert httpx.request("XYZZY", served.url + "/predict").status_code == 401
    text = call(served, "GET", "/metrics").text
    for invented in ("BREW", "PURGE", "XYZZY", "/nope"):
        assert invented not in text
    assert 'endpoint="/health",method="other",status="405"' in text


def test_webhook_and_health_answer_fast_while_predictions_run(served, images):
    setup_project(served, 71)
    warm = call(served, "POST", "/predict", json={"tasks": [{"id": 0, "data": {"image": f"{images.url}/warm.png"}}],
                                                  "project": str(SERVED_PROJECT), "label_config": CLASSIFY})
    assert warm.status_code == 200 and "error" not in warm.json()["results"][0], warm.text  # model loaded

    def slow_predict(i):
        task = {"id": i, "data": {"image": f"{images.url}/slow/{i}.png"}}
        return call(served, "POST", "/predict", json={"tasks": [task], "project": str(SERVED_PROJECT),
                                                      "label_config": CLASSIFY})

    busy = 45  # more than the default thread pool's 40 threads
    pool = ThreadPoolExecutor(busy)
    try:
        futures = [pool.submit(slow_predict, i) for i in range(busy)]
        deadline = time.monotonic() + 30
        while images.slow_arrivals < PREDICT_WORKERS:  # predictions are now blocked fetching their image
            assert time.monotonic() < deadline, "the slow predictions never reached the image host"
            time.sleep(0.05)
        time.sleep(1.0)  # let every request reach the backend
        for name, request in [
            ("health", lambda: httpx.get(served.url + "/health", timeout=10)),
            ("webhook", lambda: hook(served, "ANNOTATION_CREATED", 71)),
            ("metrics", lambda: call(served, "GET", "/metrics")),
        ]:
            t0 = time.perf_counter()
            answer = request()
            elapsed = time.perf_counter() - t0
            assert answer.status_code == 200, (name, answer.text)
            assert elapsed < 0.5, f"{name} took {elapsed:.2f} s while {busy} predictions were running"
        assert images.slow_arrivals <= PREDICT_WORKERS  # the prediction pool is bounded
    finally:
        images.release.set()
        answers = [f.result(timeout=120) for f in futures]
        pool.shutdown()
    assert all(a.status_code == 200 and len(a.json()["results"]) == 1 for a in answers)


def test_connect_and_imports_queue_one_warm_start(served):
    """Connecting a classification project queues its self-supervised warm start once; an import
    (TASKS_CREATED) joins the pending one instead of queuing another."""
    setup_project(served, 81)
    setup_project(served, 81)  # Label Studio calls /setup again before predictions
    queued = jobs_of(served, 81, warm_start=True)
    assert [(j["kind"], j["trigger"]) for j in queued] == [("warm-start", "setup")], queued
    imported = hook(served, "TASKS_CREATED", 81)
    assert imported.status_code == 200 and imported.json()["warm_start_job"] == queued[0]["id"], imported.text
    assert len(jobs_of(served, 81, warm_start=True)) == 1
