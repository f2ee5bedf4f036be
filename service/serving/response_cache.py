"""Whole-response caching for deterministic requests (n = 1 and temperature 0, or a seed given).

Keys cover the tenant, route, model and every field of the request that shapes the output, so another tenant's
identical prompt is a miss. Only complete, successful responses are stored; a hit replays as JSON or as a stream,
and costs no FLOPs, which the meter and the `ttc` object say.
"""

from __future__ import annotations

from typing import Any, AsyncIterator

import orjson

from ..protocol.bodies import AnswerBody, ChatCompletion
from ..protocol.tools import IGNORED_FIELDS
from ..cache import Cache, cache_key, cacheable_response, parse_cache_control
from . import sse
from .bodies import cached_answer, chunk, usage_chunk
from .context import RequestContext

# Fields that do not change the generated text (streaming shape is replayed, not cached separately).
_NOT_IN_KEY = {"stream", "stream_options", "user"} | IGNORED_FIELDS


class ResponseCache:
    def __init__(self, cache: Cache, ttl_s: float):
        self.cache = cache
        self.ttl_s = ttl_s

    def key_for(self, ctx: RequestContext, req: Any, max_tokens: int) -> str | None:
        """None when the request must not be cached (sampling without a seed, or the client said so)."""
        directives = parse_cache_control(ctx.headers.get("cache-control"))
        temperature = 1.0 if req.temperature is None else req.temperature
        if not cacheable_response(req.n, temperature, req.seed):
            ctx.cache_status = "bypass"
            return None
        payload = req.model_dump(exclude=_NOT_IN_KEY, exclude_none=True)
        payload.update(route=ctx.route, max_tokens=max_tokens, model=ctx.model)
        if directives.no_cache and directives.no_store:
            ctx.cache_status = "bypass"
            return None
        return cache_key("response", ctx.tenant, payload)

    async def lookup(self, ctx: RequestContext, key: str | None) -> AnswerBody | None:
        if key is None:
            return None
        if parse_cache_control(ctx.headers.get("cache-control")).no_cache:
            ctx.cache_status = "bypass"
            return None
        if not getattr(self.cache, "healthy", True):
            ctx.cache_status = "bypass"  # the store is known to be down (breaker open): not even asked
            return None
        raw = await self.cache.get(key)
        body = cached_answer(raw, ctx) if raw is not None else None
        ctx.cache_status = "miss" if body is None else "hit"  # an unreadable entry is a miss, not an error
        return body

    async def store(self, ctx: RequestContext, key: str | None, body: AnswerBody) -> None:
        if key is None or parse_cache_control(ctx.headers.get("cache-control")).no_store:
            return
        await self.cache.set(key, orjson.dumps(body.wire()), self.ttl_s)


def replay_stream(ctx: RequestContext, body: AnswerBody, include_usage: bool) -> AsyncIterator[bytes]:
    """A cached response as an SSE stream: one content chunk, the finish chunk, usage if asked, [DONE]."""

    async def events() -> AsyncIterator[bytes]:
        choice = body.choices[0]
        message = choice.message if isinstance(body, ChatCompletion) else None
        text = message.content if message is not None else choice.text
        rid, model = body.id, body.model
        if ctx.route == "chat":
            yield sse.event(chunk(ctx, rid, model, role=True, content=""))
        if text:
            yield sse.event(chunk(ctx, rid, model, content=text))
        if message is not None and message.tool_calls:
            yield sse.event(chunk(ctx, rid, model, tool_calls=[dict(c, index=i)
                                                               for i, c in enumerate(message.tool_calls)]))
        yield sse.event(chunk(ctx, rid, model, finish_reason=choice.finish_reason or "stop"))
        if include_usage and body.usage is not None and body.ttc is not None:
            yield sse.event(usage_chunk(ctx, rid, model, body.usage, body.ttc))
        yield sse.DONE

    return events()
