"""Model registry: atomic versions, unique increasing names, serving pointer, rollback."""

import json
import threading

import pytest

from labelloop.core.registry import Registry, RegistryError

pytestmark = pytest.mark.unit  # pure logic, no server: `make test-fast`


def manifest(**extra):
    return {"parent": None, "task": "detect", "task_type": "detection", "classes": ["a", "b"],
            "counts": {"train": 3}, "metrics": {"primary": 0.5}, **extra}


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "w.pt"
    path.write_bytes(b"weights-bytes")
    return path


def test_versions_increase_and_manifest_is_complete(tmp_path, weights):
    reg = Registry(tmp_path / "models")
    v1 = reg.add_version("12.1700000000", weights, manifest())
    v2 = reg.add_version(12, weights, manifest(parent=v1.version))
    assert (v1.version, v2.version) == ("p12-v1", "p12-v2")
    assert v2.parent == "p12-v1"
    assert v1.weights.read_bytes() == b"weights-bytes"
    on_disk = json.loads((v2.weights.parent / "manifest.json").read_text())
    assert on_disk["version"] == "p12-v2" and on_disk["weights_sha256"] and on_disk["created_at"] > 0
    assert [m.version for m in reg.versions(12)] == ["p12-v1", "p12-v2"]


def test_concurrent_writers_get_unique_names(tmp_path, weights):
    reg = Registry(tmp_path / "models")
    names, errors = [], []

    def add():
        try:
            names.append(reg.add_version(5, weights, manifest()).version)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=add) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    assert sorted(names, key=lambda n: int(n.split("v")[-1])) == [f"p5-v{i}" for i in range(1, 9)]


def test_half_written_version_is_invisible(tmp_path, weights):
    reg = Registry(tmp_path / "models")
    reg.add_version(3, weights, manifest())
    # What a crash mid-write leaves: a temp dir, and a version dir without manifest.
    (reg.project_dir(3) / ".tmp-deadbeef").mkdir()
    (reg.project_dir(3) / "versions" / "p3-v9").mkdir()
    assert [m.version for m in reg.versions(3)] == ["p3-v1"]
    assert reg.add_version(3, weights, manifest()).version == "p3-v2"


def test_serving_pointer_promote_and_rollback(tmp_path, weights):
    reg = Registry(tmp_path / "models")
    assert reg.serving(1) is None
    v1 = reg.add_version(1, weights, manifest())
    v2 = reg.add_version(1, weights, manifest())
    reg.promote(1, v2.version, "better")
    assert reg.serving(1).version == "p1-v2"
    reg.promote(1, v1.version, "rollback")
    assert reg.serving(1).version == "p1-v1"
    assert reg.serving_info(1)["reason"] == "rollback"
    with pytest.raises(RegistryError):
        reg.promote(1, "p1-v7")


def test_project_ids_are_sanitized(tmp_path):
    reg = Registry(tmp_path)
    with pytest.raises(RegistryError):
        reg.project_dir("../../etc")
