"""The one place every request ends: metrics recorded once, the quota reservation settled to the exact spend, the
admission slot released. Whatever the way out (success, error, cancel, client disconnect, deadline, drain) and
whatever the shape of the answer (JSON, or a stream the client may abandon at any byte)."""

from __future__ import annotations

import asyncio
import logging

from ..metrics import Metrics
from .admission import Admission
from .context import RequestContext
from .observe import record_request
from .quota import FlopsQuota, Reservation

log = logging.getLogger("ttc.serving")

# What the metrics record for the two ends that are not errors (the status an error gets is api/errors.py's).
OK = 200
CLIENT_GONE = 499  # nginx's "client closed request": the client left before the answer was complete


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
        self.finish(self.ctx, CLIENT_GONE, True)
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
