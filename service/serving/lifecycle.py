"""The one place every request ends: metrics recorded once, the quota reservation settled to the exact spend, the
admission slot released. Whatever the way out (success, error, cancel, client disconnect, deadline, drain) and
whatever the shape of the answer (JSON, or a stream the client may abandon at any byte)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

from starlette.responses import StreamingResponse

from ..metrics import Metrics
from .admission import Admission
from .context import RequestContext
from .observe import record_request
from .quota import FlopsQuota, Reservation

log = logging.getLogger("ttc.serving")


class RequestLifecycle:
    def __init__(self, ctx: RequestContext, metrics: Metrics, admission: Admission, quota: FlopsQuota):
        self.ctx = ctx
        self.metrics = metrics
        self.admission = admission
        self.quota = quota
        self.admitted = False
        self.reservation: asyncio.Future[Reservation] | None = None
        self._closed = False

    def finish(self, ctx: RequestContext, status: int, disconnected: bool) -> None:
        """What the serving code calls when it knows how the request ended (metrics; idempotent)."""
        record_request(self.metrics, ctx, status, disconnected=disconnected)

    async def reserve(self, key: str, amount: float, limit: float, window_s: int,
                      on_store_failure: str | None = None) -> Reservation:
        """Reserve on the quota; the reservation is settled at close even if this request is cancelled meanwhile."""
        self.reservation = asyncio.ensure_future(
            self.quota.reserve(key, amount, limit, window_s, on_store_failure))  # type: ignore[arg-type]
        return await asyncio.shield(self.reservation)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Nothing else said how it ended: the client left before the answer's first byte.
        self.finish(self.ctx, 499, True)
        try:
            if self.reservation is not None:
                try:
                    reservation = await self.reservation
                except Exception:  # refused (429/503) or failed: nothing reserved, nothing to settle
                    reservation = None
                if reservation is not None:
                    await self.quota.settle(reservation, self.ctx.meter.total_flops)
        except Exception:  # settling must never fail the request's end; the quota logs its own faults
            log.exception("quota settlement failed for request %s", self.ctx.request_id)
        finally:
            if self.admitted:
                self.admitted = False
                self.admission.release()

    async def close_shielded(self) -> None:
        """close() that completes even when the caller is being cancelled."""
        await asyncio.shield(self.close())

    def settling(self, response: StreamingResponse) -> StreamingResponse:
        """The stream closes its body generator and the request when it ends, whether read to the end or
        abandoned: a generator left suspended at a `yield` would otherwise never run its own end."""
        return SettlingStream(response, self.close_shielded)


class SettlingStream(StreamingResponse):
    def __init__(self, inner: StreamingResponse, on_close: Callable[[], Awaitable[None]]):
        self.__dict__.update(inner.__dict__)
        self._on_close = on_close

    def around(self, other: StreamingResponse) -> "SettlingStream":
        """`other` (e.g. this stream's events rewritten for another API) ending the request as this one would."""
        return SettlingStream(other, self._on_close)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await asyncio.shield(aclose())
            finally:
                await self._on_close()
