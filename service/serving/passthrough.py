"""Plain requests (no test-time strategy): forwarded to the policy pool as they are, metered from vLLM's usage.

This is the hot path for apps that just want the model, so it does the least: one upstream call, no re-encoding
of the stream except the final usage chunk (and the chunks of a cacheable stream, which are collected to store it).
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any, AsyncIterator, Callable

import orjson

from ..errors import ServiceError, Unavailable, UpstreamError
from ..protocol.bodies import AnswerBody
from ..protocol.completions import ECHOED_MESSAGE_FIELDS, NOT_FORWARDED, ChatCompletionRequest, CompletionRequest
from ..workers.policy import PolicyClient
from ..workers.pool import WorkerError, WorkerUnavailable
from . import sse
from .context import RequestContext
from .lifecycle import CLIENT_GONE, OK
from .bodies import answer, decorate_upstream, decorate_usage_chunk, with_fingerprint
from .response_cache import ResponseCache, replay_stream
from .results import Answer, Result, Stream

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
                  req: ChatCompletionRequest | CompletionRequest, max_tokens: int, finish: Finish,
                  status_of: Callable[[ServiceError], int]) -> Result:
    key = cache.key_for(ctx, req, max_tokens)
    cached = await cache.lookup(ctx, key)
    if cached is not None:
        if req.stream:
            return Stream(_finishing(replay_stream(ctx, cached, req.include_usage), ctx, finish))
        finish(ctx, OK, False)
        return Answer(cached)

    payload = upstream_payload(req, policy.model, max_tokens)
    path = UPSTREAM_PATH[ctx.route]
    if req.stream:
        return await _forward_stream(policy, cache, key, ctx, path, payload, req.include_usage, req.n, finish,
                                     status_of)
    body = await policy.pool.post_json(path, payload)
    policy.meter_usage(ctx.meter, body.get("usage"), req.n, ctx.prompt_tokens)
    body = decorate_upstream(body, ctx, STRATEGY)
    await cache.store(ctx, key, body)
    finish(ctx, OK, False)
    return Answer(body)


async def _forward_stream(policy: PolicyClient, cache: ResponseCache, key: str | None, ctx: RequestContext,
                          path: str, payload: dict[str, Any], include_usage: bool, n: int,
                          finish: Finish, status_of: Callable[[ServiceError], int]) -> Result:
    stack = AsyncExitStack()
    # Open upstream before answering 200, so an unavailable worker is still a proper 503.
    events = await stack.enter_async_context(policy.pool.stream(path, payload))

    async def body() -> AsyncIterator[bytes]:
        collected: list[str] = []
        first: dict[str, Any] | None = None
        finish_reason = "stop"
        complete = False
        stored: AnswerBody | None = None
        store_key = key
        try:
            async for data in events:
                if data == "[DONE]":
                    complete = True
                    break
                if '"choices":[]' in data and '"usage"' in data:
                    raw_usage = orjson.loads(data)
                    policy.meter_usage(ctx.meter, raw_usage.get("usage"), n, ctx.prompt_tokens)
                    usage_msg = decorate_usage_chunk(raw_usage, ctx, policy.model, STRATEGY)
                    if store_key is not None and first is not None:
                        # The JSON answer this stream amounts to, stored for a later hit.
                        stored = answer(ctx.route, first.get("id") or ctx.response_id,
                                        first.get("created") or ctx.created, first.get("model") or policy.model,
                                        "".join(collected), finish_reason, usage_msg.usage, usage_msg.ttc)
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
            finish(ctx, OK, False)
        except WorkerUnavailable as exc:
            # Headers are sent: the error goes in-band, then [DONE].
            down = Unavailable(f"policy worker failed mid-stream: {exc.detail}", code="workers_unavailable")
            yield sse.error_event(down.message, "service_unavailable", down.code)
            yield sse.DONE
            finish(ctx, status_of(down), False)
        except (WorkerError, UpstreamError) as exc:
            failed = exc if isinstance(exc, UpstreamError) else UpstreamError(exc.message, code="upstream_error")
            yield sse.error_event(failed.message, "server_error", failed.code)
            yield sse.DONE
            finish(ctx, status_of(failed), False)
        finally:
            # Reached on normal end and when the client goes away (the generator is cancelled or closed):
            # closing the upstream stream makes vLLM abort the generation.
            await stack.aclose()
            finish(ctx, CLIENT_GONE, True)

    return Stream(body())


async def _finishing(events: AsyncIterator[bytes], ctx: RequestContext, finish: Finish) -> AsyncIterator[bytes]:
    async for item in events:
        yield item
    finish(ctx, OK, False)
