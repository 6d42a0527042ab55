"""The panel's engine side (labelloop.fo.versions): the registry's versions as rows, what a rollback serves,
and the backend client's errors, each saying what to do. Pure logic and a local HTTP server: no FiftyOne."""

from __future__ import annotations

import http.server
import json
import threading

import pytest

from labelloop.core.registry import Registry
from labelloop.fo import versions as fo_versions

pytestmark = pytest.mark.unit


@pytest.fixture
def registry(tmp_path, monkeypatch):
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "models"))
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"x")
    registry = Registry(tmp_path / "models")
    names = []
    for top1 in (0.5, 0.7, 0.6):
        manifest = {"parent": names[-1] if names else None, "task": "classify", "task_type": "classification",
                    "classes": ["a", "b"], "counts": {"train": 10, "val": 4}, "metrics": {"primary": top1, "top1": top1}}
        names.append(registry.add_version(3, weights, manifest).version)
    registry.promote(3, names[1])
    return registry, names


def test_versions_are_newest_first_with_metrics_and_the_one_in_service(registry):
    _, names = registry
    rows = fo_versions.versions(3)
    assert [r["version"] for r in rows] == list(reversed(names))
    assert [r["serving"] for r in rows] == [False, True, False]
    assert rows[1]["primary"] == 0.7 and rows[1]["train_images"] == 10 and rows[1]["tuning_images"] == 4
    # a rollback serves the serving version's parent, as `labelloop rollback` does
    assert fo_versions.rollback_target(rows) == names[0]
    assert fo_versions.rollback_target([{**r, "serving": r["version"] == names[0]} for r in rows]) is None


def test_only_this_projects_versions_can_be_promoted(registry):
    _, names = registry
    assert fo_versions.check_promotable(3, names[0]) == names[0]
    with pytest.raises(fo_versions.BackendError, match="not a version of project 4"):
        fo_versions.check_promotable(4, names[0])
    with pytest.raises(fo_versions.BackendError, match="has no version"):
        fo_versions.check_promotable(3, "p3-v9")


@pytest.fixture
def server():
    answers = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            status, body = answers.get(self.path.split("?")[0], (404, {"error": "no such route"}))
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(json.dumps(body).encode())

        do_GET = do_POST = _answer

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", answers
    httpd.shutdown()
    httpd.server_close()


def test_backend_client_answers_and_errors_say_what_to_do(server):
    url, answers = server
    backend = fo_versions.Backend.from_values(url, "u", "p")
    answers["/jobs"] = (200, {"jobs": [{"id": "j1", "kind": "train"}]})
    answers["/versions/p3-v1/promote"] = (200, {"project": "3", "serving": "p3-v1"})
    assert backend.jobs(3) == [{"id": "j1", "kind": "train"}]
    assert backend.promote("p3-v1")["serving"] == "p3-v1"
    answers["/jobs"] = (401, {"error": "authentication required"})
    with pytest.raises(fo_versions.BackendError, match="BASIC_AUTH_USER and BASIC_AUTH_PASS"):
        backend.jobs(3)
    answers["/versions/p3-v1/promote"] = (404, {"error": "project 3 has no version 'p3-v1'"})
    with pytest.raises(fo_versions.BackendError, match="404 .* has no version"):
        backend.promote("p3-v1")
    with pytest.raises(fo_versions.BackendError, match="did not answer .* LABELLOOP_BACKEND_URL"):
        fo_versions.Backend.from_values("http://127.0.0.1:9", "", "").jobs(3)


def test_backend_defaults_to_the_environment(monkeypatch):
    monkeypatch.setenv("LABELLOOP_BACKEND_URL", "http://backend:9090/")
    monkeypatch.setenv("BASIC_AUTH_USER", "me")
    monkeypatch.setenv("BASIC_AUTH_PASS", "pw")
    chosen = fo_versions.Backend.from_values()
    assert (chosen.url, chosen.user, chosen.password) == ("http://backend:9090", "me", "pw")
    monkeypatch.delenv("LABELLOOP_BACKEND_URL")
    assert fo_versions.Backend.from_values(user="").url == fo_versions.DEFAULT_BACKEND_URL
