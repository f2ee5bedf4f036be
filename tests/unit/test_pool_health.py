"""Worker health as the pool sees it: a refused connection takes a worker out at once, a probe that merely times
out on a saturated host only when it keeps happening; a request that meets a connection the worker already closed
is sent once more on a fresh one."""

from __future__ import annotations

import asyncio
import socket

from aiohttp import web

from service.workers.pool import SLOW_PROBES_DOWN, WorkerPool


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _server(handler_for_health, post_handler=None) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_get("/health", handler_for_health)
    if post_handler is not None:
        app.router.add_post("/v1/completions", post_handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


async def test_refused_is_down_at_once_slow_only_after_repeated_timeouts():
    stalled = asyncio.Event()

    async def health(_: web.Request) -> web.Response:
        if stalled.is_set():
            await asyncio.sleep(1)
        return web.Response(text="ok")

    runner, url = await _server(health)
    pool = WorkerPool.from_urls("policy", "m", [url, f"http://127.0.0.1:{_closed_port()}"], connect_timeout_s=0.1,
                                probe_slack_s=0.1)
    try:
        await pool.check_health()
        slow, refused = pool.endpoints
        assert slow.healthy and not refused.healthy
        stalled.set()
        for _ in range(SLOW_PROBES_DOWN - 1):
            await pool.check_health()
            assert slow.healthy, "one slow probe must not take a busy worker out of rotation"
        await pool.check_health()
        assert not slow.healthy
    finally:
        await pool.close()
        await runner.cleanup()


async def test_a_stale_pooled_connection_is_retried_once():
    calls = 0

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def completions(request: web.Request) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        if calls == 1:  # the worker drops the connection without answering, as after its keep-alive timeout
            request.transport.close()  # type: ignore[union-attr]
            await asyncio.sleep(0.1)
            return web.Response(text="never sent")
        return web.json_response({"ok": True})

    runner, url = await _server(health, completions)
    pool = WorkerPool.from_urls("policy", "m", [url], connect_timeout_s=0.5)
    try:
        await pool.check_health()
        assert await pool.post_json("/v1/completions", {"prompt": "x"}) == {"ok": True}
        assert calls == 2 and pool.endpoints[0].healthy
    finally:
        await pool.close()
        await runner.cleanup()


async def test_a_stream_left_early_hands_out_what_arrived_and_drops_the_connection():
    gone = asyncio.Event()

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def completions(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for i in range(4):
                await resp.write(f"data: {i}\n\n".encode())
            await resp.write(b"data: 4 partial")  # an event that has not fully arrived
            for _ in range(100):  # the worker keeps generating until it notices its client went away
                await asyncio.sleep(0.05)
                await resp.write(b"x")
        except (ConnectionResetError, asyncio.CancelledError):
            gone.set()
        return resp

    runner, url = await _server(health, completions)
    pool = WorkerPool.from_urls("policy", "m", [url], connect_timeout_s=0.5)
    try:
        await pool.check_health()
        async with pool.stream("/v1/completions", {"stream": True}) as events:
            async for data in events:
                assert data == "0"
                await asyncio.sleep(0.2)  # the next events arrive meanwhile, unread
                assert events.pending() == ["1", "2", "3"]
                break
        await asyncio.wait_for(gone.wait(), 5)  # closing the stream early dropped the connection
    finally:
        await pool.close()
        await runner.cleanup()
