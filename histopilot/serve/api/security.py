"""Bearer tokens, per-client rate limits and request-size limits.

Tokens come from ``[server.tokens]`` (user name → token). Without tokens the server only
binds to loopback (the CLI refuses anything else) and every request belongs to the user
``local``. Request bodies are counted as they arrive, so a client that lies about its
``Content-Length`` or streams without one is cut off at the limit, never buffered whole.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import threading
import time
from dataclasses import dataclass, field

from pydantic import SecretStr
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LOCAL_USER = "local"


class AuthError(Exception):
    """No token, or a token the server does not know."""


class RateLimitedError(Exception):
    def __init__(self, retry_after: float) -> None:
        super().__init__(f"too many requests; retry in {retry_after:.1f} s")
        self.retry_after = retry_after


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Authenticator:
    tokens: dict[str, SecretStr]

    @property
    def enabled(self) -> bool:
        return bool(self.tokens)

    def user(self, authorization: str | None) -> str:
        """The user a request's ``Authorization`` header names, compared in constant time."""
        if not self.enabled:
            return LOCAL_USER
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented:
            raise AuthError("this server needs a bearer token: 'Authorization: Bearer <token>'.")
        found = None
        for user, token in self.tokens.items():
            if hmac.compare_digest(presented.encode(), token.get_secret_value().encode()):
                found = user
        if found is None:
            raise AuthError("the bearer token is not one this server knows.")
        return found


@dataclass
class RateLimiter:
    """A token bucket per client: ``per_minute`` requests, refilled continuously."""

    per_minute: int
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def check(self, client: str) -> None:
        now = time.monotonic()
        rate = self.per_minute / 60.0
        with self._lock:
            tokens, last = self._buckets.get(client, (float(self.per_minute), now))
            tokens = min(float(self.per_minute), tokens + (now - last) * rate)
            if tokens < 1.0:
                self._buckets[client] = (tokens, now)
                raise RateLimitedError((1.0 - tokens) / rate)
            self._buckets[client] = (tokens - 1.0, now)
            if len(self._buckets) > 10_000:  # forget idle clients
                self._buckets = {
                    key: value for key, value in self._buckets.items() if now - value[1] < 120
                }


class BodyLimit:
    """ASGI middleware: refuse bodies over ``limit`` bytes (``upload_limit`` for uploads)."""

    def __init__(self, app: ASGIApp, *, limit: int, upload_limit: int, upload_path: str) -> None:
        self.app = app
        self.limit = limit
        self.upload_limit = upload_limit
        self.upload_path = upload_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        is_upload = scope["method"] == "POST" and scope["path"].rstrip("/") == self.upload_path
        limit = self.upload_limit if is_upload else self.limit
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await _too_large(send, limit)
            return
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # An HTTPException passes through FastAPI's body parsing untouched.
                    raise HTTPException(413, _too_large_message(limit))
            return message

        await self.app(scope, counted_receive, send)


def _too_large_message(limit: int) -> str:
    return f"request body larger than this server accepts ({limit:,} bytes)."


async def _too_large(send: Send, limit: int) -> None:
    body = json.dumps(
        {
            "error": {
                "message": _too_large_message(limit),
                "type": "request_too_large",
                "code": 413,
            }
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
