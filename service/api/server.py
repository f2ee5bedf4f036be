"""uvicorn with a drain phase: on SIGTERM, /ready turns 503 and new requests are refused at once, in-flight requests
get `drain_timeout_s` to finish, then uvicorn shuts down (which stops the co-located workers). A second signal exits
immediately."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from types import FrameType

import uvicorn

from ..gateway import Gateway

log = logging.getLogger("ttc.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, gateway: Gateway, drain_timeout_s: float):
        super().__init__(config)
        self.gateway = gateway
        self.drain_timeout_s = drain_timeout_s
        self._drain_task: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.gateway.draining or sig not in (signal.SIGTERM, signal.SIGINT):
            super().handle_exit(sig, frame)
            return
        self.gateway.draining = True
        log.info("signal %s: draining (in flight: %d)", sig, self.gateway.admission.running)
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(self._start_drain, loop)

    def _start_drain(self, loop: asyncio.AbstractEventLoop) -> None:
        self._drain_task = loop.create_task(self._drain())

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.drain_timeout_s
        while self.gateway.admission.running > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        log.info("drained (still in flight: %d); shutting down", self.gateway.admission.running)
        self.should_exit = True
