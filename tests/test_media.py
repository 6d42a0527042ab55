"""labelloop.labelstudio.media against real local HTTP servers (no mocks of httpx).

Each server is a ThreadingHTTPServer on 127.0.0.1 with an ephemeral port that records every
request. The first one plays Label Studio (its 127.0.0.1:<port> is the LS host); the others play
third-party image hosts.
"""

from __future__ import annotations

import base64
import io
import json
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image

from labelloop.labelstudio.media import MediaError, MediaFetcher

LEGACY_KEY = "0123456789abcdef0123456789abcdef01234567"  # 40 hex chars
PAT = "eyJ-test-personal-access-token"  # not a real JWT: detection must go by the "eyJ" prefix


def _png_bytes(color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png_bytes()


def _fake_jwt(exp: float) -> str:
    def part(obj):
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    # exp is whole seconds: round up so the token never lives shorter than asked
    return f"{part({'alg': 'none'})}.{part({'exp': math.ceil(exp), 'token_type': 'access'})}.sig"


class Server:
    """One local HTTP server plus what it saw and how it should behave."""

    def __init__(self, *, legacy_key: str | None = None, pat: str | None = None, access_ttl: float | None = None):
        self.legacy_key = legacy_key
        self.pat = pat
        self.access_ttl = access_ttl  # None: opaque access tokens; else JWTs expiring after ttl s
        self.valid_access: set[str] = set()
        self.refresh_calls = 0
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def hits(self, path_prefix: str) -> int:
        with self.lock:
            return sum(1 for _, path, _ in self.requests if path.startswith(path_prefix))

    def headers_for(self, path_prefix: str) -> list[dict[str, str]]:
        with self.lock:
            return [h for _, path, h in self.requests if path.startswith(path_prefix)]

    def authorized(self, header: str | None) -> bool:
        if header is None:
            return False
        if self.legacy_key and header == f"Token {self.legacy_key}":
            return True
        with self.lock:
            return header.startswith("Bearer ") and header[len("Bearer "):] in self.valid_access

    def issue_access(self) -> str:
        with self.lock:
            self.refresh_calls += 1
            n = self.refresh_calls
            token = f"access-{n}" if self.access_ttl is None else _fake_jwt(time.time() + self.access_ttl)
            self.valid_access.add(token)
            return token

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _make_handler(server: Server):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest output clean
            pass

        def _record(self):
            with server.lock:
                server.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))

        def _send(self, status: int, body: bytes = b"", ctype: str = "image/png", length: bool = True, **extra):
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            if length:
                self.send_header("Content-Length", str(len(body)))
            for k, v in extra.items():
                self.send_header(k.replace("_", "-"), v)
            self.end_headers()
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client aborted on purpose (size cap)

        def do_POST(self):
            self._record()
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path != "/api/token/refresh/":
                return self._send(404, b"no", "text/plain")
            try:
                refresh = json.loads(body)["refresh"]
            except (ValueError, KeyError):
                refresh = None
            if not server.pat or refresh != server.pat:
                return self._send(401, b'{"detail":"bad token"}', "application/json")
            payload = json.dumps({"access": server.issue_access()}).encode()
            self._send(200, payload, "application/json")

        def do_GET(self):
            self._record()
            parts = urlsplit(self.path)
            path, query = parts.path, parse_qs(parts.query)
            needs_auth = path.startswith("/data/") and (server.legacy_key or server.pat)
            if needs_auth and not server.authorized(self.headers.get("Authorization")):
                return self._send(401, b'{"detail":"Authentication credentials were not provided."}',
                                  "application/json")
            if path.startswith("/data/") or path in ("/img.png", "/noext"):
                return self._send(200, PNG)
            if path == "/redirect":
                return self._send(302, b"", "text/plain", Location=query["to"][0])
            if path == "/loop":
                return self._send(302, b"", "text/plain", Location="/loop")
            if path == "/text.png":
                return self._send(200, b"hello, I am not a picture", "image/png")
            if path == "/huge":
                return self._send(200, b"\0" * (3 * 2**20))
            if path == "/huge-stream":  # no Content-Length: only the running count can stop it
                self._send(200, b"", length=False)
                try:
                    for _ in range(48):
                        self.wfile.write(b"\0" * 65536)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                return None
            return self._send(404, b"not found", "text/plain")

    return Handler


@pytest.fixture
def servers():
    made: list[Server] = []

    def make(**kwargs) -> Server:
        srv = Server(**kwargs)
        made.append(srv)
        return srv

    yield make
    for srv in made:
        srv.close()


@pytest.fixture
def ls(servers) -> Server:
    return servers(legacy_key=LEGACY_KEY)


@pytest.fixture
def fetchers(tmp_path):
    made: list[MediaFetcher] = []

    def make(ls_url="", api_key="", allowed_hosts=(), **kwargs) -> MediaFetcher:
        kwargs.setdefault("cache_dir", tmp_path / "cache")
        kwargs.setdefault("timeout", 5.0)
        kwargs.setdefault("max_bytes", 2**20)
        f = MediaFetcher(ls_url, api_key, allowed_hosts, **kwargs)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


def _is_png(path: Path) -> bool:
    with Image.open(path) as im:
        return im.format == "PNG" and im.size == (8, 6)


# --------------------------------------------------------------------------- Label Studio auth


def test_upload_fetched_with_legacy_token(ls, fetchers, tmp_path):
    path = fetchers(ls.base, LEGACY_KEY).fetch("/data/upload/1/abc-cat.png")
    assert _is_png(path)
    assert path.suffix == ".png"
    assert path.parent.parent == tmp_path / "cache" / "media"
    assert path.name.startswith(path.parent.name)
    assert ls.headers_for("/data/upload/")[0]["authorization"] == f"Token {LEGACY_KEY}"


def test_local_files_url_gets_auth_and_extension_from_d(ls, fetchers):
    path = fetchers(ls.base, LEGACY_KEY).fetch("/data/local-files/?d=images/dog.png")
    assert path.suffix == ".png" and _is_png(path)
    assert ls.headers_for("/data/local-files/")[0]["authorization"] == f"Token {LEGACY_KEY}"


def test_upload_without_key_is_a_clear_401(ls, fetchers):
    with pytest.raises(MediaError) as err:
        fetchers(ls.base).fetch("/data/upload/1/x.png")
    assert "HTTP 401" in err.value.reason and "LABEL_STUDIO_API_KEY" in err.value.reason


def test_pat_is_exchanged_once_for_many_fetches(servers, fetchers):
    ls = servers(pat=PAT)
    fetcher = fetchers(ls.base, PAT)
    urls = [f"/data/upload/1/img-{i}.png" for i in range(6)]
    results = fetcher.fetch_many(urls, workers=6)
    assert all(isinstance(r, Path) and _is_png(r) for r in results)
    fetcher.fetch("/data/upload/1/one-more.png")
    assert ls.refresh_calls == 1
    assert ls.hits("/api/token/refresh/") == 1
    auths = {h.get("authorization") for h in ls.headers_for("/data/upload/")}
    assert auths == {"Bearer access-1"}
    refresh_req = [h for m, p, h in ls.requests if p == "/api/token/refresh/"][0]
    assert "authorization" not in refresh_req


def test_pat_refreshes_once_after_401_and_retries(servers, fetchers):
    ls = servers(pat=PAT)
    fetcher = fetchers(ls.base, PAT)
    fetcher.fetch("/data/upload/1/a.png")
    with ls.lock:
        ls.valid_access.clear()  # server-side revocation / expiry
    assert _is_png(fetcher.fetch("/data/upload/1/b.png"))
    assert ls.refresh_calls == 2
    assert ls.headers_for("/data/upload/1/b.png")[-1]["authorization"] == "Bearer access-2"


def test_pat_refreshed_before_access_token_expires(servers, fetchers):
    ls = servers(pat=PAT, access_ttl=1.0)  # JWT access token, exp = now + 1..2 s (whole seconds)
    fetcher = fetchers(ls.base, PAT)
    fetcher.fetch("/data/upload/1/a.png")
    fetcher.fetch("/data/upload/1/b.png")
    assert ls.refresh_calls == 1
    time.sleep(1.05)  # past half its life (< 30 s left): refresh now, before it can die in flight
    fetcher.fetch("/data/upload/1/c.png")
    assert ls.refresh_calls == 2
    assert ls.hits("/data/upload/1/c.png") == 1  # no 401 round trip


def test_bad_pat_reports_refresh_failure(servers, fetchers):
    ls = servers(pat=PAT)
    with pytest.raises(MediaError) as err:
        fetchers(ls.base, "eyJ-wrong").fetch("/data/upload/1/a.png")
    assert "personal access token" in err.value.reason
    assert ls.hits("/data/upload/") == 0


# --------------------------------------------------------------------------- allow-list / SSRF


def test_unlisted_host_refused_with_reason(ls, servers, fetchers, caplog):
    other = servers()
    with pytest.raises(MediaError) as err:
        fetchers(ls.base, LEGACY_KEY).fetch(f"{other.base}/img.png")
    assert err.value.reason == f"host 127.0.0.1:{other.port} is not allowed (add it to LABELLOOP_ALLOWED_HOSTS)"
    assert str(err.value) == err.value.reason
    assert other.requests == []
    assert any(r.levelname == "WARNING" and "not allowed" in r.getMessage() for r in caplog.records)


def test_allowed_second_host_gets_no_authorization(ls, servers, fetchers):
    other = servers()
    fetcher = fetchers(ls.base, LEGACY_KEY, (f"127.0.0.1:{other.port}",))
    assert _is_png(fetcher.fetch(f"{other.base}/img.png"))
    assert "authorization" not in other.headers_for("/img.png")[0]


def test_allowed_host_with_pat_gets_no_token_and_no_refresh(servers, fetchers):
    ls, other = servers(pat=PAT), servers()
    fetcher = fetchers(ls.base, PAT, (f"127.0.0.1:{other.port}",))
    fetcher.fetch(f"{other.base}/img.png")
    assert "authorization" not in other.headers_for("/img.png")[0]
    assert ls.refresh_calls == 0


def test_redirect_from_ls_to_unlisted_host_refused(ls, servers, fetchers):
    evil = servers()
    with pytest.raises(MediaError) as err:
        fetchers(ls.base, LEGACY_KEY).fetch(f"/redirect?to={evil.base}/img.png")
    assert f"127.0.0.1:{evil.port} is not allowed" in err.value.reason
    assert evil.requests == []


def test_redirect_to_allowed_host_drops_auth(ls, servers, fetchers):
    other = servers()
    fetcher = fetchers(ls.base, LEGACY_KEY, (f"127.0.0.1:{other.port}",))
    assert _is_png(fetcher.fetch(f"/redirect?to={other.base}/img.png"))
    assert ls.headers_for("/redirect")[0]["authorization"] == f"Token {LEGACY_KEY}"
    assert "authorization" not in other.headers_for("/img.png")[0]


def test_redirect_to_file_scheme_refused(ls, fetchers):
    with pytest.raises(MediaError) as err:
        fetchers(ls.base, LEGACY_KEY).fetch("/redirect?to=file:///etc/passwd")
    assert "scheme file" in err.value.reason


def test_redirect_loop_stops(ls, fetchers):
    with pytest.raises(MediaError) as err:
        fetchers(ls.base, LEGACY_KEY).fetch("/loop")
    assert "too many redirects" in err.value.reason
    assert ls.hits("/loop") == 4  # the request and 3 followed redirects


def test_metadata_ip_refused_without_network(ls, fetchers, monkeypatch):
    calls = []
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: calls.append(a) or real(*a, **k))
    fetcher = fetchers(ls.base, LEGACY_KEY, timeout=0.5)
    start = time.monotonic()
    with pytest.raises(MediaError) as err:
        fetcher.fetch("http://169.254.169.254/latest/meta-data/iam/security-credentials/")
    assert time.monotonic() - start < 0.4
    assert err.value.reason.startswith("host 169.254.169.254 is not allowed")
    assert calls == []


def _fake_dns(monkeypatch, name: str, ip: str):
    """Point one made-up name at an address (what a hostile DNS server would do)."""
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host == name:
            return real(ip, port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_wildcard_host_resolving_to_internal_address_refused(ls, servers, fetchers, monkeypatch):
    other = servers()
    _fake_dns(monkeypatch, "img.example.com", "127.0.0.1")
    fetcher = fetchers(ls.base, LEGACY_KEY, ("*.example.com",))
    with pytest.raises(MediaError) as err:
        fetcher.fetch(f"http://img.example.com:{other.port}/img.png")
    assert "img.example.com" in err.value.reason and "internal address 127.0.0.1" in err.value.reason
    assert other.requests == []


def test_cidr_entry_permits_internal_address(ls, servers, fetchers, monkeypatch):
    other = servers()
    _fake_dns(monkeypatch, "img.example.com", "127.0.0.1")
    fetcher = fetchers(ls.base, LEGACY_KEY, ("*.example.com", "127.0.0.0/8"))
    assert _is_png(fetcher.fetch(f"http://img.example.com:{other.port}/img.png"))


def test_explicit_name_is_trusted_and_connection_pinned(ls, servers, fetchers, monkeypatch):
    other = servers()
    _fake_dns(monkeypatch, "images.internal.test", "127.0.0.1")
    fetcher = fetchers(ls.base, LEGACY_KEY, ("images.internal.test",))
    assert _is_png(fetcher.fetch(f"http://images.internal.test:{other.port}/img.png"))
    headers = other.headers_for("/img.png")[0]
    assert headers["host"] == f"images.internal.test:{other.port}"  # virtual host kept, IP pinned
    assert "authorization" not in headers


def test_unlisted_name_refused_before_dns(ls, fetchers, monkeypatch):
    calls = []
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: calls.append(a))
    with pytest.raises(MediaError) as err:
        fetchers(ls.base, LEGACY_KEY, ("*.example.com",)).fetch("http://evil.com/x.png")
    assert err.value.reason == "host evil.com is not allowed (add it to LABELLOOP_ALLOWED_HOSTS)"
    assert calls == []


@pytest.mark.parametrize("url", [
    "file:///etc/passwd",
    "FILE:/etc/passwd",
    "ftp://example.com/a.png",
    "gopher://127.0.0.1:6379/_INFO",
    "data:image/png;base64,iVBORw0KGgo=",
])
def test_non_http_schemes_refused(ls, fetchers, url):
    with pytest.raises(MediaError) as err:
        fetchers(ls.base, LEGACY_KEY, ("example.com",)).fetch(url)
    assert "is not allowed (only http and https)" in err.value.reason


def test_relative_url_without_label_studio_url(fetchers):
    with pytest.raises(MediaError) as err:
        fetchers().fetch("/data/upload/1/x.png")
    assert err.value.reason == "relative URL /data/upload/1/x.png needs LABEL_STUDIO_URL"


def test_empty_url(fetchers):
    with pytest.raises(MediaError):
        fetchers().fetch("  ")


# --------------------------------------------------------------------------- body checks


def test_non_image_refused_and_not_cached(ls, fetchers, tmp_path):
    fetcher = fetchers(ls.base, LEGACY_KEY, (f"127.0.0.1:{ls.port}",))
    with pytest.raises(MediaError) as err:
        fetcher.fetch(f"{ls.base}/text.png")
    assert err.value.reason == "not a decodable image"
    media = tmp_path / "cache" / "media"
    assert [p for p in media.rglob("*") if p.is_file()] == []  # temp file cleaned up


@pytest.mark.parametrize("path", ["/huge", "/huge-stream"])
def test_oversized_body_refused(ls, fetchers, tmp_path, path):
    fetcher = fetchers(ls.base, LEGACY_KEY, max_bytes=2**20)
    with pytest.raises(MediaError) as err:
        fetcher.fetch(path)
    assert err.value.reason == "image larger than 1 MB"
    media = tmp_path / "cache" / "media"
    assert not media.exists() or [p for p in media.rglob("*") if p.is_file()] == []


def test_404_reported_without_query_secrets(ls, fetchers):
    with pytest.raises(MediaError) as err:
        fetchers(ls.base, LEGACY_KEY).fetch("/missing.png?X-Amz-Signature=SECRET1&token=SECRET2&d=a")
    reason = err.value.reason
    assert reason.startswith(f"HTTP 404 fetching {ls.base}/missing.png?")
    assert "SECRET" not in reason and "d=a" in reason


def test_connection_refused_is_a_media_error(fetchers):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    with pytest.raises(MediaError) as err:
        fetchers(f"http://127.0.0.1:{port}").fetch("/data/upload/1/x.png")
    assert f"127.0.0.1:{port}" in err.value.reason


# --------------------------------------------------------------------------- cache


def test_cache_hit_makes_no_request(ls, fetchers, tmp_path):
    first = fetchers(ls.base, LEGACY_KEY).fetch("/data/upload/1/cached.png")
    again = fetchers(ls.base, LEGACY_KEY).fetch("/data/upload/1/cached.png")  # fresh instance, same dir
    assert first == again
    assert ls.hits("/data/upload/1/cached.png") == 1


def test_extension_detected_when_url_has_none(ls, fetchers):
    fetcher = fetchers(ls.base, LEGACY_KEY)
    path = fetcher.fetch(f"{ls.base}/noext")
    assert path.suffix == ".png" and _is_png(path)
    assert fetcher.fetch(f"{ls.base}/noext") == path
    assert ls.hits("/noext") == 1


def test_relative_and_absolute_ls_url_share_cache(ls, fetchers):
    fetcher = fetchers(ls.base, LEGACY_KEY)
    assert fetcher.fetch("/data/upload/1/same.png") == fetcher.fetch(f"{ls.base}/data/upload/1/same.png")
    assert ls.hits("/data/upload/1/same.png") == 1


# --------------------------------------------------------------------------- fetch_many


def test_fetch_many_keeps_order_isolates_failures_and_dedupes(ls, servers, fetchers):
    evil = servers()
    fetcher = fetchers(ls.base, LEGACY_KEY)
    urls = ["/data/upload/1/a.png", "/missing.png", f"{evil.base}/img.png", "/data/upload/1/b.png",
            "/data/upload/1/a.png"]
    results = fetcher.fetch_many(urls, workers=4)
    assert len(results) == 5
    assert isinstance(results[0], Path) and _is_png(results[0])
    assert isinstance(results[1], MediaError) and "HTTP 404" in results[1].reason
    assert isinstance(results[2], MediaError) and "not allowed" in results[2].reason
    assert isinstance(results[3], Path) and results[3] != results[0]
    assert results[4] == results[0]
    assert ls.hits("/data/upload/1/a.png") == 1
    assert fetcher.fetch_many([]) == []


# --------------------------------------------------------------------------- settings


def test_from_settings(ls, tmp_path, monkeypatch):
    from labelloop.config import settings

    monkeypatch.setenv("LABEL_STUDIO_URL", ls.base + "/")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", LEGACY_KEY)
    monkeypatch.setenv("LABELLOOP_ALLOWED_HOSTS", "Example.COM, *.cdn.test")
    monkeypatch.setenv("LABELLOOP_CACHE_DIR", str(tmp_path / "c"))
    fetcher = MediaFetcher.from_settings()
    try:
        path = fetcher.fetch("/data/upload/9/s.png")
        assert path.is_relative_to(tmp_path / "c" / "media")
    finally:
        fetcher.close()
    assert MediaFetcher.from_settings(settings()) is not None


def test_dns_rebinding_cannot_swap_the_checked_address(ls, servers, fetchers, monkeypatch):
    """First answer public (passes the check), later answers loopback: we must stay on the first."""
    inside = servers()
    real = socket.getaddrinfo
    answers = iter(["8.8.8.8"])  # public, so the wildcard entry lets it through

    def rebinding(host, port, *args, **kwargs):
        if host == "img.example.com":
            return real(next(answers, "127.0.0.1"), port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    fetcher = fetchers(ls.base, LEGACY_KEY, ("*.example.com",), timeout=0.5)
    with pytest.raises(MediaError):
        fetcher.fetch(f"http://img.example.com:{inside.port}/img.png")
    assert inside.requests == []


def test_legacy_key_rejected_gets_a_hint(servers, fetchers):
    ls = servers(pat=PAT)  # legacy tokens off, as by default in Label Studio 1.23
    with pytest.raises(MediaError) as err:
        fetchers(ls.base, LEGACY_KEY).fetch("/data/upload/1/a.png")
    assert "HTTP 401" in err.value.reason and "personal access token" in err.value.reason


def test_allow_list_entry_forms():
    from labelloop.labelstudio.media import _AllowList, _Origin

    allow = _AllowList.parse(["Example.COM.", "[::1]:8080", "http://cdn.test:81", "*.img.test", "10.0.0.0/8", " "])

    def how(scheme, host, port):
        return allow.match(_Origin(scheme, host, port))

    assert how("https", "example.com", 443) == "named"
    assert how("http", "::1", 8080) == "named" and how("http", "::1", 80) is None
    assert how("http", "cdn.test", 81) == "named" and how("http", "cdn.test", 80) is None
    assert how("http", "a.b.img.test", 80) == "wildcard"
    assert how("http", "img.test", 80) is None and how("http", "evilimg.test", 80) is None
    assert how("http", "10.1.2.3", 80) == "network" and how("http", "11.1.2.3", 80) is None


# --------------------------------------------------------------------------- Label Studio's uploads read locally
# LABELLOOP_LS_MEDIA_DIR: the backend shares Label Studio's media folder (the one holding upload/).

from labelloop.labelstudio.media import LocalUploads  # noqa: E402 - grouped with the tests that use it


def _png_file(path: Path, size=(8, 6), color=(10, 200, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="PNG")
    return path


def _green(path: Path) -> bool:
    with Image.open(path) as im:
        return im.convert("RGB").getpixel((0, 0)) == (10, 200, 10)


@pytest.fixture
def media(tmp_path) -> Path:
    """A Label Studio media folder with one upload, and a secret image just outside upload/."""
    root = tmp_path / "ls-media"
    _png_file(root / "upload" / "1" / "abc-a.png")
    _png_file(root / "export" / "secret.png")  # inside the media folder, outside upload/
    _png_file(tmp_path / "outside" / "secret.png")
    return root


def _cached(tmp_path: Path) -> list[Path]:
    cache = tmp_path / "cache" / "media"
    return [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []


def test_upload_read_in_place_without_a_request(ls, fetchers, media, tmp_path):
    fetcher = fetchers(ls.base, LEGACY_KEY, ls_media_dir=media)
    for url in ("/data/upload/1/abc-a.png", f"{ls.base}/data/upload/1/abc-a.png"):  # relative, and on LS's origin
        path = fetcher.fetch(url)
        assert path == (media / "upload" / "1" / "abc-a.png").resolve() and _green(path)
    assert ls.hits("/data/") == 0
    assert _cached(tmp_path) == []  # read in place, not copied into the cache


def test_without_the_setting_uploads_are_fetched_as_before(ls, fetchers, media, tmp_path):
    path = fetchers(ls.base, LEGACY_KEY).fetch("/data/upload/1/abc-a.png")
    assert ls.hits("/data/upload/1/abc-a.png") == 1 and _is_png(path) and not _green(path)
    assert path.is_relative_to(tmp_path / "cache" / "media")


def test_absent_file_falls_back_to_http(ls, fetchers, media, tmp_path):
    fetcher = fetchers(ls.base, LEGACY_KEY, ls_media_dir=media)
    path = fetcher.fetch("/data/upload/1/not-synced-yet.png")
    assert ls.hits("/data/upload/1/not-synced-yet.png") == 1
    assert path.is_relative_to(tmp_path / "cache" / "media") and _is_png(path)
    # a media folder without upload/ at all (nothing uploaded yet): every upload over HTTP
    empty = tmp_path / "empty-media"
    empty.mkdir()
    assert _is_png(fetchers(ls.base, LEGACY_KEY, ls_media_dir=empty).fetch("/data/upload/1/abc-a.png"))
    assert ls.hits("/data/upload/1/abc-a.png") == 1


def test_other_hosts_and_other_urls_are_never_read_locally(ls, servers, fetchers, media):
    other = servers()
    fetcher = fetchers(ls.base, LEGACY_KEY, (f"127.0.0.1:{other.port}",), ls_media_dir=media)
    # the same path on an allowed foreign host: fetched from that host, never from Label Studio's folder
    assert not _green(fetcher.fetch(f"{other.base}/data/upload/1/abc-a.png"))
    assert other.hits("/data/upload/1/abc-a.png") == 1
    # a query string, or a Label Studio URL outside /data/upload/: over HTTP as before
    assert not _green(fetcher.fetch("/data/upload/1/abc-a.png?v=2"))
    assert not _green(fetcher.fetch("/data/local-files/?d=upload/1/abc-a.png"))
    assert ls.hits("/data/upload/1/abc-a.png?v=2") == 1 and ls.hits("/data/local-files/") == 1


@pytest.mark.parametrize("url", [
    "/data/upload/%2e%2e/export/secret.png",  # encoded ..
    "/data/upload/1/%2E%2E/%2e%2e/export/secret.png",
    "/data/upload/1%2f..%2f..%2fexport%2fsecret.png",  # encoded slashes
    "/data/upload/..%5cexport%5csecret.png",  # backslashes
    "/data/upload//etc/passwd",  # empty segment
    "/data/upload/1/./abc-a.png",  # httpx drops "."; the encoded one reaches us
    "/data/upload/1/%2e/abc-a.png",
    "/data/upload/1/abc-a.png%00.png",  # NUL
])
def test_path_tricks_are_refused_without_reading_or_fetching(ls, fetchers, media, url):
    fetcher = fetchers(ls.base, LEGACY_KEY, ls_media_dir=media)
    if url == "/data/upload/1/./abc-a.png":  # normalized by httpx into a plain upload path: read, fine
        assert _green(fetcher.fetch(url))
        return
    with pytest.raises(MediaError) as err:
        fetcher.fetch(url)
    assert err.value.kind == "not_allowed" and "upload folder" in err.value.reason
    assert ls.requests == []


def test_plain_dot_dot_is_normalized_out_of_the_upload_path_and_never_read(ls, fetchers, media):
    """``..`` written plainly is removed by URL normalization: what is left is not an upload URL, so it
    goes to Label Studio as any URL would (here a 404), and the file outside upload/ is never read."""
    fetcher = fetchers(ls.base, LEGACY_KEY, ls_media_dir=media)
    with pytest.raises(MediaError) as err:
        fetcher.fetch("/data/upload/1/../../../export/secret.png")
    assert "HTTP 404" in err.value.reason
    assert [path for _, path, _ in ls.requests] == ["/export/secret.png"]


def test_double_encoding_is_decoded_once(ls, fetchers, media):
    """``%252e%252e`` is the literal name ``%2e%2e``: no such upload, so HTTP, never a parent folder."""
    fetcher = fetchers(ls.base, LEGACY_KEY, ls_media_dir=media)
    assert not _green(fetcher.fetch("/data/upload/%252e%252e/export/secret.png"))
    assert ls.hits("/data/upload/%252e%252e/") == 1


def test_symlink_out_of_the_upload_folder_is_refused(ls, fetchers, media, tmp_path):
    upload = media / "upload"
    (upload / "1" / "evil.png").symlink_to(tmp_path / "outside" / "secret.png")
    (upload / "2").symlink_to(tmp_path / "outside", target_is_directory=True)
    (upload / "1" / "dangling.png").symlink_to(tmp_path / "outside" / "nothing.png")
    (upload / "1" / "inside.png").symlink_to(upload / "1" / "abc-a.png")  # stays inside: fine
    fetcher = fetchers(ls.base, LEGACY_KEY, ls_media_dir=media)
    for url in ("/data/upload/1/evil.png", "/data/upload/2/secret.png", "/data/upload/1/dangling.png"):
        with pytest.raises(MediaError) as err:
            fetcher.fetch(url)
        assert err.value.kind == "not_allowed" and "outside" in err.value.reason
    assert _green(fetcher.fetch("/data/upload/1/inside.png"))
    assert ls.requests == []


def test_a_symlinked_upload_folder_itself_is_followed(ls, fetchers, tmp_path):
    """Docker volumes and bind mounts often make upload/ a link: the root is resolved first."""
    real = tmp_path / "volume" / "upload"
    _png_file(real / "1" / "x.png")
    media = tmp_path / "media"
    media.mkdir()
    (media / "upload").symlink_to(real, target_is_directory=True)
    assert _green(fetchers(ls.base, LEGACY_KEY, ls_media_dir=media).fetch("/data/upload/1/x.png"))
    assert ls.requests == []


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_local_files_get_the_caps_and_decode_check_and_fail_alone(ls, fetchers, media):
    upload = media / "upload" / "1"
    (upload / "big.png").write_bytes(PNG + b"\0" * (2**20))  # over the 1 MB test cap
    _png_file(upload / "wide.png", size=(400, 300))  # 120000 pixels
    (upload / "corrupt.png").write_bytes(PNG[: len(PNG) // 2])
    (upload / "text.png").write_text("not a picture")
    fetcher = fetchers(ls.base, LEGACY_KEY, ls_media_dir=media, max_pixels=100_000)
    names = ["abc-a.png", "big.png", "wide.png", "corrupt.png", "text.png", "abc-a.png"]
    got = fetcher.fetch_many([f"/data/upload/1/{n}" for n in names], workers=3)
    assert len(got) == 6 and isinstance(got[0], Path) and got[5] == got[0] and _green(got[0])
    assert isinstance(got[1], MediaError) and got[1].kind == "too_large" and "MB" in got[1].reason
    assert isinstance(got[2], MediaError) and got[2].kind == "too_large" and "megapixel" in got[2].reason
    assert isinstance(got[3], MediaError) and got[3].kind == "not_decodable"
    assert isinstance(got[4], MediaError) and got[4].kind == "not_decodable"
    assert ls.requests == []  # a refused local file is not fetched again over HTTP


def test_non_regular_files_fall_back_to_http_without_blocking(ls, fetchers, media):
    import os

    upload = media / "upload" / "1"
    os.mkfifo(upload / "pipe.png")  # opening a FIFO for reading would block without O_NONBLOCK
    (upload / "folder.png").mkdir()
    fetcher = fetchers(ls.base, LEGACY_KEY, ls_media_dir=media)
    for name in ("pipe.png", "folder.png"):
        assert _is_png(fetcher.fetch(f"/data/upload/1/{name}"))
        assert ls.hits(f"/data/upload/1/{name}") == 1


def test_label_studio_under_a_path_prefix(ls, fetchers, media):
    fetcher = fetchers(ls.base + "/ls", LEGACY_KEY, ls_media_dir=media)
    assert _green(fetcher.fetch("/data/upload/1/abc-a.png"))  # → <LS>/ls/data/upload/...: Label Studio's upload
    assert not _green(fetcher.fetch(f"{ls.base}/data/upload/1/abc-a.png"))  # not under the prefix: over HTTP
    assert ls.hits("/data/upload/1/abc-a.png") == 1 and ls.hits("/ls/") == 0


def test_percent_encoded_names_are_read(ls, fetchers, media):
    _png_file(media / "upload" / "1" / "a b+é.png")
    fetcher = fetchers(ls.base, LEGACY_KEY, ls_media_dir=media)
    assert _green(fetcher.fetch("/data/upload/1/a%20b%2B%C3%A9.png"))
    assert ls.requests == []


def test_a_replaced_local_file_is_checked_again(ls, fetchers, media):
    fetcher = fetchers(ls.base, LEGACY_KEY, ls_media_dir=media)
    target = media / "upload" / "1" / "abc-a.png"
    assert _green(fetcher.fetch("/data/upload/1/abc-a.png"))
    target.write_bytes(b"broken now")  # same name, new content: the decode-check memo must not vouch for it
    with pytest.raises(MediaError) as err:
        fetcher.fetch("/data/upload/1/abc-a.png")
    assert err.value.kind == "not_decodable"


def test_media_dir_setting(ls, tmp_path, media, monkeypatch):
    monkeypatch.setenv("LABEL_STUDIO_URL", ls.base)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", LEGACY_KEY)
    monkeypatch.setenv("LABELLOOP_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.setenv("LABELLOOP_LS_MEDIA_DIR", str(media))
    with MediaFetcher.from_settings() as fetcher:
        assert _green(fetcher.fetch("/data/upload/1/abc-a.png"))
    monkeypatch.setenv("LABELLOOP_LS_MEDIA_DIR", "")
    with MediaFetcher.from_settings() as fetcher:
        assert not _green(fetcher.fetch("/data/upload/1/abc-a.png"))
    assert ls.hits("/data/upload/1/abc-a.png") == 1
    # not there yet (Label Studio makes it with its first upload): over HTTP until it appears, then local
    later = tmp_path / "not-yet"
    monkeypatch.setenv("LABELLOOP_LS_MEDIA_DIR", str(later))
    monkeypatch.setenv("LABELLOOP_CACHE_DIR", str(tmp_path / "c2"))
    with MediaFetcher.from_settings() as fetcher:
        assert not _green(fetcher.fetch("/data/upload/1/abc-a.png"))
        assert ls.hits("/data/upload/1/abc-a.png") == 2
        (later / "upload" / "1").mkdir(parents=True)
        (later / "upload" / "1" / "abc-b.png").write_bytes((media / "upload" / "1" / "abc-a.png").read_bytes())
        assert _green(fetcher.fetch("/data/upload/1/abc-b.png"))
    assert ls.hits("/data/upload/1/abc-b.png") == 0


def test_media_dir_without_label_studio_url_is_ignored(fetchers, media, tmp_path):
    fetcher = fetchers("", "", ls_media_dir=media)
    with pytest.raises(MediaError) as err:
        fetcher.fetch("/data/upload/1/abc-a.png")
    assert "needs LABEL_STUDIO_URL" in err.value.reason


@pytest.mark.unit
@pytest.mark.parametrize("url, parts", [
    ("http://ls:8080/data/upload/1/a.png", ["1", "a.png"]),
    ("http://ls:8080/data/upload/1/a%20b.png", ["1", "a b.png"]),
    ("http://ls:8080/data/uploads/1/a.png", None),
    ("http://ls:8080/data/upload", None),
    ("http://ls:8080/data/local-files/?d=upload/1/a.png", None),
    ("http://ls:8080/data/upload/1/a.png?x=1", None),
    ("http://ls:8080/data/upload/1/a.png#f", None),
    ("http://ls:8080/data/upload/%ff.png", None),  # not UTF-8: not a name Label Studio writes
    ("http://ls:8080/data/%75pload/1/a.png", ["1", "a.png"]),  # decoded once, as Django does
])
def test_upload_url_recognition(tmp_path, url, parts):
    import httpx

    uploads = LocalUploads(tmp_path, max_bytes=2**20, max_pixels=10**6)
    assert uploads.relative_parts(httpx.URL(url)) == parts


@pytest.mark.unit
@pytest.mark.parametrize("url", [
    "http://ls/data/upload/%2e%2e/x.png", "http://ls/data/upload/a/%2E%2E%2Fb.png", "http://ls/data/upload/a%5C..%5Cb",
    "http://ls/data/upload//x.png", "http://ls/data/upload/a/", "http://ls/data/upload/a%00.png",
])
def test_upload_url_escapes_refused(tmp_path, url):
    import httpx

    uploads = LocalUploads(tmp_path, max_bytes=2**20, max_pixels=10**6)
    with pytest.raises(MediaError) as err:
        uploads.relative_parts(httpx.URL(url))
    assert err.value.kind == "not_allowed"


@pytest.mark.unit
def test_local_uploads_need_a_directory(tmp_path):
    import httpx

    missing = LocalUploads(tmp_path / "missing", max_bytes=1, max_pixels=1)  # not yet: HTTP meanwhile
    assert missing.open(httpx.URL("http://ls/data/upload/1/a.png")) is None
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        LocalUploads(tmp_path / "file", max_bytes=1, max_pixels=1)
