"""Images that cannot hurt (issue 9): hostile bodies served by a real HTTP server on 127.0.0.1.

Each case is something a task URL can point the backend at: a decompression bomb, a gzip/brotli
bomb, a corrupt PNG whose chunk CRCs are valid, a truncated JPEG, a host that drips bytes. Each must
become that image's ``MediaError`` with a reason, within bounded time and memory, and the fetcher
must go on serving good images afterwards. Plus the image cache's LRU size cap.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import struct
import threading
import time
import tracemalloc
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from labelloop.labelstudio.media import LocalFileFetcher, MediaError, MediaFetcher

MB = 2**20
# PIL warns about a 169-MP image as it reads the header, just before our own check refuses it.
PIL_BOMB_WARNING = "ignore::PIL.Image.DecompressionBombWarning"


# --------------------------------------------------------------------------- hostile payloads


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, idat: bytes, bit_depth: int = 8, color_type: int = 2) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


@functools.cache
def png_bomb() -> bytes:
    """A valid 13000x13000 PNG of ~21 KB: 1-bit grey, all zeros (cv2 would make it 507 MB of BGR)."""
    row = b"\0" * (1 + 13000 // 8 + 1)  # filter byte + 1625 bytes of 1-bit pixels
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(13000)) + compressor.flush()
    return _png(13000, 13000, idat, bit_depth=1, color_type=0)


def corrupt_png() -> bytes:
    """Every chunk CRC valid, the IDAT a zlib header followed by an invalid deflate block type."""
    return _png(32, 32, b"\x78\x9c" + b"\xff" * 64)


def noise_image(fmt: str = "PNG", size: int = 64, seed: int = 0) -> bytes:
    """Incompressible pixels, so every file has a predictable, non-trivial size."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def truncated_jpeg() -> bytes:
    whole = noise_image("JPEG", 128, seed=3)
    return whole[: len(whole) * 6 // 10]


@functools.cache
def gzip_bomb() -> bytes:
    """128 MB of zeros as ~130 KB of gzip: one 64 KB read of it inflates to ~64 MB."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return compressor.compress(b"\0" * (128 * MB)) + compressor.flush()


@functools.cache
def brotli_bomb() -> bytes:
    """128 MB of zeros as ~200 bytes of brotli: inflated in one call by a library decoder."""
    brotli = pytest.importorskip("brotli")
    return brotli.compress(b"\0" * (128 * MB), quality=4)


# --------------------------------------------------------------------------- a real hostile host


class Host:
    """A ThreadingHTTPServer on 127.0.0.1 serving ``routes`` (path -> handler) and recording requests."""

    def __init__(self):
        self.routes: dict[str, object] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.lock = threading.Lock()
        host = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                with host.lock:
                    host.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                route = host.routes.get(self.path)
                try:
                    if route is None:
                        send(self, b"not found", status=404, ctype="text/plain")
                    else:
                        route(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up on purpose (cap, deadline)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def serve(self, path: str, body: bytes, **headers) -> str:
        self.routes[path] = lambda handler: send(handler, body, **headers)
        return self.base + path

    def hits(self, path: str) -> int:
        with self.lock:
            return sum(1 for p, _ in self.requests if p == path)

    def headers_for(self, path: str) -> list[dict[str, str]]:
        with self.lock:
            return [h for p, h in self.requests if p == path]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def send(handler, body: bytes, status: int = 200, ctype: str = "image/png", **headers) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", ctype)
    handler.send_header("Content-Length", str(len(body)))
    for name, value in headers.items():
        handler.send_header(name.replace("_", "-"), value)
    handler.end_headers()
    handler.wfile.write(body)


def drip_body(handler, interval: float = 0.5, limit_s: float = 8.0) -> None:
    """Headers at once, then one body byte per ``interval`` (each read succeeds: no read timeout)."""
    handler.send_response(200)
    handler.send_header("Content-Type", "image/png")
    handler.send_header("Content-Length", "100000")
    handler.end_headers()
    handler.wfile.flush()
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        handler.wfile.write(b"\0")
        handler.wfile.flush()
        time.sleep(interval)


def drip_headers(handler, interval: float = 0.5, limit_s: float = 8.0) -> None:
    """The status line, then a header line that never ends, one byte per ``interval``."""
    handler.wfile.write(b"HTTP/1.1 200 OK\r\nX-Drip: ")
    handler.wfile.flush()
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        handler.wfile.write(b"a")
        handler.wfile.flush()
        time.sleep(interval)


@pytest.fixture
def host():
    server = Host()
    yield server
    server.close()


@pytest.fixture
def fetcher_for(tmp_path):
    made: list[MediaFetcher] = []

    def make(host: Host, **kwargs) -> MediaFetcher:
        kwargs.setdefault("cache_dir", tmp_path / "cache")
        kwargs.setdefault("timeout", 5.0)
        # listed by name and port: the way an operator allows an image host
        fetcher = MediaFetcher(allowed_hosts=(f"127.0.0.1:{host.port}",), **kwargs)
        made.append(fetcher)
        return fetcher

    yield make
    for fetcher in made:
        fetcher.close()


def cached_files(tmp_path: Path) -> list[Path]:
    media = tmp_path / "cache" / "media"
    return sorted(p for p in media.rglob("*") if p.is_file()) if media.exists() else []


def assert_still_serves(host: Host, fetcher: MediaFetcher, name: str = "/good.png") -> None:
    path = fetcher.fetch(host.serve(name, noise_image(seed=42)))
    with Image.open(path) as image:
        assert image.size == (64, 64)


# --------------------------------------------------------------------------- image bombs and corrupt images


@pytest.mark.filterwarnings(PIL_BOMB_WARNING)
def test_png_bomb_refused_from_its_header_before_decoding(host, fetcher_for, tmp_path):
    bomb = png_bomb()
    assert len(bomb) < 64 * 1024  # small on the wire, 169 megapixels once decoded
    fetcher = fetcher_for(host)
    started = time.monotonic()
    with pytest.raises(MediaError) as err:
        fetcher.fetch(host.serve("/bomb.png", bomb))
    assert err.value.reason == ("image is 13000x13000 pixels (169 megapixels), over the 50-megapixel cap "
                                "(LABELLOOP_MAX_IMAGE_PIXELS)")
    assert time.monotonic() - started < 2.0
    assert cached_files(tmp_path) == []
    assert_still_serves(host, fetcher)


def test_corrupt_png_with_valid_crcs_is_that_tasks_error_not_the_batchs(host, fetcher_for, tmp_path):
    broken = corrupt_png()
    with Image.open(io.BytesIO(broken)) as image:
        image.verify()  # every CRC is right: a container-level check alone lets it through
    fetcher = fetcher_for(host)
    urls = [host.serve("/a.png", noise_image(seed=1)), host.serve("/broken.png", broken),
            host.serve("/b.png", noise_image(seed=2))]
    first, bad, last = fetcher.fetch_many(urls, workers=3)
    assert isinstance(first, Path) and isinstance(last, Path)
    assert isinstance(bad, MediaError)
    assert bad.reason.startswith("corrupt PNG data: ") and "broken data stream" in bad.reason
    assert len(cached_files(tmp_path)) == 2  # the corrupt one was not cached ...
    with pytest.raises(MediaError):
        fetcher.fetch(urls[1])
    assert host.hits("/broken.png") == 2  # ... so it is refused again, with its reason, every time


def test_truncated_jpeg_refused_with_reason(host, fetcher_for, tmp_path):
    fetcher = fetcher_for(host)
    with pytest.raises(MediaError) as err:
        fetcher.fetch(host.serve("/cut.jpg", truncated_jpeg(), ctype="image/jpeg"))
    assert err.value.reason.startswith("corrupt JPEG data: image file is truncated")
    assert cached_files(tmp_path) == []
    assert_still_serves(host, fetcher)


def test_corrupt_file_already_in_the_cache_is_dropped_and_fetched_again(host, fetcher_for, tmp_path):
    """A cache filled by an older labelloop (no decode check) must not fail every job forever."""
    url = host.serve("/was-broken.png", noise_image(seed=5))  # the host has fixed the image since
    digest = hashlib.sha256(url.encode()).hexdigest()
    stale = tmp_path / "cache" / "media" / digest[:2] / f"{digest}.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(corrupt_png())
    path = fetcher_for(host).fetch(url)
    assert host.hits("/was-broken.png") == 1
    with Image.open(path) as image:
        image.load()
        assert image.size == (64, 64)


@pytest.mark.filterwarnings(PIL_BOMB_WARNING)
def test_local_files_get_the_same_checks(tmp_path):
    files = {"good.png": noise_image(seed=7), "broken.png": corrupt_png(), "cut.jpg": truncated_jpeg(),
             "bomb.png": png_bomb()}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    paths = [str(tmp_path / name) for name in files] + [str(tmp_path / "missing.png")]
    good, broken, cut, bomb, missing = LocalFileFetcher(max_pixels=50_000_000).fetch_many(paths)
    assert good == tmp_path / "good.png"
    assert isinstance(broken, MediaError) and broken.reason.startswith("corrupt PNG data")
    assert str(tmp_path / "broken.png") in broken.reason
    assert isinstance(cut, MediaError) and "truncated" in cut.reason
    assert isinstance(bomb, MediaError) and "LABELLOOP_MAX_IMAGE_PIXELS" in bomb.reason
    assert isinstance(missing, MediaError) and missing.reason.startswith("no such file")


# --------------------------------------------------------------------------- compression bombs


def _fetch_measuring_peak(fetcher: MediaFetcher, url: str) -> tuple[MediaError, int, float]:
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(MediaError) as err:
            fetcher.fetch(url)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return err.value, peak, time.monotonic() - started


@pytest.mark.parametrize("coding", ["gzip", "br"])
def test_compression_bomb_stops_at_the_size_cap_with_bounded_memory(host, fetcher_for, tmp_path, coding):
    body = gzip_bomb() if coding == "gzip" else brotli_bomb()
    assert len(body) < MB  # under the cap on the wire: only the decoded count can stop it
    fetcher = fetcher_for(host, max_bytes=MB)
    # The host compresses whatever the client asked for, as a hostile one would.
    url = host.serve(f"/bomb-{coding}.png", body, Content_Encoding=coding)
    error, peak, elapsed = _fetch_measuring_peak(fetcher, url)
    assert error.reason == f"image larger than 1 MB after decoding Content-Encoding {coding}"
    assert peak < 8 * MB, f"{peak / MB:.0f} MB held while refusing a {coding} bomb"
    assert elapsed < 2.0
    assert host.headers_for(f"/bomb-{coding}.png")[0]["accept-encoding"] == "identity"
    assert cached_files(tmp_path) == []
    assert_still_serves(host, fetcher)


def test_honest_gzip_image_is_inflated_and_cached(host, fetcher_for):
    image = noise_image(seed=9)
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    url = host.serve("/gz.png", compressor.compress(image) + compressor.flush(), Content_Encoding="gzip")
    path = fetcher_for(host).fetch(url)
    assert path.read_bytes() == image


# --------------------------------------------------------------------------- slow hosts


@pytest.mark.parametrize("drip", [drip_body, drip_headers], ids=["body", "headers"])
def test_slow_drip_host_is_cut_at_the_fetch_deadline(host, fetcher_for, drip):
    host.routes["/drip.png"] = drip
    # every read gets a byte within 0.5 s, far inside the 5-s read timeout: only a total deadline helps
    fetcher = fetcher_for(host, timeout=5.0, deadline=1.5)
    started = time.monotonic()
    with pytest.raises(MediaError) as err:
        fetcher.fetch(f"{host.base}/drip.png")
    elapsed = time.monotonic() - started
    assert err.value.reason == (f"fetch took longer than the 1.5-s deadline (LABELLOOP_FETCH_DEADLINE_S) "
                                f"for {host.base}/drip.png")
    assert 1.4 < elapsed < 2.5
    assert_still_serves(host, fetcher)


# --------------------------------------------------------------------------- cache size cap


def _age(path: Path, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


def test_cache_cap_evicts_least_recently_used_files_but_never_recent_ones(host, fetcher_for, tmp_path):
    images = {name: noise_image(seed=i) for i, name in enumerate("abcde")}
    size = len(images["a"])
    assert all(len(data) == size for data in images.values())
    fetcher = fetcher_for(host, cache_max_bytes=int(2.5 * size))
    urls = {name: host.serve(f"/{name}.png", data) for name, data in images.items()}
    path = {name: fetcher.fetch(urls[name]) for name in "abc"}
    # all three used long ago, "a" the longest ago; then a hit makes "a" the most recently used
    for name, age in zip("abc", (3000, 2000, 1000)):
        _age(path[name], age)
    stale_part = path["a"].parent / ".left-by-a-dead-process.part"
    stale_part.write_bytes(b"\0" * 10)
    _age(stale_part, 7200)
    assert fetcher.fetch(urls["a"]) == path["a"]
    assert host.hits("/a.png") == 1

    path["d"] = fetcher.fetch(urls["d"])  # 4 files > 2.5: evict down to 90 % of the cap, oldest first

    assert sorted(cached_files(tmp_path)) == sorted([path["a"], path["d"]])
    assert not path["b"].exists() and not path["c"].exists() and not stale_part.exists()

    # Over the cap again, but every file was used within the grace period: none may vanish under
    # a caller that was just handed its path.
    path["e"] = fetcher.fetch(urls["e"])
    assert sorted(cached_files(tmp_path)) == sorted([path["a"], path["d"], path["e"]])

    assert fetcher.fetch(urls["b"]) == path["b"] and host.hits("/b.png") == 2  # evicted: fetched again


# --------------------------------------------------------------------------- settings


def test_limits_come_from_the_environment(host, tmp_path, monkeypatch):
    from labelloop.config import settings

    monkeypatch.setenv("LABELLOOP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LABELLOOP_ALLOWED_HOSTS", f"127.0.0.1:{host.port}")
    monkeypatch.setenv("LABELLOOP_MAX_IMAGE_PIXELS", "1000")
    monkeypatch.setenv("LABELLOOP_FETCH_DEADLINE_S", "7.5")
    monkeypatch.setenv("LABELLOOP_IMAGE_CACHE_MB", "1.5")
    env = settings()
    assert (env.max_image_pixels, env.fetch_deadline, env.image_cache_bytes) == (1000, 7.5, int(1.5 * MB))
    with MediaFetcher.from_settings(env) as fetcher:
        with pytest.raises(MediaError) as err:
            fetcher.fetch(host.serve("/small.png", noise_image(size=64)))
    assert err.value.reason == ("image is 64x64 pixels (0.0041 megapixels), over the 0.001-megapixel cap "
                                "(LABELLOOP_MAX_IMAGE_PIXELS)")
    monkeypatch.setenv("LABELLOOP_MAX_IMAGE_PIXELS", "0")
    with pytest.raises(ValueError, match="LABELLOOP_MAX_IMAGE_PIXELS must be a positive number"):
        MediaFetcher.from_settings()
