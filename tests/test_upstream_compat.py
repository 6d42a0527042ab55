"""What a label-studio-ml-backend user brings along works here (issue 11, first slice): GET / and
GET /versions as Label Studio calls them.
"""

from __future__ import annotations

import base64
import dataclasses
import pickle
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from labelloop import __version__
from labelloop.config import settings
from labelloop.core.registry import Registry

pytestmark = pytest.mark.unit  # pure logic and in-process requests, no server: `make test-fast`

AUTH = {"Authorization": "Basic " + base64.b64encode(b"ls:secret").decode()}
DETECT = ('<View><Image name="image" value="$image"/>'
          '<RectangleLabels name="label" toName="image"><Label value="a"/></RectangleLabels></View>')


@pytest.fixture(autouse=True)
def no_redis(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:9/0")  # the discard port: refused at once


def harmless_checkpoint(path: Path) -> Path:
    """A file check_weights accepts (a legacy-format pickle of plain values): no torch needed."""
    path.write_bytes(pickle.dumps({"epoch": 3, "names": {0: "a"}}, protocol=2))
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
