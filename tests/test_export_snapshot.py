"""Reading a project through Label Studio's export snapshot gives what the easy export gives, and leaves
no snapshot behind (a real Label Studio 1.23.2)."""

from __future__ import annotations

import pytest

from labelloop.dev.shapes import generate_shapes, label_config, to_label_studio_result
from labelloop.labelstudio import client as client_module
from labelloop.labelstudio.client import StudioClient

pytestmark = pytest.mark.e2e


def _comparable(tasks):
    return sorted((t["id"], t["data"]["image"], [(a["id"], a["result"]) for a in t.get("annotations") or []])
                  for t in tasks)


def test_snapshot_read_equals_the_easy_export_and_cleans_up(ls_api, label_studio, tmp_path, monkeypatch):
    images = generate_shapes(tmp_path / "shapes", n=6, seed=41, size=64, max_objects=1, style="simple")
    project = ls_api.create_project("snapshot read", label_config("classification"))["id"]
    tasks = ls_api.upload_images(project, [images.images_dir / im.file for im in images.images])
    for task in tasks[:4]:  # two tasks stay unlabeled: a snapshot must hold them too
        image = next(im for im in images.images if task["data"]["image"].endswith(im.file))
        ls_api.annotate(task["id"], to_label_studio_result(image, "classification"))
    with StudioClient(label_studio.url, label_studio.info["token"]) as studio:
        easy = studio.export_tasks(project)
        snap = studio.export_tasks(project, snapshot=True)
        assert len(snap) == 6 and sum(bool(t["annotations"]) for t in snap) == 4
        assert _comparable(snap) == _comparable(easy)
        assert studio.request("GET", f"/api/projects/{project}/exports") == []
        # a project above the size threshold is read that way by load_project (what every job uses)
        monkeypatch.setattr(client_module, "SNAPSHOT_ABOVE_TASKS", 3)
        calls = []
        real = studio.request
        monkeypatch.setattr(studio, "request", lambda method, path, **kw: calls.append((method, path)) or
                            real(method, path, **kw))
        loaded = studio.load_project(project)
        assert _comparable(loaded.tasks) == _comparable(easy)
        assert ("POST", f"/api/projects/{project}/exports") in calls
        assert not any(path.endswith("/export") for _, path in calls)
