"""Every way out of a request goes through one end: a short deadline is answered on time, and a stream the client
abandons at any byte still closes its body generator, settles its quota reservation and frees its admission slot."""

from __future__ import annotations

import asyncio
import time

import pytest
from starlette.requests import ClientDisconnect
from starlette.responses import StreamingResponse

from service.api.errors import status_of
from service.api.http import SettlingStream
from service.cache import MemoryCache
from service.errors import DeadlineExceeded
from service.metrics import Metrics
from service.serving.admission import Admission
from service.serving.context import RequestContext
from service.serving.handler import watch
from service.serving.lifecycle import RequestLifecycle
from service.serving.quota import FlopsQuota


async def test_a_50ms_deadline_is_answered_within_it():
    ctx = RequestContext(route="chat", request_id="r")
    ctx.deadline = ctx.started + 0.05
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded) as err:
        await watch(asyncio.sleep(5), ctx, None)
    assert status_of(err.value) == 504 and err.value.code == "deadline_exceeded"
    assert time.monotonic() - start < 0.15  # the disconnect poll (250 ms) must not delay it


async def test_deadline_counts_from_arrival():
    ctx = RequestContext(route="chat", request_id="r", started=time.monotonic() - 0.2)
    ctx.deadline = ctx.started + 0.1  # already passed when the work starts
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        await watch(asyncio.sleep(5), ctx, None)
    assert time.monotonic() - start < 0.05


def _lifecycle(quota: FlopsQuota, admission: Admission) -> tuple[RequestLifecycle, RequestContext]:
    ctx = RequestContext(route="chat", request_id="r", model="m")
    return RequestLifecycle(ctx, Metrics(), admission, quota), ctx


async def test_an_abandoned_stream_closes_its_generator_and_settles():
    quota = FlopsQuota(MemoryCache())
    admission = Admission(1, 0, 1.0, 1)
    await admission.acquire()
    life, ctx = _lifecycle(quota, admission)
    life.admitted = True
    await life.reserve("key", 1e12, 2e12, 3600)
    closed = asyncio.Event()

    async def body():
        try:
            yield b"data: first\n\n"
            ctx.meter.add_policy(3e9, 10, 0, 5)
            yield b"data: second\n\n"
            yield b"data: never\n\n"
        finally:
            closed.set()

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and b"second" in message.get("body", b""):
            raise OSError("client went away")  # what the server raises when the socket is gone

    async def receive() -> dict:
        await asyncio.sleep(10)
        return {"type": "http.disconnect"}

    response = SettlingStream(StreamingResponse(body(), media_type="text/event-stream"), life.close_shielded)
    with pytest.raises(ClientDisconnect):
        await response({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send)
    assert closed.is_set(), "the body generator was left suspended"
    assert quota.used_locally("key") == 3_000_000_000  # the reservation became the exact spend
    assert admission.running == 0
    assert ctx.finished  # metrics recorded (as a disconnect)
