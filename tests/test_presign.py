"""Cloud-storage task images (``s3://``, ``gs://``, ``azure-blob://``) fetched through Label Studio's presign
endpoint (issue 11, item 2.1).

* unit: the presign path (route, urlsafe base64 of the URI as Label Studio decodes it) and what is refused
  (scheme not whitelisted, no bucket or key, too long, control characters, no or a bad task id);
* unit, over real sockets: a local HTTP server **standing in for Label Studio's presign view** (it checks the
  token, decodes ``fileuri`` as Label Studio does and answers 303 to a second local server standing in for the
  bucket host): the token goes to Label Studio only, the bucket host is fetched only when listed in
  LABELLOOP_ALLOWED_HOSTS, the size cap holds after the redirect, /predict's ``predict_tasks`` path builds it;
* e2e: the route exists on the real Label Studio 1.23.2 (authenticated, it answers the view's 400 for a
  missing ``fileuri`` and the view's 404 for a task without storage, not the router's 404 page).

Faking an S3 storage in Label Studio needs an S3 endpoint that passes its connection check on creation; the
stand-in server above covers the redirect instead.
"""

from __future__ import annotations

import base64
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from PIL import Image

from labelloop.labelstudio.media import (
    MAX_STORAGE_URI_CHARS,
    MediaError,
    MediaFetcher,
    presign_url,
    storage_scheme,
    task_image_url,
)

KEY = "0123456789abcdef0123456789abcdef01234567"


def _png(size=(8, 6)) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", size, (20, 40, 200)).save(buf, format="PNG")
    return buf.getvalue()


# -- unit: building and validating -----------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("uri", ["s3://bucket/images/a.png", "gs://b/x/y z.jpg", "azure-blob://container/dir/i.png",
                                 "s3://bucket/ünïcode.png"])
def test_presign_path_is_label_studios_route_with_urlsafe_base64(uri):
    url = presign_url(uri, 42)
    parts = urlsplit(url)
    assert parts.path == "/tasks/42/presign/"
    (fileuri,) = parse_qs(parts.query)["fileuri"]
    assert base64.urlsafe_b64decode(fileuri.encode()).decode() == uri  # what proxy_api.resolve() does


@pytest.mark.unit
def test_task_image_url_leaves_other_urls_alone_and_presigns_storage_uris():
    assert task_image_url({"id": 1, "data": {"image": "/data/upload/1/a.png"}}, "image") == "/data/upload/1/a.png"
    assert task_image_url({"id": 1, "data": {"image": "https://h/a.png"}}, "image") == "https://h/a.png"
    assert task_image_url({"id": 1, "data": {}}, "image") is None
    assert task_image_url({"id": 1, "data": {"image": 5}}, "image") is None
    assert task_image_url({"id": 7, "data": {"image": " s3://b/k.png "}}, "image").startswith("/tasks/7/presign/?fileuri=")
    assert storage_scheme("gs://b/k") == "gs" and storage_scheme("azure-blob://c/k") == "azure-blob"
    assert storage_scheme("http://h/x") is None and storage_scheme("file:///etc/passwd") is None


@pytest.mark.unit
@pytest.mark.parametrize("uri, why", [
    ("s3://bucket", "not a cloud-storage URI"),
    ("s3:///key.png", "not a cloud-storage URI"),
    ("s3://bucket/", "not a cloud-storage URI"),
    ("S3://bucket/k.png", "not a cloud-storage URI"),  # Label Studio matches its schemes in lower case
    ("s3://bucket/a\nb.png", "control characters"),
    ("s3://bucket/a\x00.png", "control characters"),
    ("s3://bucket/" + "k" * MAX_STORAGE_URI_CHARS, "longer than"),
])
def test_bad_storage_uris_refused(uri, why):
    with pytest.raises(MediaError) as err:
        presign_url(uri, 1)
    assert why in err.value.reason
    assert err.value.kind == "bad_url"


@pytest.mark.unit
@pytest.mark.parametrize("task_id", [None, 0, -3, True, "12", 1.0, 2**63])
def test_presign_needs_a_task_id(task_id):
    with pytest.raises(MediaError) as err:
        task_image_url({"id": task_id, "data": {"image": "s3://b/k.png"}}, "image")
    assert "needs the task's id" in err.value.reason


@pytest.mark.unit
def test_raw_storage_uri_given_to_the_fetcher_says_how_it_is_fetched(tmp_path):
    with MediaFetcher("http://127.0.0.1:9", KEY, cache_dir=tmp_path) as fetcher:
        with pytest.raises(MediaError) as err:
            fetcher.fetch("s3://bucket/k.png")
    assert "presign endpoint" in err.value.reason and err.value.kind == "not_allowed"


@pytest.mark.unit
def test_presign_without_label_studio_url_is_a_clear_error(tmp_path):
    with MediaFetcher("", "", cache_dir=tmp_path) as fetcher:
        with pytest.raises(MediaError) as err:
            fetcher.fetch(presign_url("s3://b/k.png", 3))
    assert err.value.reason == "a cloud-storage image, presigned by Label Studio, needs LABEL_STUDIO_URL"


# -- unit over sockets: a stand-in for Label Studio's presign redirect -------------------------------


class _Recorder:
    def __init__(self, handler):
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler(self))
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def record(self, request: BaseHTTPRequestHandler) -> None:
        with self.lock:
            self.requests.append((request.path, {k.lower(): v for k, v in request.headers.items()}))

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _reply(request: BaseHTTPRequestHandler, status: int, body: bytes = b"", **headers) -> None:
    request.send_response(status)
    request.send_header("Content-Length", str(len(body)))
    for k, v in headers.items():
        request.send_header(k.replace("_", "-"), v)
    request.end_headers()
    try:
        request.wfile.write(body)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the client stopped reading on purpose (size cap)


def _bucket_handler(server: _Recorder):
    class Bucket(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            server.record(self)
            parts = urlsplit(self.path)
            if "X-Amz-Signature" not in parse_qs(parts.query):
                return _reply(self, 403, b"<Error>AccessDenied</Error>")
            if parts.path.endswith("/huge.png"):
                return _reply(self, 200, b"\0" * (3 * 2**20))
            return _reply(self, 200, _png(), Content_Type="image/png")

    return Bucket


def _label_studio_handler(server: _Recorder, bucket: dict):
    """Label Studio's TaskResolveStorageUri as far as a backend sees it: auth, 400 without fileuri, the URI
    decoded from urlsafe base64, 303 to the presigned URL on the bucket host (Cache-Control no-store)."""

    class LabelStudio(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            server.record(self)
            parts = urlsplit(self.path)
            if self.headers.get("Authorization") != f"Token {KEY}":
                return _reply(self, 401, b'{"detail":"Authentication credentials were not provided."}')
            segments = parts.path.strip("/").split("/")
            if len(segments) != 3 or segments[0] != "tasks" or segments[2] != "presign":
                return _reply(self, 404)
            fileuri = parse_qs(parts.query).get("fileuri")
            if not fileuri:
                return _reply(self, 400)
            uri = base64.urlsafe_b64decode(fileuri[0].encode()).decode()
            if not uri.startswith("s3://bucket/"):
                return _reply(self, 404)
            key = uri[len("s3://bucket/"):]
            target = f"{bucket['base']}/bucket/{key}?X-Amz-Signature=deadbeef&X-Amz-Expires=60"
            return _reply(self, 303, Location=target, Cache_Control="no-store, max-age=60")

    return LabelStudio


@pytest.fixture
def stand_ins():
    bucket = _Recorder(_bucket_handler)
    ls = _Recorder(lambda s: _label_studio_handler(s, {"base": bucket.base}))
    yield ls, bucket
    ls.close()
    bucket.close()


@pytest.mark.unit
def test_storage_image_fetched_through_presign_redirect_token_only_to_label_studio(stand_ins, tmp_path):
    ls, bucket = stand_ins
    with MediaFetcher(ls.base, KEY, (f"127.0.0.1:{bucket.port}",), cache_dir=tmp_path) as fetcher:
        path = fetcher.fetch(task_image_url({"id": 5, "data": {"image": "s3://bucket/dir/a.png"}}, "image"))
    with Image.open(path) as image:
        assert image.format == "PNG"
    (ls_path, ls_headers), = ls.requests
    assert ls_path.startswith("/tasks/5/presign/?fileuri=") and ls_headers["authorization"] == f"Token {KEY}"
    (bucket_path, bucket_headers), = bucket.requests
    assert bucket_path.startswith("/bucket/dir/a.png?X-Amz-Signature=")
    assert "authorization" not in bucket_headers  # the Label Studio token never leaves its origin


@pytest.mark.unit
def test_presigned_host_must_be_on_the_allow_list(stand_ins, tmp_path):
    ls, bucket = stand_ins
    with MediaFetcher(ls.base, KEY, cache_dir=tmp_path) as fetcher:
        with pytest.raises(MediaError) as err:
            fetcher.fetch(presign_url("s3://bucket/a.png", 5))
    assert err.value.reason == f"host 127.0.0.1:{bucket.port} is not allowed (add it to LABELLOOP_ALLOWED_HOSTS)"
    assert bucket.requests == []  # refused before any connection
    assert "deadbeef" not in err.value.reason


@pytest.mark.unit
def test_caps_hold_after_the_presign_redirect(stand_ins, tmp_path):
    ls, bucket = stand_ins
    with MediaFetcher(ls.base, KEY, (f"127.0.0.1:{bucket.port}",), cache_dir=tmp_path, max_bytes=2**20) as fetcher:
        with pytest.raises(MediaError) as err:
            fetcher.fetch(presign_url("s3://bucket/huge.png", 5))
    assert err.value.kind == "too_large"


@pytest.mark.unit
def test_label_studio_refusal_is_that_tasks_error(stand_ins, tmp_path):
    ls, _ = stand_ins
    with MediaFetcher(ls.base, KEY, cache_dir=tmp_path) as fetcher:
        with pytest.raises(MediaError) as err:
            fetcher.fetch(presign_url("s3://other-bucket/a.png", 5))  # no storage covers it: Label Studio's 404
    assert err.value.reason.startswith("HTTP 404 fetching") and err.value.kind == "http"


@pytest.mark.unit
def test_predict_tasks_presigns_storage_tasks_and_reports_bad_ones(stand_ins, tmp_path):
    """The /predict path: each task's storage URI goes through the presign endpoint with its own id; a task
    without an id, or with a malformed URI, is that task's error and the others are predicted."""
    from labelloop.core.labelconfig import parse_label_config
    from labelloop.workflows import pipeline

    ls, bucket = stand_ins
    spec = parse_label_config('<View><Image name="image" value="$image"/><Choices name="c" toName="image">'
                              '<Choice value="a"/><Choice value="b"/></Choices></View>')
    seen: list[Path] = []

    def fake_predict_images(model, images, spec, threshold, batch, tta=False):
        from labelloop.core.predict import ImagePrediction

        seen.extend(images)
        return [ImagePrediction(width=8, height=6, score=0.5) for _ in images]

    class Model:
        version = "v-test"

    tasks = [{"id": 11, "data": {"image": "s3://bucket/a.png"}}, {"data": {"image": "s3://bucket/b.png"}},
             {"id": 12, "data": {"image": "s3://bucket"}}]
    original = pipeline.predict_images
    pipeline.predict_images = fake_predict_images
    try:
        with MediaFetcher(ls.base, KEY, (f"127.0.0.1:{bucket.port}",), cache_dir=tmp_path) as fetcher:
            out = pipeline.predict_tasks(tasks, spec, Model(), fetcher, threshold=0.5, batch=4)
    finally:
        pipeline.predict_images = original
    assert len(seen) == 1 and out[0].error is None and out[0].score == 0.5
    assert "needs the task's id" in out[1].error and out[1].error_kind == "bad_url"
    assert "not a cloud-storage URI" in out[2].error
    assert [p for p, _ in ls.requests] == [presign_url("s3://bucket/a.png", 11)]


# -- e2e: the route on the real Label Studio --------------------------------------------------------


@pytest.mark.e2e
def test_real_label_studio_serves_the_presign_route(label_studio, ls_api):
    """The endpoint exists in Label Studio 1.23.2 as we call it: authenticated, a missing ``fileuri`` is the
    view's 400 and a task without a storage is the view's empty 404 (the router's 404 for an unknown path is
    an HTML page); unauthenticated, 401."""
    token = label_studio.info["token"]
    project = ls_api.create_project("presign-route", '<View><Image name="image" value="$image"/>'
                                    '<Choices name="c" toName="image"><Choice value="a"/></Choices></View>')
    project_id = project["id"] if isinstance(project, dict) else project
    headers = {"Authorization": f"Token {token}"}
    with httpx.Client(base_url=label_studio.url, timeout=30) as client:
        created = client.post(f"/api/projects/{project_id}/import", headers=headers,
                              json=[{"image": "s3://no-such-bucket/a.png"}])
        assert created.status_code == 201, created.text
        task_id = client.get("/api/tasks", params={"project": project_id}, headers=headers).json()["tasks"][0]["id"]
        missing = client.get(f"/tasks/{task_id}/presign/", headers=headers)
        assert missing.status_code == 400
        bogus = client.get(presign_url("s3://no-such-bucket/a.png", task_id), headers=headers)
        assert bogus.status_code == 404 and b"<html" not in bogus.content.lower()
        unknown_route = client.get(f"/tasks/{task_id}/no-such-view/", headers=headers)
        assert unknown_route.status_code == 404 and b"<" in unknown_route.content  # what a missing route looks like
        assert client.get(presign_url("s3://no-such-bucket/a.png", task_id)).status_code in (401, 403)
