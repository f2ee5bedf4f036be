"""A pool of vLLM OpenAI servers serving one model, reached through one shared httpx.AsyncClient.

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

import httpx
import orjson

log = logging.getLogger("ttc.workers")


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
    metrics: Any = None  # service.metrics.Metrics; optional so the pool stays usable on its own
    client: httpx.AsyncClient = field(init=False)

    def __post_init__(self) -> None:
        timeout = httpx.Timeout(self.request_timeout_s, connect=self.connect_timeout_s)
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
        self.client = httpx.AsyncClient(timeout=timeout, limits=limits)

    @classmethod
    def from_urls(cls, name: str, served_name: str, urls: list[str], **kw: Any) -> "WorkerPool":
        return cls(name=name, served_name=served_name, endpoints=[Endpoint(u.rstrip("/")) for u in urls], **kw)

    @property
    def ready(self) -> bool:
        return any(e.healthy for e in self.endpoints)

    async def close(self) -> None:
        await self.client.aclose()

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
        gauge = self.metrics.upstream_inflight.labels(self.name) if self.metrics else None
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
        ep = self._pick()
        async with self._track(ep):
            try:
                resp = await self.client.post(ep.url + path, content=orjson.dumps(payload),
                                              headers={"content-type": "application/json"})
            except (httpx.TransportError, httpx.TimeoutException) as exc:
                self._mark_down(ep, exc)
                self._outcome("unavailable", type(exc).__name__)
                raise WorkerUnavailable(self.name, str(exc) or type(exc).__name__) from exc
        return self._decode(resp)

    def _decode(self, resp: httpx.Response) -> dict[str, Any]:
        try:
            body = orjson.loads(resp.content)
        except orjson.JSONDecodeError:
            body = resp.text[:500]
        if resp.status_code >= 400:
            self._outcome("error", f"http_{resp.status_code // 100}xx")
            raise WorkerError(self.name, resp.status_code, body)
        self._outcome("ok")
        return body

    @asynccontextmanager
    async def stream(self, path: str, payload: dict[str, Any]) -> AsyncIterator[AsyncIterator[str]]:
        """POST and yield the SSE `data:` payloads as they arrive. Closing the context aborts the upstream request
        (vLLM aborts generation when its client disconnects)."""
        ep = self._pick()
        async with self._track(ep):
            request = self.client.build_request("POST", ep.url + path, content=orjson.dumps(payload),
                                                headers={"content-type": "application/json"})
            try:
                resp = await self.client.send(request, stream=True)
            except (httpx.TransportError, httpx.TimeoutException) as exc:
                self._mark_down(ep, exc)
                self._outcome("unavailable", type(exc).__name__)
                raise WorkerUnavailable(self.name, str(exc) or type(exc).__name__) from exc
            try:
                if resp.status_code >= 400:
                    await resp.aread()
                    self._decode(resp)
                self._outcome("ok")
                yield self._sse_data(resp, ep)
            finally:
                await resp.aclose()

    async def _sse_data(self, resp: httpx.Response, ep: Endpoint) -> AsyncIterator[str]:
        try:
            async for line in resp.aiter_lines():
                if line.startswith("data:"):
                    yield line[5:].strip()
        except (httpx.TransportError, httpx.TimeoutException) as exc:
            self._mark_down(ep, exc)
            self._outcome("broken_stream", type(exc).__name__)
            raise WorkerUnavailable(self.name, f"stream broke: {exc}") from exc

    async def check_health(self) -> None:
        async def one(ep: Endpoint) -> None:
            try:
                r = await self.client.get(ep.url + "/health", timeout=self.connect_timeout_s + 1.0)
                ep.healthy = r.status_code == 200
                ep.last_error = "" if ep.healthy else f"/health returned {r.status_code}"
            except (httpx.TransportError, httpx.TimeoutException) as exc:
                ep.healthy = False
                ep.last_error = f"{type(exc).__name__}: {exc}"[:300]
            ep.checked_at = time.time()

        await asyncio.gather(*(one(ep) for ep in self.endpoints))

    def status(self) -> dict[str, Any]:
        return {"ready": self.ready, "model": self.served_name, "workers": [e.as_dict() for e in self.endpoints]}
