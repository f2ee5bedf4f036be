"""A pool of vLLM OpenAI servers serving one model, reached through one shared aiohttp session.

aiohttp rather than httpx for the upstream hop: profiled under 32 concurrent pass-through requests (py-spy, see the
README's benchmarks), httpx/httpcore took 68% of the gateway's busy CPU, most of it scanning every pooled connection
on every request (`has_expired` -> `is_socket_readable` through anyio's attribute lookups).

The pool knows which endpoints answer `/health`, picks the least-loaded healthy one per call and turns transport
failures into `WorkerUnavailable`, which the API maps to 503 + Retry-After. It knows nothing about strategies.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import aiohttp
import orjson

log = logging.getLogger("ttc.workers")

_JSON = {"content-type": "application/json"}
# What a broken or unreachable worker raises (connection refused/reset, server gone, read timeout).
TRANSPORT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)
# What a pooled keep-alive connection that the worker had already closed raises: the request never reached the
# worker, so sending it once more on a fresh connection is safe. (A refused connect is not among them.)
STALE_CONNECTION_ERRORS = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)
KEEPALIVE_S = 3.0
# Consecutive timed-out health probes after which a worker counts as down.
SLOW_PROBES_DOWN = 3


class WorkerUnavailable(Exception):
    """No healthy worker could take the call (down, restarting, or the connection broke mid-call)."""

    def __init__(self, pool: str, detail: str):
        super().__init__(f"{pool} workers unavailable: {detail}")
        self.pool = pool
        self.detail = detail


class WorkerError(Exception):
    """A worker answered with an error status (the request, not the worker, is at fault for 4xx)."""

    def __init__(self, pool: str, status: int, body: Any):
        super().__init__(f"{pool} worker returned {status}: {body}")
        self.pool = pool
        self.status = status
        self.body = body

    @property
    def message(self) -> str:
        if isinstance(self.body, dict):
            err = self.body.get("error", self.body)
            if isinstance(err, dict):
                return str(err.get("message", err))
            return str(err)
        return str(self.body)


@dataclass
class Endpoint:
    url: str
    healthy: bool = False
    inflight: int = 0
    last_error: str = ""
    checked_at: float = 0.0
    # Set by the supervisor for co-located workers: lets /ready report the process and tests kill it.
    pid: int | None = None
    restarts: int = 0
    slow_probes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"url": self.url, "healthy": self.healthy, "inflight": self.inflight, "pid": self.pid,
                "restarts": self.restarts, "last_error": self.last_error}


@dataclass
class WorkerPool:
    name: str
    served_name: str
    endpoints: list[Endpoint]
    connect_timeout_s: float = 2.0
    request_timeout_s: float = 600.0
    # A /health probe may take this long beyond the connect timeout before it counts as slow.
    probe_slack_s: float = 1.0
    metrics: Any = None  # service.metrics.Metrics; optional so the pool stays usable on its own
    _session: aiohttp.ClientSession | None = field(default=None, init=False, repr=False)

    @property
    def session(self) -> aiohttp.ClientSession:
        """Created on first use, inside the running event loop (aiohttp binds a session to its loop)."""
        if self._session is None or self._session.closed:
            # Per-read (not total) timeout: a long stream is fine as long as tokens keep coming.
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout_s,
                                            sock_read=self.request_timeout_s)
            # Idle connections are dropped before the worker drops them (uvicorn, which vLLM runs on, closes idle
            # keep-alive connections after 5 s): a request written into a connection the worker just closed fails
            # with "Can not write request body".
            connector = aiohttp.TCPConnector(limit=256, keepalive_timeout=KEEPALIVE_S, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(timeout=timeout, connector=connector, json_serialize=None)
        return self._session

    @classmethod
    def from_urls(cls, name: str, served_name: str, urls: list[str], **kw: Any) -> "WorkerPool":
        return cls(name=name, served_name=served_name, endpoints=[Endpoint(u.rstrip("/")) for u in urls], **kw)

    @property
    def ready(self) -> bool:
        return any(e.healthy for e in self.endpoints)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _pick(self) -> Endpoint:
        healthy = [e for e in self.endpoints if e.healthy]
        if not healthy:
            reasons = "; ".join(f"{e.url}: {e.last_error or 'not healthy'}" for e in self.endpoints)
            raise WorkerUnavailable(self.name, reasons or "no endpoints configured")
        return min(healthy, key=lambda e: e.inflight)

    def _mark_down(self, ep: Endpoint, exc: Exception) -> None:
        ep.healthy = False
        ep.last_error = f"{type(exc).__name__}: {exc}"[:300]
        log.warning("%s worker %s marked down: %s", self.name, ep.url, ep.last_error)

    @asynccontextmanager
    async def _track(self, ep: Endpoint) -> AsyncIterator[None]:
        ep.inflight += 1
        gauge = self.metrics.inflight_gauge(self.name) if self.metrics else None
        if gauge:
            gauge.inc()
        try:
            yield
        finally:
            ep.inflight -= 1
            if gauge:
                gauge.dec()

    def _outcome(self, outcome: str, error_kind: str | None = None) -> None:
        if self.metrics:
            self.metrics.upstream_result(self.name, outcome)
            if error_kind:
                self.metrics.upstream_error(self.name, error_kind)

    async def post_json(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        data = orjson.dumps(payload)
        for attempt in (1, 2):
            ep = self._pick()
            async with self._track(ep):
                try:
                    async with self.session.post(ep.url + path, data=data, headers=_JSON) as resp:
                        status, content = resp.status, await resp.read()
                    break
                except TRANSPORT_ERRORS as exc:
                    if attempt == 1 and _stale_connection(exc):
                        log.info("%s worker %s: stale pooled connection (%s); sending once more", self.name,
                                 ep.url, exc)
                        continue
                    self._mark_down(ep, exc)
                    self._outcome("unavailable", type(exc).__name__)
                    raise WorkerUnavailable(self.name, str(exc) or type(exc).__name__) from exc
        return self._decode(status, content)

    def _decode(self, status: int, content: bytes) -> dict[str, Any]:
        try:
            body = orjson.loads(content)
        except orjson.JSONDecodeError:
            body = content[:500].decode("utf-8", "replace")
        if status >= 400:
            self._outcome("error", f"http_{status // 100}xx")
            raise WorkerError(self.name, status, body)
        self._outcome("ok")
        return body

    @asynccontextmanager
    async def stream(self, path: str, payload: dict[str, Any]) -> AsyncIterator["SSEEvents"]:
        """POST and yield the SSE `data:` payloads as they arrive (`SSEEvents`). Leaving the context before the end
        closes the connection, which makes vLLM abort the generation (its client went away)."""
        ep = self._pick()
        async with self._track(ep):
            try:
                resp = await self._open(ep, path, orjson.dumps(payload))
            except TRANSPORT_ERRORS as exc:
                self._mark_down(ep, exc)
                self._outcome("unavailable", type(exc).__name__)
                raise WorkerUnavailable(self.name, str(exc) or type(exc).__name__) from exc
            try:
                if resp.status >= 400:
                    self._decode(resp.status, await resp.read())
                self._outcome("ok")
                yield SSEEvents(self._sse_data(resp, ep), resp)
            finally:
                if resp.content.at_eof():
                    resp.release()  # read to the end: the connection goes back to the pool
                else:
                    resp.close()  # abandoned mid-stream: drop the connection so vLLM aborts the request

    async def _open(self, ep: Endpoint, path: str, data: bytes) -> aiohttp.ClientResponse:
        try:
            return await self.session.post(ep.url + path, data=data, headers=_JSON)
        except TRANSPORT_ERRORS as exc:
            if not _stale_connection(exc):
                raise
            log.info("%s worker %s: stale pooled connection (%s); sending once more", self.name, ep.url, exc)
            return await self.session.post(ep.url + path, data=data, headers=_JSON)

    async def _sse_data(self, resp: aiohttp.ClientResponse, ep: Endpoint) -> AsyncIterator[str]:
        try:
            async for raw in resp.content:
                if raw.startswith(b"data:"):
                    yield raw[5:].strip().decode()
        except TRANSPORT_ERRORS as exc:
            self._mark_down(ep, exc)
            self._outcome("broken_stream", type(exc).__name__)
            raise WorkerUnavailable(self.name, f"stream broke: {exc}") from exc

    async def check_health(self) -> None:
        probe = aiohttp.ClientTimeout(total=self.connect_timeout_s + self.probe_slack_s)

        async def one(ep: Endpoint) -> None:
            try:
                async with self.session.get(ep.url + "/health", timeout=probe) as r:
                    ep.healthy = r.status == 200
                    ep.last_error = "" if ep.healthy else f"/health returned {r.status}"
                    ep.slow_probes = 0
            except TRANSPORT_ERRORS as exc:
                ep.last_error = f"{type(exc).__name__}: {exc}"[:300]
                # A refused connection means the worker is gone; a probe that merely timed out on a saturated host
                # (both cores busy decoding) takes the worker out of rotation only when it keeps happening.
                ep.slow_probes = ep.slow_probes + 1 if isinstance(exc, asyncio.TimeoutError) else SLOW_PROBES_DOWN
                if ep.slow_probes >= SLOW_PROBES_DOWN:
                    ep.healthy = False
            ep.checked_at = time.time()

        await asyncio.gather(*(one(ep) for ep in self.endpoints))

    def status(self) -> dict[str, Any]:
        return {"ready": self.ready, "model": self.served_name, "workers": [e.as_dict() for e in self.endpoints]}


class SSEEvents:
    """Async iteration over a stream's `data:` payloads; `pending()` hands out, without waiting, the complete ones
    that have already arrived but were not read (a stopped stream counts what the worker had sent)."""

    def __init__(self, events: AsyncIterator[str], resp: aiohttp.ClientResponse):
        self._events, self._resp = events, resp

    def __aiter__(self) -> AsyncIterator[str]:
        return self._events

    def pending(self) -> list[str]:
        try:
            data = self._resp.content.read_nowait()
        except (RuntimeError, *TRANSPORT_ERRORS):  # a reader is waiting, or the stream already broke
            return []
        return [line[5:].strip().decode("utf-8", "replace") for line in data.split(b"\n")[:-1]
                if line.startswith(b"data:")]


def _stale_connection(exc: BaseException) -> bool:
    return isinstance(exc, STALE_CONNECTION_ERRORS) and not isinstance(exc, aiohttp.ClientConnectorError)
