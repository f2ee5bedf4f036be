"""Pure-ASGI front door: request ids, body size limit (413 before reading it whole), API-key auth.

Pure ASGI rather than BaseHTTPMiddleware: it adds no task per request and does not buffer streaming responses.
"""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid
from typing import Any, Awaitable, Callable

import orjson

from .errors import BodyTooLarge, error_body

ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]

OPEN_PATHS = {"/health", "/ready", "/docs", "/openapi.json"}


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class FrontDoor:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int, api_key_hashes: list[str], protect_metrics: bool):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.key_hashes = set(api_key_hashes)
        self.protect_metrics = protect_metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        arrived = time.monotonic()  # deadlines count from here, not from when the handler starts
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        request_id = _clean_request_id(headers.get("x-request-id")) or f"req-{uuid.uuid4().hex}"
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["arrived"] = arrived
        state["headers"] = headers  # lower-cased once here; the routes reuse it

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + [(b"x-request-id", request_id.encode())]
            await send(message)

        tenant = self._authenticate(scope["path"], headers)
        if tenant is None:
            await _reply(send_with_id, 401, "Incorrect API key provided", "authentication_error", "invalid_api_key",
                         extra_headers=[(b"www-authenticate", b"Bearer")])
            return
        state["tenant"] = tenant[0]
        state["key_hash"] = tenant[1]
        # Probes stay open, but what they reveal beyond up/down is for holders of a key (or when there are none).
        state["privileged"] = not self.key_hashes or bool(tenant[1] or self._valid_key(headers))

        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await _reply(send_with_id, 413, f"Request body exceeds {self.max_body_bytes} bytes",
                         "invalid_request_error", "request_too_large")
            return
        if declared is None and scope["method"] in ("POST", "PUT", "PATCH"):
            # Chunked body: read it here, at most up to the limit, so an oversized one is a clean 413.
            body = await self._read_bounded(receive)
            if body is None:
                await _reply(send_with_id, 413, f"Request body exceeds {self.max_body_bytes} bytes",
                             "invalid_request_error", "request_too_large")
                return
            await self.app(scope, _replay(body, receive), send_with_id)
            return
        await self.app(scope, self._limited(receive), send_with_id)

    async def _read_bounded(self, receive: Callable) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _authenticate(self, path: str, headers: dict[str, str]) -> tuple[str, str] | None:
        """Returns (tenant, key digest) -- ("anonymous", "") without keys; None when the key is missing or wrong."""
        if not self.key_hashes:
            return ("anonymous", "")
        if path in OPEN_PATHS or (path == "/metrics" and not self.protect_metrics):
            return ("anonymous", "")
        digest = self._valid_key(headers)
        return (digest[:16], digest) if digest else None

    def _valid_key(self, headers: dict[str, str]) -> str:
        """The digest of a valid bearer key, or ''."""
        auth = headers.get("authorization", "")
        if not auth.lower().startswith("bearer "):
            return ""
        digest = hash_key(auth[7:].strip())
        # Constant-time comparison against each stored digest.
        return digest if any(hmac.compare_digest(digest, h) for h in self.key_hashes) else ""

    def _limited(self, receive: Callable) -> Callable:
        seen = 0
        limit = self.max_body_bytes

        async def guarded() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge()
            return message

        return guarded


def _replay(body: bytes, receive: Callable) -> Callable:
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later calls wait for the disconnect, as the server's receive does

    return replay


def _clean_request_id(value: str | None) -> str | None:
    if not value:
        return None
    value = value.strip()
    if 0 < len(value) <= 128 and all(c.isalnum() or c in "-_.:" for c in value):
        return value
    return None


async def _reply(send: Callable, status: int, message: str, type_: str, code: str,
                 extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = orjson.dumps(error_body(message, type_, None, code))
    headers: list[Any] = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra_headers or [])})
    await send({"type": "http.response.body", "body": body})
