"""Fetch task images for the ML backend: Label Studio auth, an allow-list (no SSRF), an on-disk cache.

Why this exists: task data holds image URLs that *someone else* wrote (any annotator can import
tasks), and the backend fetches them from inside the network, often with a Label Studio token.
So every fetch is treated as hostile input:

* only http(s); only the Label Studio host or hosts listed in ``LABELLOOP_ALLOWED_HOSTS``;
* a listed host that resolves to an internal address (DNS rebinding, 169.254.169.254 cloud
  metadata) is refused unless the operator named it explicitly, and the connection is pinned to
  the address that was checked, so a second DNS answer cannot swap it;
* redirects are followed by hand, each hop checked again; the token is sent to the Label Studio
  host only, never to another host;
* bodies are streamed with a size cap and must decode as an image before they enter the cache.

Label Studio 1.23 turns legacy tokens off by default; the default personal access token (PAT)
is a JWT *refresh* token that must be exchanged for 300-s access tokens (see
shared/notes/label-studio-protocol.md, "Auth"). Both kinds work here.
"""

from __future__ import annotations

import base64
import hashlib
import http.cookiejar
import ipaddress
import json
import logging
import os
import re
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

import httpx
from PIL import Image

log = logging.getLogger(__name__)

MAX_REDIRECTS = 3
ACCESS_TOKEN_LIFETIME = 300.0  # seconds; Label Studio 1.23's access tokens, used when no `exp` claim
REFRESH_MARGIN = 30.0  # refresh this long before expiry so a token never dies in flight

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
_PIL_EXTS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "GIF": ".gif", "BMP": ".bmp",
             "WEBP": ".webp", "TIFF": ".tif"}
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_SECRET_PARAM_RE = re.compile(r"sig|token|key|secret|pass|credential|auth|session|x-amz-|x-goog-", re.I)
_CHUNK = 64 * 1024
_ALLOW_HINT = "LABELLOOP_ALLOWED_HOSTS"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class MediaError(Exception):
    """A task image could not be fetched; ``reason`` is short enough to show a labeler or log."""

    def __init__(self, reason: str):
        super().__init__(reason)
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
    except Exception:  # noqa: BLE001 - a message helper must never raise
        return "<invalid URL>"
    params = [(k, "***" if _SECRET_PARAM_RE.search(k) else v) for k, v in u.params.multi_items()]
    query = urlencode(params, safe="/*").encode() if params else b""
    return str(u.copy_with(userinfo=b"", fragment=None, query=query or None))


def _jwt_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT (unix seconds), read without verifying; None if not readable.

    Only used to schedule a refresh; the server is the one that checks signatures.
    """
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        exp = claims.get("exp")
        return float(exp) if isinstance(exp, (int, float)) else None
    except (IndexError, ValueError, TypeError, AttributeError):
        return None


def _ext_from_url(url: httpx.URL) -> str | None:
    """An image extension from the path, or from ``?d=`` of a /data/local-files/ URL."""
    for candidate in (url.path, url.params.get("d") or ""):
        ext = os.path.splitext(candidate)[1].lower()
        if ext in _IMAGE_EXTS:
            return ext
    return None


# --------------------------------------------------------------------------- origins and allow-list


@dataclass(frozen=True)
class _Origin:
    """scheme + host + effective port: what decides both "is this Label Studio" and the allow-list."""

    scheme: str
    host: str
    port: int

    @classmethod
    def of(cls, url: httpx.URL) -> "_Origin":
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
    def parse(cls, entries) -> "_AllowList":
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
        except Exception:  # noqa: BLE001 - malformed entry, reported by the caller
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


# --------------------------------------------------------------------------- Label Studio auth


class _LabelStudioAuth:
    """The Authorization header for requests to the Label Studio host.

    A legacy token is sent as ``Token <key>``. A personal access token (JWT refresh token, starts
    with "eyJ") is exchanged at ``/api/token/refresh/`` for an access token sent as ``Bearer``;
    it is cached until ~30 s before it expires, and dropped after a 401 so the next call refreshes.
    One lock serialises refreshes so a burst of threads costs one refresh call.

    label-studio-sdk 2.1.2 has this machinery (``tokens.client_ext.TokensClientExt``) but it is not
    usable here: it decides PAT-vs-legacy by decoding the key as a JWT with an ``exp`` claim
    (raising otherwise), refreshes only once the access token has already expired, never
    retries on 401, needs a whole SDK client wrapper, and drops a path prefix of the LS URL.
    """

    def __init__(self, label_studio_url: str, api_key: str, client: httpx.Client):
        self._refresh_url = f"{label_studio_url}/api/token/refresh/"
        self._key = (api_key or "").strip()
        self._client = client
        self._lock = threading.Lock()
        self._access: str | None = None
        self._refresh_at = 0.0  # time.monotonic() after which the cached access token is replaced

    @property
    def has_key(self) -> bool:
        return bool(self._key)

    @property
    def is_pat(self) -> bool:
        return self._key.startswith("eyJ")

    def headers(self) -> dict[str, str]:
        if not self._key:
            return {}
        if not self.is_pat:
            return {"Authorization": f"Token {self._key}"}
        return {"Authorization": f"Bearer {self._access_token()}"}

    def invalidate(self, sent: dict[str, str]) -> None:
        """Forget the access token that just got a 401 (unless another thread already replaced it)."""
        with self._lock:
            if self._access is not None and sent.get("Authorization") == f"Bearer {self._access}":
                self._access = None

    def _access_token(self) -> str:
        with self._lock:
            if self._access is None or time.monotonic() >= self._refresh_at:
                self._access, lifetime = self._refresh()
                self._refresh_at = time.monotonic() + max(lifetime - REFRESH_MARGIN, lifetime / 2)
            return self._access

    def _refresh(self) -> tuple[str, float]:
        """POST the PAT, return (access token, seconds it lives)."""
        log.info("refreshing the Label Studio access token")
        try:
            response = self._client.post(self._refresh_url, json={"refresh": self._key})
        except httpx.HTTPError as exc:
            raise MediaError(f"cannot refresh the Label Studio access token: {type(exc).__name__}") from exc
        if response.status_code != 200:
            raise MediaError(f"Label Studio refused the personal access token (HTTP {response.status_code} "
                             "from /api/token/refresh/); check LABEL_STUDIO_API_KEY")
        try:
            access = response.json()["access"]
        except (ValueError, KeyError, TypeError):
            access = None
        if not isinstance(access, str) or not access:
            raise MediaError("Label Studio's /api/token/refresh/ answered without an access token")
        exp = _jwt_expiry(access)
        lifetime = ACCESS_TOKEN_LIFETIME if exp is None else max(exp - time.time(), 0.0)
        return access, lifetime


# --------------------------------------------------------------------------- the fetcher


class MediaFetcher:
    """Turns task image URLs into local file paths, safely. Thread-safe; one per process is enough."""

    def __init__(self, label_studio_url: str = "", api_key: str = "", allowed_hosts=(), cache_dir=None,
                 timeout: float = 10.0, max_bytes: int = 50 * 2**20):
        self._ls_url = (label_studio_url or "").strip().rstrip("/")
        self._ls_origin = self._parse_ls_origin(self._ls_url)
        self._allow = _AllowList.parse(allowed_hosts)
        if cache_dir is None:
            from labelloop.config import settings

            cache_dir = settings().cache_dir
        self._media_dir = Path(cache_dir) / "media"
        self._max_bytes = int(max_bytes)
        # Cookies are refused: with connections pinned to IPs a jar could hand one host's cookie to
        # another. trust_env=False: a proxy would resolve names itself and undo the address checks.
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout), follow_redirects=False, trust_env=False,
            cookies=http.cookiejar.CookieJar(http.cookiejar.DefaultCookiePolicy(allowed_domains=[])),
            headers={"User-Agent": "labelloop-media"},
        )
        self._auth = _LabelStudioAuth(self._ls_url, api_key, self._client)

    @classmethod
    def from_settings(cls, s=None) -> "MediaFetcher":
        """Build from ``labelloop.config.settings()`` (read now, so tests can set the env first)."""
        if s is None:
            from labelloop.config import settings

            s = settings()
        return cls(label_studio_url=s.label_studio_url, api_key=s.label_studio_api_key,
                   allowed_hosts=s.allowed_hosts, cache_dir=s.cache_dir, timeout=s.fetch_timeout,
                   max_bytes=s.max_image_bytes)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "MediaFetcher":
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

    def fetch_many(self, urls: list[str], workers: int = 8) -> list[Path | MediaError]:
        """``fetch`` for a batch, in parallel; same order as ``urls``, failures returned in place.

        Duplicate URLs are fetched once (a batch often repeats an image across tasks).
        """
        unique = list(dict.fromkeys(urls))
        if not unique:
            return []
        with ThreadPoolExecutor(max_workers=max(1, min(int(workers), len(unique))),
                                thread_name_prefix="labelloop-media") as pool:
            futures = {u: pool.submit(self._fetch_or_error, u) for u in unique}
        return [futures[u].result() for u in urls]

    # ----------------------------------------------------------------------- flow

    def _fetch_or_error(self, url: str) -> Path | MediaError:
        try:
            return self.fetch(url)
        except MediaError as exc:
            return exc
        except Exception as exc:  # noqa: BLE001 - one bad item must not sink the batch
            log.exception("unexpected error fetching %s", _redact(url) if isinstance(url, str) else url)
            return MediaError(f"unexpected error: {type(exc).__name__}")

    def _fetch(self, url: str) -> Path:
        absolute = self._absolute_url(url)
        self._admit(absolute)  # by name only: refuse early, before cache or DNS
        digest = hashlib.sha256(str(absolute).encode()).hexdigest()
        cached = self._cached(digest)
        if cached is not None:
            log.debug("media cache hit %s", _redact(absolute))
            return cached
        try:
            return self._download(absolute, digest)
        except httpx.TimeoutException as exc:
            raise MediaError(f"timed out fetching {_redact(absolute)}") from exc
        except httpx.HTTPError as exc:
            raise MediaError(f"error fetching {_redact(absolute)}: {type(exc).__name__}") from exc
        except OSError as exc:
            raise MediaError(f"cannot write the media cache: {exc.strerror or exc}") from exc

    def _absolute_url(self, url: str) -> httpx.URL:
        """Absolute http(s) URL for any URL kind found in task data; other schemes are refused."""
        if not isinstance(url, str) or not url.strip():
            raise MediaError("empty image URL")
        url = url.strip()
        scheme_match = _SCHEME_RE.match(url)
        if scheme_match is None:
            if not self._ls_url:
                raise MediaError(f"relative URL {_redact(url)} needs LABEL_STUDIO_URL")
            # Concatenated, not RFC-joined: Label Studio served under a path prefix keeps it, and
            # "//other-host/x" stays a path on the Label Studio host (as label-studio-sdk does).
            url = self._ls_url + ("" if url.startswith("/") else "/") + url
        else:
            scheme = scheme_match.group(0)[:-1].lower()
            if scheme not in _DEFAULT_PORTS:
                raise MediaError(f"URL scheme {scheme}: is not allowed (only http and https)")
        try:
            return httpx.URL(url)
        except Exception as exc:  # httpx raises InvalidURL and sometimes ValueError/TypeError
            raise MediaError(f"invalid image URL {_redact(url)}") from exc

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
            raise MediaError(f"URL scheme {url.scheme}: is not allowed (only http and https)")
        origin = _Origin.of(url)
        if not origin.host:
            raise MediaError(f"image URL {_redact(url)} has no host")
        if origin == self._ls_origin:
            return origin, "ls"
        how = self._allow.match(origin)
        if how is None:
            raise MediaError(f"host {origin.netloc} is not allowed (add it to {_ALLOW_HINT})")
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
                        f"name, or the address range, in {_ALLOW_HINT} if that is intended)")
        return _Target(url, origin, how == "ls", addresses)

    @staticmethod
    def _resolve(origin: _Origin) -> tuple[IPAddress, ...]:
        literal = _ip_or_none(origin.host)
        if literal is not None:
            return (literal,)
        try:
            infos = socket.getaddrinfo(origin.host, origin.port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError, OSError) as exc:
            raise MediaError(f"cannot resolve host {origin.host}") from exc
        found = [_ip_or_none(str(info[4][0]).split("%", 1)[0]) for info in infos]
        addresses = tuple(dict.fromkeys(a for a in found if a is not None))
        if not addresses:
            raise MediaError(f"cannot resolve host {origin.host}")
        return addresses

    # ----------------------------------------------------------------------- network

    def _download(self, url: httpx.URL, digest: str) -> Path:
        response = self._open(url)
        try:
            if not 200 <= response.status_code < 300:
                raise MediaError(self._status_reason(response.status_code, url))
            shard = self._media_dir / digest[:2]
            tmp = self._stream_to_temp(response, shard, digest)
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
                raise MediaError(f"HTTP {response.status_code} without Location fetching {_redact(url)}")
            try:
                current = current.join(location)
            except Exception as exc:  # noqa: BLE001 - a garbage Location header
                raise MediaError(f"bad redirect fetching {_redact(url)}") from exc
        raise MediaError(f"too many redirects (more than {MAX_REDIRECTS}) fetching {_redact(url)}")

    def _request(self, target: _Target) -> httpx.Response:
        """One hop; auth only for Label Studio; a 401 with a PAT refreshes the token and retries once."""
        headers = self._auth.headers() if target.is_label_studio else {}
        response = self._send(target, headers)
        if response.status_code == 401 and target.is_label_studio and self._auth.is_pat:
            response.close()
            self._auth.invalidate(headers)
            response = self._send(target, self._auth.headers())
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
        raise MediaError(f"cannot connect to {target.origin.netloc}: {last_error}")

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
        shard = self._media_dir / digest[:2]
        for path in shard.glob(f"{digest}.*"):  # temp files start with "." and never match
            if path.is_file():
                return path
        return None

    def _stream_to_temp(self, response: httpx.Response, shard: Path, digest: str) -> Path:
        """Body -> temp file next to its final place, aborting past max_bytes (decoded bytes)."""
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self._max_bytes:
            raise self._too_large()
        shard.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{digest}.", suffix=".part", dir=shard)
        tmp = Path(name)
        try:
            total = 0
            with os.fdopen(fd, "wb") as out:
                for chunk in response.iter_bytes(_CHUNK):
                    total += len(chunk)
                    if total > self._max_bytes:
                        raise self._too_large()
                    out.write(chunk)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def _too_large(self) -> MediaError:
        return MediaError(f"image larger than {self._max_bytes / 2**20:.3g} MB")

    def _commit(self, tmp: Path, shard: Path, digest: str, url_ext: str | None) -> Path:
        """Verify the temp file is an image, then move it into place atomically."""
        try:
            detected = _image_ext(tmp)
            ext = url_ext or detected
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; other local workers may read the cache
            final = shard / f"{digest}{ext}"
            os.replace(tmp, final)
            return final
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def _image_ext(path: Path) -> str:
    """Extension for the detected image format; MediaError if PIL cannot make sense of the file."""
    try:
        with Image.open(path) as image:
            fmt = image.format or ""
            image.verify()
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad input
        raise MediaError("not a decodable image") from exc
    return _PIL_EXTS.get(fmt, "." + fmt.lower() if fmt else ".img")


class LocalFileFetcher:
    """``fetch_many`` for tasks whose image value is a local file path (demo, benchmarks, tests).

    Only for code we run ourselves on data we generated: the HTTP service never uses it, because a
    task's data is written by whoever imported it and must not reach the backend's filesystem.
    """

    def fetch_many(self, paths: list[str], workers: int = 0) -> list[Path | MediaError]:
        return [Path(p) if p and Path(p).is_file() else MediaError(f"no such file: {p}") for p in paths]
