"""What keeps the service safe and bounded: the body-size limit (also for chunked bodies), basic auth
and the webhook secret compared in constant time, per-project token buckets, and the refusal to listen
on a public address without authentication."""

from __future__ import annotations

import base64
import ipaddress
import json
import secrets
import time

from fastapi import Request

from labelloop.config import Settings
from labelloop.labelstudio.client import WEBHOOK_SECRET_HEADER  # installed on the project's webhook by labelloop


class LimitBodyMiddleware:
    """Refuse bodies over the limit with 413, also when no Content-Length is sent (chunked).

    ``path_limits`` maps a path to its own (lower) limit and the variable that sets it: a webhook is a
    hint of a few KB, a /predict may carry hundreds of tasks.
    """

    def __init__(self, app, max_bytes: int, path_limits: dict[str, tuple[int, str]] | None = None):
        self.app, self.max_bytes, self.path_limits = app, max_bytes, path_limits or {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit, variable = self.path_limits.get(scope.get("path", ""), (self.max_bytes, "LABELLOOP_MAX_BODY_MB"))
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _send_413(send, limit, variable)
        seen, exceeded = 0, False

        async def limited_receive():
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    exceeded = True  # the app sees a disconnect; the client gets our 413
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if not exceeded:
                await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded:
            await _send_413(send, limit, variable)


async def _send_413(send, max_bytes: int, variable: str = "LABELLOOP_MAX_BODY_MB") -> None:
    size = f"{max_bytes / (1024 * 1024):g} MB" if max_bytes >= 1024 * 1024 else f"{max_bytes / 1024:g} KB"
    body = json.dumps({"error": f"request body larger than {size} ({variable})"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


# -- request validation -----------------------------------------------------------------------------

class TokenBuckets:
    """One token bucket per key, in memory: ``take(key)`` is 0.0 when a token was taken, else the
    seconds until the next one. Only called on the event loop (no lock) and only for known projects,
    so the dict stays as small as the set of projects."""

    def __init__(self, capacity: int, rate: float, clock=time.monotonic):
        self.capacity, self.rate, self.clock = float(capacity), float(rate), clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: str) -> float:
        now = self.clock()
        tokens, at = self._buckets.get(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - at) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate if self.rate > 0 else 3600.0


# -- the app ----------------------------------------------------------------------------------------

def matches(given: bytes, configured: str) -> bool:
    """Constant-time comparison of raw bytes with a configured credential.

    Bytes, not str: compare_digest raises TypeError on non-ASCII str (a 500 for any client sending
    one). UTF-8 is what browsers and httpx send; latin-1 what requests' HTTPBasicAuth (Label Studio)
    sends for characters it can encode.
    """
    ok = secrets.compare_digest(given, configured.encode("utf-8"))
    try:
        latin = configured.encode("latin-1")
    except UnicodeEncodeError:
        return ok
    return ok | secrets.compare_digest(given, latin)


def authorized(request: Request, env: Settings) -> bool:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        raw = base64.b64decode(token.strip(), validate=True)
    except ValueError:  # binascii.Error, and non-ASCII characters in the header
        return False
    user, colon, password = raw.partition(b":")
    return bool(colon) & matches(user, env.basic_auth_user) & matches(password, env.basic_auth_pass)


def secret_ok(request: Request, env: Settings) -> bool:
    # Starlette decodes header bytes as latin-1: encoding back gives the bytes that were sent.
    given = request.headers.get(WEBHOOK_SECRET_HEADER, "").encode("latin-1")
    return bool(given) and matches(given, env.webhook_secret)


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything, so it is not loopback
        return False


def bind_refusal(host: str, env: Settings) -> str | None:
    """Why ``labelloop serve`` must not listen on ``host`` with these settings (one line), or None."""
    if bool(env.basic_auth_user) != bool(env.basic_auth_pass):
        return "BASIC_AUTH_USER and BASIC_AUTH_PASS must be set together: one of them is empty"
    if env.basic_auth_user or env.insecure or is_loopback(host):
        return None
    return (f"refusing to listen on {host} without authentication: set BASIC_AUTH_USER and BASIC_AUTH_PASS "
            "(and the same in Label Studio's model connection), or listen on loopback (--host 127.0.0.1), "
            "or set LABELLOOP_INSECURE=true to serve without authentication on purpose")
