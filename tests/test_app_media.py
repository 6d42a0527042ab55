"""The FiftyOne App's ``/media`` route serves the images of labelloop's datasets and nothing else.

A real Label Studio project is synced into FiftyOne (``sync_project``, no model needed), the App is
started as the local stack starts it (``labelloop app``), and requests go to its ``/media`` route
the way the App's grid fetches images. FiftyOne's own server answers ``/etc/passwd`` with 200.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def synced(ls_api, label_studio, fo, run_home, tmp_path_factory):
    """A classification project with 3 images, synced into FiftyOne; the images' original bytes."""
    from labelloop.dev.shapes import generate_shapes, label_config

    images = generate_shapes(tmp_path_factory.mktemp("media-images"), n=3, seed=41, max_objects=1)
    originals = [images.images_dir / im.file for im in images.images]
    project = ls_api.create_project("app media", label_config("classification"))["id"]
    ls_api.upload_images(project, originals)
    saved = {k: os.environ.get(k) for k in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY")}
    os.environ.update(LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.info["token"])
    try:
        from labelloop.fo.sync import media_dir_for, sync_project

        report = sync_project(project, predict=False)
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    assert report.added == 3 and not report.errors, report
    yield {"dataset": fo.load_dataset(report.dataset), "media": media_dir_for(project),
           "originals": {p.read_bytes() for p in originals}}


@pytest.fixture(scope="module")
def app(synced, tmp_path_factory):
    from labelloop.dev.localstack import start_fiftyone_app

    process = start_fiftyone_app(dict(os.environ), log_dir=tmp_path_factory.mktemp("app-media"))
    yield process
    process.stop()


@pytest.fixture(scope="module")
def secret(tmp_path_factory) -> Path:
    """A readable file outside every media folder (what /etc/passwd stands for, with known content)."""
    path = tmp_path_factory.mktemp("not-media") / "secret.txt"
    path.write_text("not for the App\n")
    return path


def media(app, *filepaths: str, method: str = "GET") -> httpx.Response:
    return httpx.request(method, f"{app.url}/media", params=[("filepath", p) for p in filepaths], timeout=30)


def test_media_serves_the_synced_images(app, synced):
    filepaths = synced["dataset"].values("filepath")
    assert len(filepaths) == 3
    served = set()
    for filepath in filepaths:
        assert Path(filepath).parent == synced["media"], f"{filepath} is not in the project's media folder"
        response = media(app, filepath)
        assert response.status_code == 200, response.text[:300]
        served.add(response.content)
    assert served == synced["originals"], "the App must serve the uploaded images' own bytes"


def test_media_serves_the_media_cache(app, run_home):
    # datasets synced before they owned their images point into LABELLOOP_CACHE_DIR/media
    cached = run_home / "cache" / "media" / "old-dataset-image.png"
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(b"\x89PNG cached")
    response = media(app, str(cached))
    assert response.status_code == 200 and response.content == b"\x89PNG cached"


@pytest.mark.parametrize("case", ["etc-passwd", "dotdot", "symlink", "second-param", "head"])
def test_media_refuses_files_outside_the_media_folders(app, synced, secret, case):
    folder = synced["media"]
    inside = synced["dataset"].first().filepath
    if case == "etc-passwd":
        request = {"filepaths": ["/etc/passwd"]}
    elif case == "dotdot":  # starts inside the media folder, resolves to the secret
        request = {"filepaths": [str(folder) + "/.." * len(folder.parts) + str(secret)]}
    elif case == "symlink":  # a link inside the media folder pointing out of it
        link = folder / "link-out.png"
        link.unlink(missing_ok=True)
        link.symlink_to(secret)
        request = {"filepaths": [str(link)]}
    elif case == "second-param":  # FiftyOne reads one of the repeated parameters: every one is checked
        request = {"filepaths": [inside, str(secret)]}
    else:
        request = {"filepaths": [str(secret)], "method": "HEAD"}
    try:
        response = media(app, *request["filepaths"], method=request.get("method", "GET"))
    finally:
        (folder / "link-out.png").unlink(missing_ok=True)
    assert response.status_code == 403, f"{case}: {response.status_code} {response.content[:200]!r}"
    assert b"not for the App" not in response.content and b"root:" not in response.content
    if request.get("method") != "HEAD":
        assert b"outside the App's media folders" in response.content
