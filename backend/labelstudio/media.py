"""Fetch task images for the ML backend: Label Studio auth, an allow-list (no SSRF), an on-disk cache.

Why this exists: task data holds image URLs that *someone else* wrote (any annotator can import
tasks), and the backend fetches them from inside the network, often with a Label Studio token.
So every fetch is treated as hostile input:

* only http(s); only the Label Studio host or hosts listed in ``LABELLOOP_ALLOWED_HOSTS``;
* a cloud-storage URI (``s3://``, ``gs://``, ``azure-blob://``: tasks imported from a Label Studio storage)
  is never fetched itself: ``task_image_url`` turns it into Label Studio's presign path for that task
  (``/tasks/<id>/presign/?fileuri=<base64>``, on its origin, with our token), whose redirect to the
  presigned URL is followed only to a host on the allow-list (bucket hosts are external: list them), token
  dropped, every cap unchanged;
* a listed host that resolves to an internal address (DNS rebinding, 169.254.169.254 cloud
  metadata) is refused unless the operator named it explicitly, and the connection is pinned to
  the address that was checked, so a second DNS answer cannot swap it;
* redirects are followed by hand, each hop checked again; the token is sent to the Label Studio
  host only, never to another host;
* bodies are streamed with a size cap counted on the bytes we keep: we ask for no transfer
  compression, and a host that compresses anyway is inflated 64 KB at a time under the same cap
  (a few KB of gzip or brotli can inflate to gigabytes in one call of a library decoder);
* every fetch has a total deadline: each connect, read and write waits at most until then, so a host
  that drips one byte a second cannot hold a worker (httpx's own timeouts are per read);
* an image enters the cache only after a full decode under a pixel cap checked from the header
  first: a decompression bomb, a corrupt PNG or a truncated JPEG is that task's ``MediaError``,
  never an exception in the middle of a batch's prediction;
* the cache is capped in size and evicts the least recently used files, never one used recently.

With ``LABELLOOP_LS_MEDIA_DIR`` set (off by default), Label Studio's own uploads (``/data/upload/...``
on its origin) are read from its media folder when this machine shares it (``LocalUploads``), in place,
with the same size cap, pixel cap and full decode check; anything else, or a file not there, is fetched.

Label Studio 1.23 turns legacy tokens off by default; the default personal access token (PAT)
is a JWT *refresh* token that must be exchanged for 300-s access tokens (see
shared/notes/label-studio-protocol.md, "Auth"). Both kinds work here.
"""

from __future__ import annotations

import base64
import hashlib
import http.cookiejar
import ipaddress
import logging
import os
import re
import socket
import stat
import tempfile
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlencode

import httpcore
import httpx
from PIL import Image, UnidentifiedImageError

from labelloop.errors import LabelloopError
from labelloop.labelstudio.auth import LabelStudioAuth, StudioAuthError

try:  # optional (httpx[brotli]); without it a brotli-encoded body is refused, never inflated unbounded
    import brotli
except ImportError:  # pragma: no cover - depends on the environment
    brotli = None

log = logging.getLogger(__name__)

MAX_REDIRECTS = 3

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
_PIL_EXTS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "GIF": ".gif", "BMP": ".bmp",
             "WEBP": ".webp", "TIFF": ".tif"}
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_SECRET_PARAM_RE = re.compile(r"sig|token|key|secret|pass|credential|auth|session|x-amz-|x-goog-", re.I)
_CHUNK = 64 * 1024
_ALLOW_HINT = "LABELLOOP_ALLOWED_HOSTS"

DEFAULT_MAX_PIXELS = 50_000_000  # a 48/50-MP phone photo passes; the 13000x13000 PNG bomb (169 MP) does not
DEFAULT_FETCH_DEADLINE = 30.0  # seconds for a whole fetch: DNS aside, connect + redirects + body
DEFAULT_CACHE_MAX_BYTES = 2048 * 2**20
# Parallel fetches per batch. Measured against Label Studio 1.23.2 (`label-studio start`, Django's runserver)
# on 2 cores, 60 uploads: 1, 2, 4 and 8 at once all took 0.47-0.52 s (it serves about one upload per 8.5 ms
# whatever the concurrency, and closes every connection: no keep-alive to gain), 16 took 1.1-1.3 s. Eight
# keeps slow remote hosts (presigned storage URLs) busy without crowding Label Studio.
FETCH_WORKERS = 8
# A cached file used this recently is never evicted: the path a fetch returned is read by the caller
# (prediction, or a hard link into a training set) soon after, possibly from another process.
CACHE_EVICTION_GRACE = 600.0
_CACHE_LOW_WATER = 0.9  # evict down to 90 % of the cap, so a full cache is not rescanned on every commit
_STALE_TEMP_AGE = 3600.0  # a ".part" file this old was left by a process that died mid-download
# Full decodes at once in this process: each may hold up to max_pixels x 4 bytes (200 MB at 50 MP),
# and eight parallel downloads must not all hold one at the same time.
_DECODE_SLOTS = threading.BoundedSemaphore(2)
_CACHE_LOCK = threading.Lock()  # a cache hit's touch vs. eviction's re-check + unlink, in this process

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class MediaError(LabelloopError):
    """A task image could not be fetched; ``reason`` is short enough to show a labeler or log.

    ``kind`` (a metrics label): not_allowed, timeout, http, not_decodable, too_large, unreachable, media."""

    kind, http_status = "media", 422

    def __init__(self, reason: str, kind: str | None = None):
        super().__init__(reason, kind=kind)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


# --------------------------------------------------------------------------- small helpers


def _norm_host(host: str) -> str:
    """Lower-case, drop a trailing dot, and write IP literals one way, so comparisons are exact."""
    host = host.strip().strip("[]").lower().rstrip(".")
    ip = _ip_or_none(host)
    return str(ip) if ip is not None else host


def _ip_or_none(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _is_internal(addr: IPAddress) -> bool:
    """True for any address an outsider should not be able to point us at."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # ::ffff:169.254.169.254 is 169.254.169.254
    return (addr.is_private or addr.is_loopback or addr.is_link_local or addr.is_reserved
            or addr.is_multicast or addr.is_unspecified or not addr.is_global)


def _redact(url: str | httpx.URL) -> str:
    """The URL for messages and logs: no user-info, no fragment, secret-looking query values masked.

    Presigned storage URLs carry their credential in the query; it must not land in logs.
    """
    try:
        u = httpx.URL(str(url))
    except Exception:  # a message helper must never raise
        return "<invalid URL>"
    params = [(k, "***" if _SECRET_PARAM_RE.search(k) else v) for k, v in u.params.multi_items()]
    query = urlencode(params, safe="/*").encode() if params else b""
    return str(u.copy_with(userinfo=b"", fragment=None, query=query or None))


def _ext_from_url(url: httpx.URL) -> str | None:
    """An image extension from the path, or from ``?d=`` of a /data/local-files/ URL."""
    for candidate in (url.path, url.params.get("d") or ""):
        ext = os.path.splitext(candidate)[1].lower()
        if ext in _IMAGE_EXTS:
            return ext
    return None


# --------------------------------------------------------------------------- cloud storage URIs, presigned by Label Studio

# Label Studio's import storages (``url_scheme`` of S3/GCS/Azure in io_storages/*/models.py). A task imported
# from one holds the raw URI (``s3://bucket/key``), and /predict and exports send it raw (Label Studio
# resolves it only for its own UI). Label Studio presigns it for whoever may see the task:
# ``GET /tasks/<task id>/presign/?fileuri=<urlsafe base64 of the URI>`` (io_storages/urls.py; ``/resolve/``
# is the same view under its newer name, ``/presign/`` works on older versions too) answers 303 to the
# presigned URL (or, with the storage's presign off, streams the file itself).
STORAGE_SCHEMES = ("s3", "gs", "azure-blob")
MAX_STORAGE_URI_CHARS = 2048  # S3 keys are at most 1024 bytes, GCS names 1024, Azure blob names 1024 chars
MAX_TASK_ID = 2**63 - 1
PRESIGN_PATH = "/tasks/{task_id}/presign/"
_STORAGE_URI_RE = re.compile(r"^(s3|gs|azure-blob)://([^/?#\s]+)/(.+)$", re.S)


def storage_scheme(value) -> str | None:
    """The cloud-storage scheme of a task's image value (``s3``, ``gs``, ``azure-blob``), else None."""
    if not isinstance(value, str):
        return None
    match = _SCHEME_RE.match(value.strip())
    scheme = match.group(0)[:-1].lower() if match else None
    return scheme if scheme in STORAGE_SCHEMES else None


def presign_url(uri: str, task_id) -> str:
    """The path on Label Studio's origin that presigns ``uri`` for task ``task_id``; MediaError if either is
    not acceptable: a scheme of ``STORAGE_SCHEMES`` (lower case, as Label Studio matches it), a bucket and a
    key, at most ``MAX_STORAGE_URI_CHARS`` characters, no control characters; a positive integer task id."""
    if isinstance(task_id, bool) or not isinstance(task_id, int) or not 0 < task_id <= MAX_TASK_ID:
        raise MediaError(f"a cloud-storage image ({storage_scheme(uri) or 'storage'}://) is fetched through Label "
                         "Studio's presign endpoint, which needs the task's id; this task has none", kind="bad_url")
    if not isinstance(uri, str) or len(uri) > MAX_STORAGE_URI_CHARS:
        raise MediaError(f"cloud-storage URI longer than {MAX_STORAGE_URI_CHARS} characters", kind="bad_url")
    uri = uri.strip()
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in uri):
        raise MediaError("cloud-storage URI with control characters", kind="bad_url")
    match = _STORAGE_URI_RE.match(uri)
    if match is None:
        raise MediaError(f"not a cloud-storage URI ({', '.join(s + '://bucket/key' for s in STORAGE_SCHEMES)}): "
                         f"{_redact(uri[:200])}", kind="bad_url")
    fileuri = base64.urlsafe_b64encode(uri.encode("utf-8")).decode("ascii")
    return PRESIGN_PATH.format(task_id=task_id) + "?" + urlencode({"fileuri": fileuri})


def task_image_url(task: dict, key: str):
    """The URL to fetch for a task's image under data key ``key``: the value itself, or for a cloud-storage
    URI the Label Studio presign path (``presign_url``); None when the task has no string there. Raises
    MediaError for a cloud URI that cannot be presigned (no task id, malformed, too long)."""
    value = (task.get("data") or {}).get(key) if isinstance(task, dict) else None
    if not isinstance(value, str) or not value:
        return None
    if storage_scheme(value) is not None:
        return presign_url(value.strip(), task.get("id"))
    return value


# --------------------------------------------------------------------------- origins and allow-list


@dataclass(frozen=True)
class _Origin:
    """scheme + host + effective port: what decides both "is this Label Studio" and the allow-list."""

    scheme: str
    host: str
    port: int

    @classmethod
    def of(cls, url: httpx.URL) -> _Origin:
        scheme = url.scheme.lower()
        return cls(scheme, _norm_host(url.host), url.port or _DEFAULT_PORTS.get(scheme, 0))

    @property
    def netloc(self) -> str:
        """host[:port] as a person would write it (port only when not the default)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == _DEFAULT_PORTS.get(self.scheme) else f"{host}:{self.port}"


@dataclass(frozen=True)
class _AllowList:
    """Parsed ``LABELLOOP_ALLOWED_HOSTS``: "host", "host:port", "*.suffix", IP or CIDR."""

    names: frozenset[str] = frozenset()
    name_ports: frozenset[tuple[str, int]] = frozenset()
    suffixes: tuple[str, ...] = ()
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def parse(cls, entries) -> _AllowList:
        names, name_ports, suffixes, networks = set(), set(), [], []
        for raw in entries or ():
            entry = str(raw).strip().lower()
            if not entry:
                continue
            if entry.startswith("*."):
                suffixes.append(entry[1:].rstrip("."))
                continue
            network = cls._network_or_none(entry)
            if network is not None:
                networks.append(network)
                continue
            host, port = cls._split_host_port(entry)
            if host is None:
                log.warning("ignoring malformed %s entry %r", _ALLOW_HINT, raw)
            elif port is None:
                names.add(host)
            else:
                name_ports.add((host, port))
        return cls(frozenset(names), frozenset(name_ports), tuple(suffixes), tuple(networks))

    @staticmethod
    def _network_or_none(entry: str):
        try:
            return ipaddress.ip_network(entry.strip("[]"), strict=False)
        except ValueError:
            return None

    @staticmethod
    def _split_host_port(entry: str) -> tuple[str | None, int | None]:
        """'host', 'host:port', '[v6]:port' or a full 'http://host:port' (people paste URLs)."""
        if "://" not in entry:
            entry = "http://" + entry
        try:
            url = httpx.URL(entry)
        except Exception:  # malformed entry, reported by the caller
            return None, None
        return (_norm_host(url.host) or None), url.port

    def match(self, origin: _Origin) -> str | None:
        """How the origin is allowed: "named" (explicitly), "network", "wildcard", or None."""
        if origin.host in self.names or (origin.host, origin.port) in self.name_ports:
            return "named"
        ip = _ip_or_none(origin.host)
        if ip is not None:
            return "network" if self.covers(ip) else None
        if any(origin.host.endswith(suffix) for suffix in self.suffixes):
            return "wildcard"
        return None

    def covers(self, addr: IPAddress) -> bool:
        return any(addr in network for network in self.networks)


@dataclass(frozen=True)
class _Target:
    """One checked hop: the URL, whether it is Label Studio, and the addresses we may connect to."""

    url: httpx.URL
    origin: _Origin
    is_label_studio: bool
    addresses: tuple[IPAddress, ...] = field(default=())


# --------------------------------------------------------------------------- total deadline per fetch

_fetch_deadline = threading.local()  # .at: time.monotonic() by which this thread's fetch must be done


def _within_deadline(timeout: float | None, timeout_error: type[Exception]) -> float | None:
    """``timeout`` shortened to what is left of this thread's fetch deadline (unchanged outside a fetch)."""
    deadline = getattr(_fetch_deadline, "at", None)
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise timeout_error("the fetch deadline has passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A socket stream whose every read and write waits no longer than the fetch deadline allows."""

    def __init__(self, inner: httpcore.NetworkStream):
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _within_deadline(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _within_deadline(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None) -> _DeadlineStream:
        timeout = _within_deadline(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str):
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's socket backend with the fetch deadline applied to connects and to every stream."""

    def __init__(self):
        self._inner = httpcore.SyncBackend()

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        timeout = _within_deadline(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._inner.connect_tcp(host, port, timeout, local_address, socket_options))

    def connect_unix_socket(self, path, timeout=None, socket_options=None):  # pragma: no cover - no uds here
        timeout = _within_deadline(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._inner.connect_unix_socket(path, timeout, socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class _DeadlineTransport(httpx.HTTPTransport):
    """httpx's own transport (request building, exception mapping) over the deadline backend.

    httpx's timeouts are per read, and a slow host can send headers or body one byte per read
    forever; checking the clock between body chunks would not stop a drip inside the headers. So
    the deadline sits under httpx, where every socket wait is. httpx has no parameter for the
    network backend: the pool is replaced, and the check below makes an httpx upgrade that renames
    it fail loudly here instead of silently losing the deadline.
    """

    def __init__(self):
        super().__init__(trust_env=False)
        if not isinstance(getattr(self, "_pool", None), httpcore.ConnectionPool):
            raise RuntimeError("this httpx version's HTTPTransport has no connection pool at ._pool; "
                               "labelloop.labelstudio.media cannot apply LABELLOOP_FETCH_DEADLINE_S")
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False), network_backend=_DeadlineBackend(),
            max_connections=100, max_keepalive_connections=20, keepalive_expiry=5.0)  # httpx's defaults


# --------------------------------------------------------------------------- bounded body decoding


class _Identity:
    coding = ""

    def feed(self, data: bytes):
        yield data

    def finish(self):
        return ()


class _Zlib:
    """gzip or deflate, inflated at most 64 KB per step so the size cap stops a bomb in time."""

    def __init__(self, coding: str):
        self.coding = coding
        self._inflate = zlib.decompressobj(32 + zlib.MAX_WBITS)  # gzip or zlib header, detected

    def feed(self, data: bytes):
        while True:
            out = self._inflate.decompress(data, _CHUNK)
            if out:
                yield out
            data = self._inflate.unconsumed_tail
            if not data and len(out) < _CHUNK:
                return

    def finish(self):
        rest = self._inflate.flush()  # small: every step above drained its output
        return (rest,) if rest else ()


class _Brotli:
    """brotli, 64 KB of output per step (brotli >= 1.2's ``output_buffer_limit``)."""

    coding = "br"

    def __init__(self):
        self._inflate = brotli.Decompressor()

    def feed(self, data: bytes):
        out = self._inflate.process(data, output_buffer_limit=_CHUNK)
        while True:
            if out:
                yield out
            if self._inflate.can_accept_more_data() or not out:
                return
            out = self._inflate.process(b"", output_buffer_limit=_CHUNK)

    def finish(self):
        return ()


_BODY_DECODE_ERRORS = (zlib.error,) + ((brotli.error,) if brotli is not None else ())


def _bounded_brotli_available() -> bool:
    return brotli is not None and hasattr(getattr(brotli, "Decompressor", None), "can_accept_more_data")


def _body_decoder(content_encoding: str):
    """The decoder for a response's Content-Encoding; MediaError for one we cannot inflate boundedly."""
    codings = [c.strip().lower() for c in content_encoding.split(",") if c.strip()]
    codings = [c for c in codings if c != "identity"]
    if not codings:
        return _Identity()
    if len(codings) > 1:
        raise MediaError(f"Content-Encoding {content_encoding!r} is not supported (one coding at most)", kind="http")
    coding = codings[0]
    if coding in ("gzip", "x-gzip", "deflate"):
        return _Zlib(coding)
    if coding == "br" and _bounded_brotli_available():
        return _Brotli()
    raise MediaError(f"Content-Encoding {coding} is not supported", kind="http")


# --------------------------------------------------------------------------- image checks

_verified: dict[tuple, bool] = {}  # files already fully decoded in this process (see _check_image_once)
_VERIFIED_MAX = 100_000
_verified_lock = threading.Lock()


def _pixel_cap_reason(width: int, height: int, max_pixels: int) -> str:
    return (f"image is {width}x{height} pixels ({width * height / 1e6:.3g} megapixels), over the "
            f"{max_pixels / 1e6:g}-megapixel cap (LABELLOOP_MAX_IMAGE_PIXELS)")


def _check_image(path: Path, max_pixels: int) -> str:
    """Extension for the detected format, once the file is known to decode fully; else MediaError.

    The pixel count is read from the header and checked *before* anything is decoded. PIL has its
    own bomb check, but as a warning up to 2x its limit, and ultralytics sets that limit to None
    process-wide, so it is not relied on. Then a full decode: ``verify()`` alone checks PNG chunk
    CRCs only, so a PNG with valid CRCs and broken deflate data, or a truncated JPEG, passed it and
    then failed inside a batch's prediction, taking the other tasks down with it.
    """
    with _DECODE_SLOTS:
        fmt = ""  # known once Image.open succeeds; an error before that is reported without it
        try:
            with Image.open(path) as image:
                fmt = image.format or ""
                width, height = image.size
                if width * height > max_pixels:
                    raise MediaError(_pixel_cap_reason(width, height, max_pixels), kind="too_large")
                image.verify()  # container-level checks (PNG CRCs), cheap
            with Image.open(path) as image:  # verify() leaves the image unusable: open again
                image.load()
        except MediaError:
            raise
        except Image.DecompressionBombError as exc:  # only if PIL's own limit is below ours
            raise MediaError(f"image refused by PIL's decompression-bomb check: {exc}", kind="too_large") from exc
        except (UnidentifiedImageError, ImportError) as exc:
            # ImportError: ultralytics registers a HEIF opener that imports pi_heif while PIL probes an
            # unknown file; without it installed, that is still "no plugin can read this"
            raise MediaError("not a decodable image", kind="not_decodable") from exc
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, zlib.error...
            raise MediaError(f"corrupt {fmt or 'image'} data: {exc}", kind="not_decodable") from exc
    return _PIL_EXTS.get(fmt, "." + fmt.lower() if fmt else ".img")


def _file_key(path: Path, with_mtime: bool = True) -> tuple:
    """Identity of a file's content for the verified memo: a replaced or rewritten file gets a new key.

    Cache files are never rewritten (write-then-rename) but their mtime moves on every hit (LRU),
    so they are keyed without it.
    """
    st = path.stat()
    return (str(path), st.st_dev, st.st_ino, st.st_size) + ((st.st_mtime_ns,) if with_mtime else ())


def _remember_verified(key: tuple) -> None:
    with _verified_lock:
        if len(_verified) >= _VERIFIED_MAX:
            _verified.clear()  # a memo, not a record: forgetting costs one more decode per file
        _verified[key] = True


def _check_image_once(path: Path, max_pixels: int, key: tuple) -> None:
    """``_check_image`` unless this process already checked the same file under the same key."""
    with _verified_lock:
        if key in _verified:
            return
    _check_image(path, max_pixels)
    _remember_verified(key)


# --------------------------------------------------------------------------- Label Studio's uploads, read locally

UPLOAD_URL_PREFIX = "/data/upload/"  # Label Studio's MEDIA_URL (/data/) + UPLOAD_DIR (upload)
_MEDIA_DIR_HINT = "LABELLOOP_LS_MEDIA_DIR"


_missing_media_dir_warned: set[str] = set()


def _warn_missing_media_dir_once(media_dir) -> None:
    if str(media_dir) not in _missing_media_dir_warned:
        _missing_media_dir_warned.add(str(media_dir))
        log.warning("%s=%s does not exist (yet): Label Studio creates it with its first upload; until then "
                    "uploads are fetched over HTTP", _MEDIA_DIR_HINT, media_dir)


class LocalUploads:
    """Label Studio's uploads read from its media folder, for a backend on a machine (or a container)
    that shares it: what upstream label-studio-ml-backend's ``get_local_path`` does, made strict.

    Label Studio serves ``/data/upload/<rest>`` from ``<MEDIA_ROOT>/upload/<rest>`` (``MEDIA_ROOT`` is
    ``$LABEL_STUDIO_BASE_DATA_DIR/media`` for ``label-studio start``). ``media_dir`` is that
    ``MEDIA_ROOT``. Trust: the folder is Label Studio's (written by it alone); the URL is the task's
    and untrusted, so:

    * only a URL on Label Studio's origin, under its path prefix, whose path is ``/data/upload/...``,
      with no query or fragment (the caller checks the origin); anything else is fetched as before;
    * the path is percent-decoded exactly once and split into segments; an empty, ``.`` or ``..``
      segment, a NUL or a backslash refuses the image (Label Studio never writes such a URL);
    * the file's real path (symlinks resolved) must lie inside ``<media_dir>/upload``, else refused;
      it is opened without following a final symlink and without blocking, and must be a regular file;
    * the same size cap (on the file's size), pixel cap (from the header) and full decode check as a
      fetched image; a refused or corrupt file is that task's ``MediaError``;
    * a file that is not there (not synced yet, another Label Studio) or cannot be read returns None:
      the caller fetches it over HTTP as without this setting.

    Files are read in place, not copied into the cache: a training set or a FiftyOne dataset that uses
    one hard-links or copies it into its own folder (``link_or_copy``), as with cached files.
    """

    def __init__(self, media_dir, max_bytes: int, max_pixels: int, ls_path: str = ""):
        root = Path(media_dir).expanduser()
        if root.exists() and not root.is_dir():
            raise ValueError(f"{_MEDIA_DIR_HINT}={media_dir} is not a directory (it must be Label Studio's "
                             f"media folder, the one holding upload/)")
        if not root.exists():
            # Label Studio makes its media folder with the first upload; a backend started before that (a
            # fresh Compose stack) reads uploads over HTTP until the folder is there, then from it.
            _warn_missing_media_dir_once(media_dir)
        self._upload_dir = root / "upload"
        self._max_bytes = max_bytes
        self._max_pixels = max_pixels
        self._prefix = ls_path.rstrip("/") + UPLOAD_URL_PREFIX
        self._warned = False

    @property
    def upload_dir(self) -> Path:
        return self._upload_dir

    def relative_parts(self, url: httpx.URL) -> list[str] | None:
        """The segments after ``/data/upload/`` of a Label Studio URL; None when it is not an upload URL.
        Raises MediaError for a path that tries to leave the upload folder."""
        if url.query or url.fragment:
            return None
        raw = url.raw_path.split(b"?", 1)[0]
        try:
            decoded = unquote(raw.decode("ascii"), encoding="utf-8", errors="strict")
        except (UnicodeDecodeError, UnicodeEncodeError):
            return None  # not a name Label Studio writes; fetched (and refused by it) as before
        if not decoded.startswith(self._prefix):
            return None
        parts = decoded[len(self._prefix):].split("/")
        if any(part in ("", ".", "..") or "\0" in part or "\\" in part for part in parts):
            raise MediaError(f"upload path {_redact(url)} leaves Label Studio's upload folder", kind="not_allowed")
        return parts

    def open(self, url: httpx.URL) -> Path | None:
        """The checked local file for ``url`` (see the class); None: fetch it over HTTP."""
        parts = self.relative_parts(url)
        if parts is None:
            return None
        root = os.path.realpath(self._upload_dir)
        real = os.path.realpath(os.path.join(root, *parts))
        if os.path.commonpath([root, real]) != root or real == root:
            raise MediaError(f"upload {_redact(url)} resolves outside Label Studio's upload folder", kind="not_allowed")
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(real, flags)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:  # permissions, a symlink swapped in, a name too long: HTTP still works
            self._warn_once(f"cannot read {real}: {exc.strerror or exc}")
            return None
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        if st.st_size > self._max_bytes:
            raise MediaError(f"image larger than {self._max_bytes / 2**20:.3g} MB", kind="too_large")
        path = Path(real)
        _check_image_once(path, self._max_pixels, (real, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        return path

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("%s: %s; fetching Label Studio's uploads over HTTP instead", _MEDIA_DIR_HINT, message)


# --------------------------------------------------------------------------- fetching ahead


class Prefetch:
    """Fetches running in the background, in order, at most ``window`` (and no fewer than ``workers``)
    images ahead of the one asked for last (``result(i)``): the caller can predict one batch while the
    next ones are being fetched.

    ``result(i)`` is the i-th URL's path or its MediaError (never raises for one image); duplicate URLs
    are fetched once. Closing it cancels what has not started and waits for what has (each fetch is
    bounded by its deadline).
    """

    def __init__(self, fetch_one, urls: list, workers: int = 8, window: int = 32):
        self._fetch_one = fetch_one
        unique = list(dict.fromkeys(urls))
        position = {u: k for k, u in enumerate(unique)}
        self._unique = unique
        self._index = [position[u] for u in urls]
        self._window = max(1, int(window), int(workers))
        self._futures: list[Future] = []
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max(1, min(int(workers), len(unique) or 1)),
                                        thread_name_prefix="labelloop-media")
        self._submit_through(0)

    def __len__(self) -> int:
        return len(self._index)

    def _submit_through(self, k: int) -> None:
        """Make sure fetches of unique URLs up to ``k + window`` (exclusive) are submitted."""
        with self._lock:
            upto = min(len(self._unique), k + self._window)
            while len(self._futures) < upto:
                self._futures.append(self._pool.submit(self._fetch_one, self._unique[len(self._futures)]))

    def result(self, i: int) -> Path | MediaError:
        k = self._index[i]
        self._submit_through(k + 1)
        return self._futures[k].result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- the fetcher


class MediaFetcher:
    """Turns task image URLs into local file paths, safely. Thread-safe; one per process is enough."""

    def __init__(self, label_studio_url: str = "", api_key: str = "", allowed_hosts=(), cache_dir=None,
                 timeout: float = 10.0, max_bytes: int = 50 * 2**20, max_pixels: int = DEFAULT_MAX_PIXELS,
                 deadline: float = DEFAULT_FETCH_DEADLINE, cache_max_bytes: int = DEFAULT_CACHE_MAX_BYTES,
                 ls_media_dir=None):
        self._ls_url = (label_studio_url or "").strip().rstrip("/")
        self._ls_origin = self._parse_ls_origin(self._ls_url)
        self._allow = _AllowList.parse(allowed_hosts)
        if cache_dir is None:
            from labelloop.config import settings

            cache_dir = settings().cache_dir
        self._media_dir = Path(cache_dir) / "media"
        self._max_bytes = _positive(max_bytes, "LABELLOOP_MAX_IMAGE_MB", int)
        self._max_pixels = _positive(max_pixels, "LABELLOOP_MAX_IMAGE_PIXELS", int)
        self._deadline = _positive(deadline, "LABELLOOP_FETCH_DEADLINE_S", float)
        self._cache_max_bytes = _positive(cache_max_bytes, "LABELLOOP_IMAGE_CACHE_MB", int)
        self._cache_bytes: int | None = None  # running estimate of the cache's size; None until scanned
        self._rescan_above = self._cache_max_bytes  # estimate that triggers the next scan + eviction
        self._evicting = threading.Lock()
        # Label Studio's uploads from its media folder (LABELLOOP_LS_MEDIA_DIR): only with a Label Studio URL,
        # since only URLs on its origin are read locally.
        self._uploads = None
        if ls_media_dir and self._ls_origin is not None:
            self._uploads = LocalUploads(ls_media_dir, self._max_bytes, self._max_pixels,
                                         httpx.URL(self._ls_url).path)
        elif ls_media_dir:
            log.warning("%s is set but LABEL_STUDIO_URL is not: Label Studio's uploads cannot be recognized, "
                        "the setting is ignored", _MEDIA_DIR_HINT)
        # Cookies are refused: with connections pinned to IPs a jar could hand one host's cookie to
        # another. trust_env=False: a proxy would resolve names itself and undo the address checks.
        # Accept-Encoding identity: images are compressed already, and what a host sends compressed
        # anyway is inflated by us under the size cap (httpx would inflate a whole read at once).
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout), follow_redirects=False, trust_env=False,
            transport=_DeadlineTransport(),
            cookies=http.cookiejar.CookieJar(http.cookiejar.DefaultCookiePolicy(allowed_domains=[])),
            headers={"User-Agent": "labelloop-media", "Accept-Encoding": "identity"},
        )
        self._auth = LabelStudioAuth(self._ls_url, api_key, self._client)

    @classmethod
    def from_settings(cls, s=None) -> MediaFetcher:
        """Build from ``labelloop.config.settings()`` (read now, so tests can set the env first)."""
        if s is None:
            from labelloop.config import settings

            s = settings()
        return cls(label_studio_url=s.label_studio_url, api_key=s.label_studio_api_key,
                   allowed_hosts=s.allowed_hosts, cache_dir=s.cache_dir, timeout=s.fetch_timeout,
                   max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels, deadline=s.fetch_deadline,
                   cache_max_bytes=s.image_cache_bytes, ls_media_dir=getattr(s, "ls_media_dir", None))

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> MediaFetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------------- public API

    def fetch(self, url: str) -> Path:
        """Local path of the image at ``url`` (from the cache when present); raises MediaError."""
        try:
            return self._fetch(url)
        except MediaError as exc:
            # One WARNING per failure, refusals included (allow-list, scheme, internal address).
            log.warning("image not fetched: %s", exc.reason)
            raise

    def fetch_many(self, urls: list[str], workers: int = FETCH_WORKERS) -> list[Path | MediaError]:
        """``fetch`` for a batch, in parallel; same order as ``urls``, failures returned in place.

        Duplicate URLs are fetched once (a batch often repeats an image across tasks).
        """
        if not urls:
            return []
        with Prefetch(self._fetch_or_error, urls, workers, window=len(urls)) as ahead:
            return [ahead.result(i) for i in range(len(urls))]

    def fetch_ahead(self, urls: list[str], workers: int = FETCH_WORKERS, window: int = 32) -> Prefetch:
        """``fetch_many`` started in the background: ``result(i)`` waits for the i-th image only, and at
        most ``window`` images are fetched ahead of it. Use as a context manager."""
        return Prefetch(self._fetch_or_error, urls, workers, window)

    # ----------------------------------------------------------------------- flow

    def _fetch_or_error(self, url: str) -> Path | MediaError:
        try:
            return self.fetch(url)
        except MediaError as exc:
            return exc
        except Exception as exc:  # one bad item must not sink the batch
            log.exception("unexpected error fetching %s", _redact(url) if isinstance(url, str) else url)
            return MediaError(f"unexpected error: {type(exc).__name__}", kind="media")

    def _fetch(self, url: str) -> Path:
        absolute = self._absolute_url(url)
        _, how = self._admit(absolute)  # by name only: refuse early, before cache or DNS
        if self._uploads is not None and how == "ls":
            local = self._uploads.open(absolute)
            if local is not None:
                log.debug("read from Label Studio's media folder: %s", _redact(absolute))
                return local
        digest = hashlib.sha256(str(absolute).encode()).hexdigest()
        cached = self._cached(digest)
        if cached is not None:
            log.debug("media cache hit %s", _redact(absolute))
            return cached
        deadline = time.monotonic() + self._deadline
        _fetch_deadline.at = deadline  # read by every socket wait of this thread (_DeadlineStream)
        try:
            return self._download(absolute, digest, deadline)
        except httpx.TimeoutException as exc:
            if time.monotonic() >= deadline - 0.05:  # a wait cut short by the deadline, not a slow read
                raise self._past_deadline(absolute) from exc
            raise MediaError(f"timed out fetching {_redact(absolute)}", kind="timeout") from exc
        except httpx.HTTPError as exc:
            raise MediaError(f"error fetching {_redact(absolute)}: {type(exc).__name__}", kind="unreachable") from exc
        except OSError as exc:
            raise MediaError(f"cannot write the media cache: {exc.strerror or exc}", kind="media") from exc
        finally:
            _fetch_deadline.at = None

    def _past_deadline(self, url: httpx.URL) -> MediaError:
        return MediaError(f"fetch took longer than the {self._deadline:g}-s deadline "
                          f"(LABELLOOP_FETCH_DEADLINE_S) for {_redact(url)}", kind="timeout")

    def _absolute_url(self, url: str) -> httpx.URL:
        """Absolute http(s) URL for any URL kind found in task data; other schemes are refused."""
        if not isinstance(url, str) or not url.strip():
            raise MediaError("empty image URL", kind="bad_url")
        url = url.strip()
        scheme_match = _SCHEME_RE.match(url)
        if scheme_match is None:
            if not self._ls_url:
                what = "a cloud-storage image, presigned by Label Studio," if url.startswith("/tasks/") else \
                    f"relative URL {_redact(url)}"
                raise MediaError(f"{what} needs LABEL_STUDIO_URL", kind="bad_url")
            # Concatenated, not RFC-joined: Label Studio served under a path prefix keeps it, and
            # "//other-host/x" stays a path on the Label Studio host (as label-studio-sdk does).
            url = self._ls_url + ("" if url.startswith("/") else "/") + url
        else:
            scheme = scheme_match.group(0)[:-1].lower()
            if scheme in STORAGE_SCHEMES:
                raise MediaError(f"a {scheme}:// image is fetched through Label Studio's presign endpoint, with "
                                 "its task (task_image_url)", kind="not_allowed")
            if scheme not in _DEFAULT_PORTS:
                raise MediaError(f"URL scheme {scheme}: is not allowed (only http and https)", kind="not_allowed")
        try:
            return httpx.URL(url)
        except Exception as exc:  # httpx raises InvalidURL and sometimes ValueError/TypeError
            raise MediaError(f"invalid image URL {_redact(url)}", kind="bad_url") from exc

    # ----------------------------------------------------------------------- checks

    @staticmethod
    def _parse_ls_origin(ls_url: str) -> _Origin | None:
        if not ls_url:
            return None
        origin = _Origin.of(httpx.URL(ls_url))
        if origin.scheme not in _DEFAULT_PORTS or not origin.host:
            raise ValueError(f"LABEL_STUDIO_URL must be an http(s) URL, got {ls_url!r}")
        return origin

    def _admit(self, url: httpx.URL) -> tuple[_Origin, str]:
        """Allow-list check by name. Returns (origin, how it is allowed: "ls", "named", ...)."""
        if url.scheme.lower() not in _DEFAULT_PORTS:
            raise MediaError(f"URL scheme {url.scheme}: is not allowed (only http and https)", kind="not_allowed")
        origin = _Origin.of(url)
        if not origin.host:
            raise MediaError(f"image URL {_redact(url)} has no host", kind="bad_url")
        if origin == self._ls_origin:
            return origin, "ls"
        how = self._allow.match(origin)
        if how is None:
            raise MediaError(f"host {origin.netloc} is not allowed (add it to {_ALLOW_HINT})", kind="not_allowed")
        return origin, how

    def _target(self, url: httpx.URL) -> _Target:
        """Full check of one hop: allow-list, then DNS, then no internal address unless trusted."""
        origin, how = self._admit(url)
        addresses = self._resolve(origin)
        if how not in ("ls", "named"):
            for addr in addresses:
                if _is_internal(addr) and not self._allow.covers(addr):
                    raise MediaError(
                        f"host {origin.netloc} resolves to internal address {addr} (list the host by "
                        f"name, or the address range, in {_ALLOW_HINT} if that is intended)", kind="not_allowed")
        return _Target(url, origin, how == "ls", addresses)

    @staticmethod
    def _resolve(origin: _Origin) -> tuple[IPAddress, ...]:
        literal = _ip_or_none(origin.host)
        if literal is not None:
            return (literal,)
        try:
            infos = socket.getaddrinfo(origin.host, origin.port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError, OSError) as exc:
            raise MediaError(f"cannot resolve host {origin.host}", kind="unreachable") from exc
        found = [_ip_or_none(str(info[4][0]).split("%", 1)[0]) for info in infos]
        addresses = tuple(dict.fromkeys(a for a in found if a is not None))
        if not addresses:
            raise MediaError(f"cannot resolve host {origin.host}", kind="unreachable")
        return addresses

    # ----------------------------------------------------------------------- network

    def _download(self, url: httpx.URL, digest: str, deadline: float) -> Path:
        response = self._open(url)
        try:
            if not 200 <= response.status_code < 300:
                raise MediaError(self._status_reason(response.status_code, url), kind="http")
            shard = self._media_dir / digest[:2]
            tmp = self._stream_to_temp(response, url, shard, digest, deadline)
        finally:
            response.close()
        return self._commit(tmp, shard, digest, _ext_from_url(url))

    def _status_reason(self, status: int, url: httpx.URL) -> str:
        reason = f"HTTP {status} fetching {_redact(url)}"
        if status in (401, 403) and _Origin.of(url) == self._ls_origin:
            if not self._auth.has_key:
                reason += " (set LABEL_STUDIO_API_KEY)"
            elif not self._auth.is_pat:
                reason += (" (legacy tokens are off by default since Label Studio 1.23: use a personal"
                           " access token in LABEL_STUDIO_API_KEY)")
        return reason

    def _open(self, url: httpx.URL) -> httpx.Response:
        """GET with redirects followed by hand (each hop re-checked); returns the final response."""
        current = url
        for _ in range(MAX_REDIRECTS + 1):
            response = self._request(self._target(current))
            if response.status_code not in _REDIRECT_STATUSES:
                return response
            location = response.headers.get("location")
            response.close()
            if not location:
                raise MediaError(f"HTTP {response.status_code} without Location fetching {_redact(url)}", kind="http")
            try:
                current = current.join(location)
            except Exception as exc:  # a garbage Location header
                raise MediaError(f"bad redirect fetching {_redact(url)}", kind="http") from exc
        raise MediaError(f"too many redirects (more than {MAX_REDIRECTS}) fetching {_redact(url)}", kind="http")

    def _request(self, target: _Target) -> httpx.Response:
        """One hop; auth only for Label Studio; a 401 with a PAT refreshes the token and retries once."""
        if not target.is_label_studio:
            return self._send(target, {})
        try:
            response = self._auth.send(lambda headers: self._send(target, headers))
        except StudioAuthError as exc:  # this task's image cannot be fetched: its error, not the batch's
            raise MediaError(str(exc), kind="auth") from exc
        return response

    def _send(self, target: _Target, headers: dict[str, str]) -> httpx.Response:
        """Stream a GET connected to a checked address (trying the next one if a connect fails)."""
        last_error: httpx.ConnectError | None = None
        for addr in target.addresses:
            request = self._pinned_request(target, addr, headers)
            try:
                return self._client.send(request, stream=True)
            except httpx.ConnectError as exc:
                last_error = exc
        raise MediaError(f"cannot connect to {target.origin.netloc}: {last_error}", kind="unreachable")

    def _pinned_request(self, target: _Target, addr: IPAddress, headers: dict[str, str]) -> httpx.Request:
        """The request with the checked IP in the URL, the real name in Host and in TLS SNI.

        Pinning closes the gap between our DNS check and httpx's own lookup (DNS rebinding).
        """
        url, headers, extensions = target.url, dict(headers), {}
        if _ip_or_none(target.origin.host) is None:
            url = url.copy_with(host=str(addr))
            headers["Host"] = target.origin.netloc
            if target.origin.scheme == "https":
                extensions["sni_hostname"] = target.origin.host
        return self._client.build_request("GET", url, headers=headers, extensions=extensions)

    # ----------------------------------------------------------------------- cache

    def _cached(self, digest: str) -> Path | None:
        """The cached file, touched as just used (LRU), or None. A file this process has not decoded
        yet (cached by an older labelloop, or by another process) is checked once; a bad one is
        dropped so the caller fetches again and gets the reason."""
        shard = self._media_dir / digest[:2]
        for path in shard.glob(f"{digest}.*"):  # temp files start with "." and never match
            with _CACHE_LOCK:  # eviction re-checks the mtime under the same lock before unlinking
                try:
                    os.utime(path)
                except FileNotFoundError:
                    continue  # evicted (or replaced) just now, by another thread or process
            try:
                _check_image_once(path, self._max_pixels, _file_key(path, with_mtime=False))
            except MediaError as exc:
                log.warning("dropping cached %s: %s", path.name, exc.reason)
                path.unlink(missing_ok=True)
                continue
            except FileNotFoundError:
                continue
            return path
        return None

    def _stream_to_temp(self, response: httpx.Response, url: httpx.URL, shard: Path, digest: str,
                        deadline: float) -> Path:
        """Body -> temp file next to its final place, aborting past max_bytes of what is written.

        Read raw and inflated here (``_body_decoder``), so the cap counts decoded bytes as they are
        produced, 64 KB at a time, and the raw bytes too.
        """
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self._max_bytes:
            raise self._too_large()
        decoder = _body_decoder(response.headers.get("content-encoding", ""))
        shard.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{digest}.", suffix=".part", dir=shard)
        tmp = Path(name)
        try:
            received = written = 0
            with os.fdopen(fd, "wb") as out:

                def keep(pieces) -> None:
                    nonlocal written
                    for piece in pieces:
                        written += len(piece)
                        if written > self._max_bytes:
                            raise self._too_large(decoder.coding)
                        out.write(piece)

                for raw in response.iter_raw():
                    if time.monotonic() > deadline:
                        raise self._past_deadline(url)
                    received += len(raw)
                    if received > self._max_bytes:
                        raise self._too_large()
                    keep(decoder.feed(raw))
                keep(decoder.finish())
        except _BODY_DECODE_ERRORS as exc:
            tmp.unlink(missing_ok=True)
            raise MediaError(f"body is not valid {decoder.coding} data: {exc}", kind="http") from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def _too_large(self, coding: str = "") -> MediaError:
        reason = f"image larger than {self._max_bytes / 2**20:.3g} MB"
        return MediaError(reason + (f" after decoding Content-Encoding {coding}" if coding else ""), kind="too_large")

    def _commit(self, tmp: Path, shard: Path, digest: str, url_ext: str | None) -> Path:
        """Check the temp file decodes fully as an image, then move it into place atomically."""
        try:
            detected = _check_image(tmp, self._max_pixels)
            ext = url_ext or detected
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; other local workers may read the cache
            final = shard / f"{digest}{ext}"
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _remember_verified(_file_key(final, with_mtime=False))
        self._note_cached(final.stat().st_size)
        return final

    # ----------------------------------------------------------------------- cache size cap

    def _note_cached(self, size: int) -> None:
        """Count a committed file; evict when the running estimate passes the cap."""
        with _CACHE_LOCK:
            if self._cache_bytes is not None:
                self._cache_bytes += size
            over = self._cache_bytes is None or self._cache_bytes > self._rescan_above
        if over:  # first commit of this fetcher (unknown size: scan once) or over the cap
            self.evict_cache()

    def evict_cache(self) -> int:
        """Bring the image cache under its cap; returns the bytes it holds afterwards.

        Least recently used first (mtime: set at commit, touched on every hit; atime is often not
        kept). Never a file used in the last CACHE_EVICTION_GRACE seconds, so the cap can be
        exceeded while a working set larger than it is in use. One thread evicts at a time; the
        others go on (their files are counted at the next scan).
        """
        if not self._evicting.acquire(blocking=False):
            return self._cache_bytes or 0
        try:
            now = time.time()
            files, total = [], 0
            for path, st in self._cache_files():
                if path.name.startswith("."):  # a download in flight, or one left by a dead process
                    if now - st.st_mtime > _STALE_TEMP_AGE:
                        path.unlink(missing_ok=True)
                    continue
                files.append((st.st_mtime, st.st_size, path))
                total += st.st_size
            if total > self._cache_max_bytes:
                target = int(self._cache_max_bytes * _CACHE_LOW_WATER)
                for mtime, size, path in sorted(files, key=lambda f: f[0]):
                    if total <= target or now - mtime < CACHE_EVICTION_GRACE:
                        break  # sorted oldest first: every file after this one is more recent
                    if self._evict_if_unused(path, mtime):
                        total -= size
                log.info("media cache: %.1f MB after eviction (cap %.0f MB)", total / 2**20,
                         self._cache_max_bytes / 2**20)
            with _CACHE_LOCK:
                self._cache_bytes = total
                # When recent files alone exceed the cap, wait for another 10 % of it before the
                # next scan, instead of rescanning the whole cache on every commit.
                self._rescan_above = max(self._cache_max_bytes,
                                         total + int(self._cache_max_bytes * (1 - _CACHE_LOW_WATER)))
            return total
        finally:
            self._evicting.release()

    def _cache_files(self):
        """(path, stat) of every file in the cache's shards; files vanishing meanwhile are skipped."""
        try:
            shards = [e for e in os.scandir(self._media_dir) if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return
        for shard in shards:
            try:
                entries = list(os.scandir(shard.path))
            except FileNotFoundError:
                continue
            for entry in entries:
                try:
                    if entry.is_file(follow_symlinks=False):
                        yield Path(entry.path), entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue

    @staticmethod
    def _evict_if_unused(path: Path, seen_mtime: float) -> bool:
        """Unlink ``path`` unless it was touched since the scan (a hit is returning it right now)."""
        with _CACHE_LOCK:
            try:
                if path.stat().st_mtime != seen_mtime:
                    return False
                path.unlink()
            except FileNotFoundError:
                return False
        return True


def _positive(value, env_name: str, kind):
    """``value`` as ``kind`` if it is > 0; else a ValueError that names the setting."""
    try:
        number = kind(value)
    except (TypeError, ValueError):
        number = None
    if number is None or number <= 0:
        raise ValueError(f"{env_name} must be a positive number, got {value!r}")
    return number


class LocalFileFetcher:
    """``fetch_many`` for tasks whose image value is a local file path (demo, benchmarks, tests).

    Only for code we run ourselves on data we generated: the HTTP service never uses it, because a
    task's data is written by whoever imported it and must not reach the backend's filesystem.
    Each file gets the same checks as a downloaded image (pixel cap, full decode), once per process.
    """

    def __init__(self, max_pixels: int | None = None):
        if max_pixels is None:
            from labelloop.config import settings

            max_pixels = settings().max_image_pixels
        self._max_pixels = _positive(max_pixels, "LABELLOOP_MAX_IMAGE_PIXELS", int)

    def fetch_many(self, paths: list[str], workers: int = 0) -> list[Path | MediaError]:
        return [self._checked(p) for p in paths]

    def _checked(self, value) -> Path | MediaError:
        path = Path(value) if isinstance(value, str) and value else None
        if path is None or not path.is_file():
            return MediaError(f"no such file: {value}", kind="no_image")
        try:
            _check_image_once(path, self._max_pixels, _file_key(path))
        except MediaError as exc:
            return MediaError(f"{exc.reason}: {path}", kind="no_image")
        except OSError as exc:
            return MediaError(f"cannot read {path}: {exc.strerror or exc}", kind="no_image")
        return path
