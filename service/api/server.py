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
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .app import Runtime

log = logging.getLogger("ttc.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, gateway: Runtime, drain_timeout_s: float):
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


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with two limits it lacks: request headers must arrive completely within
    `header_timeout_s` of the connection opening (or of the request's first byte on a kept-alive connection), and
    add up to at most `max_header_bytes`. Without them a slowloris client holds sockets open for ever."""

    header_timeout_s = 10.0
    max_header_bytes = 65536

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_bytes = 0
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm_header_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0
        if self._header_timer is None:
            self._arm_header_timer()

    def on_url(self, url: bytes) -> None:
        self._count_header_bytes(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_header_bytes(len(name) + len(value))
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _count_header_bytes(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > self.max_header_bytes:
            raise ValueError("request headers too large")  # the parser turns it into a 400 and a close

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            log.info("closing a connection whose request headers took over %.0f s", self.header_timeout_s)
            self.transport.close()


def header_timeout_protocol(header_timeout_s: float, max_header_bytes: int) -> type[HeaderTimeoutProtocol]:
    """The protocol class with the configured limits (uvicorn takes a class; multi-process mode takes the
    module path of HeaderTimeoutProtocol and its defaults)."""
    return type("ConfiguredHeaderTimeoutProtocol", (HeaderTimeoutProtocol,),
                {"header_timeout_s": header_timeout_s, "max_header_bytes": max_header_bytes})
