"""Serving's results as HTTP: a whole answer as JSON, a stream as text/event-stream that settles the request when
it ends or is abandoned, and the X-TTC-* headers read from the request's context."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

import orjson
from starlette.responses import Response, StreamingResponse

from ..serving.context import RequestContext
from ..serving.quota import flops_int
from ..serving.results import Answer, ClientGone, Result, Stream

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
CLIENT_CLOSED_REQUEST = 499


def ttc_headers(ctx: RequestContext, flops: bool = True) -> dict[str, str]:
    """The X-TTC-* response headers; a stream's headers leave before its FLOPs are known (they go in its usage chunk)."""
    headers = {"X-TTC-Strategy": ctx.strategy, "X-TTC-Cache": ctx.cache_status}
    if flops:
        # Whole FLOPs, exactly what a quota is charged (a short float would not add up to the quota's counter).
        headers["X-TTC-FLOPs"] = str(flops_int(ctx.meter.total_flops))
        if ctx.budget_flops is not None:
            headers["X-TTC-Budget-Remaining-FLOPs"] = str(flops_int(ctx.budget_flops - ctx.meter.total_flops))
    if ctx.difficulty is not None:
        headers["X-TTC-Difficulty"] = str(ctx.difficulty)
    if ctx.expected_accuracy is not None:
        headers["X-TTC-Expected-Accuracy"] = f"{ctx.expected_accuracy:.4f}"
    return headers



def to_response(result: Result, ctx: RequestContext) -> Response:
    if isinstance(result, Answer):
        return Response(orjson.dumps(result.body.wire()), media_type="application/json", headers=ttc_headers(ctx))
    if isinstance(result, ClientGone):
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    assert isinstance(result, Stream)
    # A stream's headers leave before its FLOPs are known (they go in its usage chunk).
    response = StreamingResponse(result.events, media_type="text/event-stream",
                                 headers=dict(SSE_HEADERS, **ttc_headers(ctx, flops=False)))
    return SettlingStream(response, result.on_close) if result.on_close is not None else response


class SettlingStream(StreamingResponse):
    """Closes its body generator and the request when the stream ends, whether read to the end or abandoned: a
    generator left suspended at a `yield` would otherwise never run its own end."""

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
