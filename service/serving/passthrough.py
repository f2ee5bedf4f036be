"""Plain requests (no test-time strategy): forwarded to the policy pool as they are, metered from vLLM's usage.

This is the hot path for apps that just want the model, so it does the least: one upstream call, no re-encoding
of the stream except the final usage chunk (and the chunks of a cacheable stream, which are collected to store it).
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any, AsyncIterator, Callable

import orjson
from starlette.responses import Response, StreamingResponse

from ..api.protocol import ECHOED_MESSAGE_FIELDS, NOT_FORWARDED, ChatCompletionRequest, CompletionRequest
from ..workers.policy import PolicyClient
from ..workers.pool import WorkerError, WorkerUnavailable
from . import sse
from .context import RequestContext
from .response_cache import ResponseCache, body_from_stream, replay_stream
from .responses import budget_fields, decorate_upstream, system_fingerprint, ttc_headers, ttc_object, with_fingerprint

STRATEGY = "none"
UPSTREAM_PATH = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}

Finish = Callable[[RequestContext, int, bool], None]  # (ctx, status, client_disconnected)


_EXCLUDE: dict[str, Any] = {**{k: True for k in NOT_FORWARDED}, "messages": {"__all__": set(ECHOED_MESSAGE_FIELDS)}}


def upstream_payload(req: ChatCompletionRequest | CompletionRequest, model: str, max_tokens: int) -> dict[str, Any]:
    """Everything vLLM accepts goes as the client sent it (tools, tool messages, response_format, vLLM's extras);
    by alias, so a JSON schema travels under its wire name `schema`."""
    payload = req.model_dump(exclude_none=True, by_alias=True, exclude=_EXCLUDE)
    payload["model"] = model
    payload["max_tokens"] = max_tokens
    if req.stream:
        # Always ask for usage: the meter needs it even when the client does not want the usage chunk.
        payload["stream_options"] = {"include_usage": True}
    return payload


async def forward(policy: PolicyClient, cache: ResponseCache, ctx: RequestContext,
                  req: ChatCompletionRequest | CompletionRequest, max_tokens: int, finish: Finish) -> Response:
    key = cache.key_for(ctx, req, max_tokens)
    cached = await cache.lookup(ctx, key)
    if cached is not None:
        if req.stream:
            return _stream_response(_finishing(replay_stream(ctx, cached, req.include_usage), ctx, finish), ctx)
        finish(ctx, 200, False)
        return Response(orjson.dumps(cached), media_type="application/json", headers=ttc_headers(ctx))

    payload = upstream_payload(req, policy.model, max_tokens)
    path = UPSTREAM_PATH[ctx.route]
    if req.stream:
        return await _forward_stream(policy, cache, key, ctx, path, payload, req.include_usage, req.n, finish)
    body = await policy.pool.post_json(path, payload)
    policy.meter_usage(ctx.meter, body.get("usage"), req.n, ctx.prompt_tokens)
    body = decorate_upstream(body, ctx, STRATEGY)
    await cache.store(ctx, key, body)
    finish(ctx, 200, False)
    return Response(orjson.dumps(body), media_type="application/json", headers=ttc_headers(ctx))


async def _forward_stream(policy: PolicyClient, cache: ResponseCache, key: str | None, ctx: RequestContext,
                          path: str, payload: dict[str, Any], include_usage: bool, n: int,
                          finish: Finish) -> Response:
    stack = AsyncExitStack()
    # Open upstream before answering 200, so an unavailable worker is still a proper 503.
    events = await stack.enter_async_context(policy.pool.stream(path, payload))

    async def body() -> AsyncIterator[bytes]:
        collected: list[str] = []
        first: dict[str, Any] | None = None
        finish_reason = "stop"
        complete = False
        stored: dict[str, Any] | None = None
        store_key = key
        try:
            async for data in events:
                if data == "[DONE]":
                    complete = True
                    break
                if '"choices":[]' in data and '"usage"' in data:
                    usage_msg = orjson.loads(data)
                    policy.meter_usage(ctx.meter, usage_msg.get("usage"), n, ctx.prompt_tokens)
                    usage_msg["usage"]["flops"] = ctx.meter.total_flops
                    usage_msg["ttc"] = ttc_object(STRATEGY, ctx.meter, cache=ctx.cache_status, **budget_fields(ctx))
                    usage_msg["system_fingerprint"] = system_fingerprint(policy.model)
                    if store_key is not None and first is not None:
                        stored = body_from_stream(ctx, first, "".join(collected), finish_reason,
                                                  usage_msg["usage"], usage_msg["ttc"])
                    if include_usage:
                        yield sse.event(usage_msg)
                    continue
                ctx.mark_first_token()
                if store_key is not None:
                    # A cacheable stream is n = 1: collect its text to store the finished response.
                    msg = orjson.loads(data)
                    first = first or msg
                    for choice in msg.get("choices", []):
                        if choice.get("delta", {}).get("tool_calls"):
                            store_key = None  # only text is collected for the cache: a streamed tool call is not stored
                        delta = choice.get("delta", {}).get("content") if ctx.route == "chat" else choice.get("text")
                        collected.append(delta or "")
                        finish_reason = choice.get("finish_reason") or finish_reason
                yield b"data: " + with_fingerprint(data, policy.model) + b"\n\n"
            yield sse.DONE
            if complete and stored is not None and store_key is not None:
                await cache.store(ctx, store_key, stored)
            finish(ctx, 200, False)
        except WorkerUnavailable as exc:
            yield sse.error_event(f"policy worker failed mid-stream: {exc.detail}", "service_unavailable",
                                  "workers_unavailable")
            yield sse.DONE
            finish(ctx, 503, False)
        except WorkerError as exc:
            yield sse.error_event(exc.message, "server_error", "upstream_error")
            yield sse.DONE
            finish(ctx, 502, False)
        finally:
            # Reached on normal end and when the client goes away (the generator is cancelled or closed):
            # closing the upstream stream makes vLLM abort the generation.
            await stack.aclose()
            finish(ctx, 499, True)

    return _stream_response(body(), ctx)


async def _finishing(events: AsyncIterator[bytes], ctx: RequestContext, finish: Finish) -> AsyncIterator[bytes]:
    async for item in events:
        yield item
    finish(ctx, 200, False)


def _stream_response(events: AsyncIterator[bytes], ctx: RequestContext) -> StreamingResponse:
    headers = dict(sse.SSE_HEADERS, **ttc_headers(ctx, flops=False))
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)
