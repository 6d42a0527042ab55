"""How labelloop authenticates to Label Studio: one strategy for the API client and the media fetcher.

Label Studio 1.23 takes a legacy token (``Authorization: Token <key>``) or a personal access token
(a JWT refresh token) that is exchanged for short-lived access tokens (``Authorization: Bearer``).
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Callable

import httpx

from labelloop.errors import LabelloopError

log = logging.getLogger(__name__)

ACCESS_TOKEN_LIFETIME = 300.0  # seconds; Label Studio 1.23's access tokens, used when no `exp` claim
REFRESH_MARGIN = 30.0  # refresh this long before expiry so a token never dies in flight


class StudioAuthError(LabelloopError):
    """Label Studio refused the key, or the token refresh could not be done."""

    kind, http_status = "auth", 502



class LabelStudioAuth:
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

    def send(self, send: Callable[[dict[str, str]], httpx.Response]) -> httpx.Response:
        """``send(headers)`` with this key's Authorization; a 401 on a personal access token drops the
        access token and sends once more with a fresh one (it may have expired in flight)."""
        headers = self.headers()
        response = send(headers)
        if response.status_code == 401 and self.is_pat:
            response.close()
            self.invalidate(headers)
            response = send(self.headers())
        return response

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
            raise StudioAuthError(f"cannot refresh the Label Studio access token: {type(exc).__name__}") from exc
        if response.status_code != 200:
            raise StudioAuthError(f"Label Studio refused the personal access token (HTTP {response.status_code} "
                                  "from /api/token/refresh/); check LABEL_STUDIO_API_KEY")
        try:
            access = response.json()["access"]
        except (ValueError, KeyError, TypeError):
            access = None
        if not isinstance(access, str) or not access:
            raise StudioAuthError("Label Studio's /api/token/refresh/ answered without an access token")
        exp = _jwt_expiry(access)
        lifetime = ACCESS_TOKEN_LIFETIME if exp is None else max(exp - time.time(), 0.0)
        return access, lifetime


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
