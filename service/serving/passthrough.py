"""Plain requests (no test-time strategy): forwarded to the policy pool as they are, metered from vLLM's usage.

This is the hot path for apps that just want the model, so it does the least: one upstream call, no re-encoding
of the stream beyond the final usage chunk.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any, AsyncIterator

import orjson
from starlette.responses import Response, StreamingResponse

from ..api.protocol import ChatCompletionRequest, CompletionRequest
from ..workers.policy import PolicyClient
from ..workers.pool import WorkerError, WorkerUnavailable
from . import sse
from .context import RequestContext
from .responses import decorate_upstream, flops_headers, ttc_object

STRATEGY = "none"
UPSTREAM_PATH = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


def upstream_payload(req: ChatCompletionRequest | CompletionRequest, model: str, max_tokens: int) -> dict[str, Any]:
    payload = req.model_dump(exclude_none=True, exclude={"ttc", "stream_options", "max_completion_tokens"})
    payload["model"] = model
    payload["max_tokens"] = max_tokens
    if req.stream:
        # Always ask for usage: the meter needs it even when the client does not want the usage chunk.
        payload["stream_options"] = {"include_usage": True}
    return payload


async def forward(policy: PolicyClient, ctx: RequestContext, req: ChatCompletionRequest | CompletionRequest,
                  max_tokens: int) -> Response:
    payload = upstream_payload(req, policy.model, max_tokens)
    path = UPSTREAM_PATH[ctx.route]
    if req.stream:
        return await _forward_stream(policy, ctx, path, payload, req.include_usage, req.n)
    body = await policy.pool.post_json(path, payload)
    policy.meter_usage(ctx.meter, body.get("usage"), req.n)
    body = decorate_upstream(body, ctx, STRATEGY)
    return Response(orjson.dumps(body), media_type="application/json", headers=flops_headers(ctx.meter, STRATEGY))


async def _forward_stream(policy: PolicyClient, ctx: RequestContext, path: str, payload: dict[str, Any],
                          include_usage: bool, n: int) -> Response:
    stack = AsyncExitStack()
    # Open upstream before answering 200, so an unavailable worker is still a proper 503.
    events = await stack.enter_async_context(policy.pool.stream(path, payload))

    async def body() -> AsyncIterator[bytes]:
        try:
            async for data in events:
                if data == "[DONE]":
                    break
                if '"usage"' in data and '"choices":[]' in data:
                    chunk = orjson.loads(data)
                    policy.meter_usage(ctx.meter, chunk.get("usage"), n)
                    if include_usage:
                        chunk["usage"]["flops"] = ctx.meter.total_flops
                        chunk["ttc"] = ttc_object(STRATEGY, ctx.meter)
                        yield sse.event(chunk)
                    continue
                yield b"data: " + data.encode() + b"\n\n"
            yield sse.DONE
        except WorkerUnavailable as exc:
            yield sse.error_event(f"policy worker failed mid-stream: {exc.detail}", "service_unavailable",
                                  "workers_unavailable")
            yield sse.DONE
        except WorkerError as exc:
            yield sse.error_event(exc.message, "server_error", "upstream_error")
            yield sse.DONE
        finally:
            await stack.aclose()

    headers = dict(sse.SSE_HEADERS, **{"X-TTC-Strategy": STRATEGY})
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)
