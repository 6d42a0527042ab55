"""LABELLOOP_LS_MEDIA_DIR end to end: a real `labelloop serve` reading a real Label Studio 1.23.2's uploads
from its media folder, and falling back to HTTP for what is not there.

The backend reading locally is given a *wrong* Label Studio key, so any image it fetched over HTTP would
be a 401: predictions that succeed came from the media folder. A second backend, pointed at an empty
media folder with the right key, fetches everything over HTTP and must predict the same.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from conftest import install_model

from labelloop.dev.shapes import label_config

pytestmark = pytest.mark.e2e

WRONG_KEY = "f" * 40


def _predict(backend_url: str, tasks: list[dict], config: str, project: int) -> httpx.Response:
    with httpx.Client(base_url=backend_url, timeout=300) as client:
        response = client.post("/predict", json={"tasks": tasks, "project": f"{project}.1", "label_config": config})
    assert response.status_code == 200, response.text[:300]
    return response


def _cache_files(home: Path) -> list[Path]:
    cache = home / "cache" / "media"
    return [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []


def test_uploads_read_from_the_shared_media_folder_with_http_fallback(label_studio, ls_api, trained, shapes_eval,
                                                                       tmp_path):
    from labelloop.dev.localstack import start_backend

    config = label_config("detection", threshold=0.05)
    project = ls_api.create_project("shared media folder", config)["id"]
    tasks = ls_api.upload_images(project, [shapes_eval.images_dir / im.file for im in shapes_eval.images[:6]])
    media = label_studio.log.parent / "media"  # Label Studio's MEDIA_ROOT: <its data dir>/media
    assert all((media / t["data"]["image"][len("/data/"):]).is_file() for t in tasks)
    extra = [{"id": 9001, "data": {"image": f"/data/upload/{project}/not-there.png"}},  # absent: HTTP (401 here)
             {"id": 9002, "data": {"image": f"/data/upload/{project}/%2e%2e/%2e%2e/label-studio.sqlite3"}}]
    model = trained("detection")

    local_home = tmp_path / "local"
    version = install_model(local_home / "models", project, model)
    local = start_backend(local_home, env={"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": WRONG_KEY,
                                           "LABELLOOP_LS_MEDIA_DIR": str(media),
                                           "YOLO_CONFIG_DIR": str(Path.home() / ".cache" / "labelloop" / "ultralytics")})
    try:
        response = _predict(local.url, tasks + extra, config, project)
    finally:
        local.stop()
    results = response.json()["results"]
    assert len(results) == len(tasks) + 2
    for r in results[: len(tasks)]:
        assert "error" not in r and r["model_version"] == version and 0.0 <= r["score"] <= 1.0
    assert "HTTP 401" in results[-2]["error"]  # fetched over HTTP (with the wrong key): not read locally
    assert "upload folder" in results[-1]["error"]  # refused, never read or fetched
    assert _cache_files(local_home) == []  # read in place
    assert "fetch;dur=" in response.headers["server-timing"]

    http_home = tmp_path / "http"
    empty = tmp_path / "empty-media"
    empty.mkdir()
    install_model(http_home / "models", project, model)
    remote = start_backend(http_home, env={"LABEL_STUDIO_URL": label_studio.url,
                                           "LABEL_STUDIO_API_KEY": label_studio.info["token"],
                                           "LABELLOOP_LS_MEDIA_DIR": str(empty),
                                           "YOLO_CONFIG_DIR": str(Path.home() / ".cache" / "labelloop" / "ultralytics")})
    try:
        over_http = _predict(remote.url, tasks, config, project).json()["results"]
    finally:
        remote.stop()
    assert len(_cache_files(http_home)) == len(tasks)  # every image fetched over HTTP into the cache
    assert [r["score"] for r in over_http] == pytest.approx([r["score"] for r in results[: len(tasks)]])
    assert [r["result"] for r in over_http] == [r["result"] for r in results[: len(tasks)]]
