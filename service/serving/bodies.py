"""Every response body the gateway sends is built here, and only here (protocol/bodies.py types them): a search's
answer, a forwarded vLLM answer with the gateway's figures added, a cached answer replayed, and the stream chunks of
all three. The X-TTC-* headers are api/http.py's."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Any

from pydantic import ValidationError

from ..errors import UpstreamError
from ..metering import Meter
from ..protocol.bodies import (AnswerBody, AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk,
                               ChunkBody, ChunkChoice, CompletionChoice, Delta, PromptTokensDetails, TextCompletion,
                               TTCInfo, Usage)
from ..strategies.base import StrategyResult
from .context import RequestContext


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("ttc-gateway")
    except Exception:
        return "0"


@lru_cache(maxsize=16)
def system_fingerprint(model: str) -> str:
    """One fingerprint for every answer of this gateway version and model, searches and pass-through alike (vLLM's
    own names the engine build only, and only on non-streamed pass-through answers)."""
    return "fp_ttc_" + hashlib.sha256(f"{model}|{_version()}".encode()).hexdigest()[:12]


def with_fingerprint(data: str, model: str) -> bytes:
    """A streamed upstream chunk with the fingerprint added, without re-encoding the JSON (the hot path)."""
    raw = data.encode()
    if raw.startswith(b"{") and b'"system_fingerprint"' not in raw:
        return b'{"system_fingerprint":"' + system_fingerprint(model).encode() + b'",' + raw[1:]
    return raw


# ---- the parts: `ttc` and usage -------------------------------------------------------------------------------

def ttc_info(strategy: str, meter: Meter, **extra: Any) -> TTCInfo:
    """The `ttc` object: what the meter counted, and `extra` (None values are left out)."""
    return TTCInfo(
        strategy=strategy, flops=meter.as_dict(),
        tokens={"policy_prompt": meter.policy.prompt_tokens, "policy_cached": meter.policy.cached_tokens,
                "policy_completion": meter.policy.completion_tokens, "reward": meter.reward.prompt_tokens},
        calls={"policy": meter.policy.calls, "reward": meter.reward.calls}, **extra)


def budget_fields(ctx: RequestContext) -> dict[str, Any]:
    """What the `ttc` object adds about budget and routing (also carried by a stream's final usage chunk)."""
    out: dict[str, Any] = {}
    if ctx.budget_flops is not None:
        out["budget"] = {"flops": ctx.budget_flops, "remaining_flops": ctx.budget_flops - ctx.meter.total_flops}
    if ctx.difficulty is not None:
        out["difficulty"] = ctx.difficulty
    if ctx.expected_accuracy is not None:
        out["expected_accuracy"] = ctx.expected_accuracy
    return out


def search_ttc(ctx: RequestContext, strategy: Any, reward_name: str | None, result: StrategyResult,
               extra: dict[str, Any], policy: Any = None) -> TTCInfo:
    """A search's `ttc`: the strategy, its parameters and result, the budget (the same in the body and the usage
    chunk of a stream)."""
    reused = getattr(policy, "reused", None)
    if reused is not None:
        extra = dict(extra, samples_reused=reused)
    return ttc_info(
        strategy.name, ctx.meter, params=strategy.params.model_dump(), reward=reward_name,
        samples=result.samples, steps=result.steps, answer=result.answer, score=result.score,
        budget_exhausted=result.budget_exhausted, cache=ctx.cache_status, details=result.details or None,
        **budget_fields(ctx), **extra)


def usage(meter: Meter, prompt_tokens: int | None = None, completion_tokens: int | None = None) -> Usage:
    prompt = meter.policy.prompt_tokens if prompt_tokens is None else prompt_tokens
    completion = meter.policy.completion_tokens if completion_tokens is None else completion_tokens
    cached = PromptTokensDetails(cached_tokens=meter.policy.cached_tokens) if meter.policy.cached_tokens else None
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 flops=meter.total_flops, prompt_tokens_details=cached)


# ---- whole answers --------------------------------------------------------------------------------------------

def answer(route: str, response_id: str, created: int, model: str, text: str, finish_reason: str, usage: Usage,
           ttc: TTCInfo) -> AnswerBody:
    """A one-choice answer in the route's shape (a search's, or the one a finished stream amounts to)."""
    head = {"id": response_id, "created": created, "model": model, "system_fingerprint": system_fingerprint(model),
            "usage": usage, "ttc": ttc}
    if route == "chat":
        message = AssistantMessage(role="assistant", content=text)
        return ChatCompletion(**head, choices=[ChatChoice(index=0, message=message, logprobs=None,
                                                          finish_reason=finish_reason)])
    return TextCompletion(**head, choices=[CompletionChoice(index=0, text=text, logprobs=None,
                                                            finish_reason=finish_reason)])


def _kind(route: str) -> type[ChatCompletion] | type[TextCompletion]:
    return ChatCompletion if route == "chat" else TextCompletion


def decorate_upstream(body: dict[str, Any], ctx: RequestContext, strategy: str, **extra: Any) -> AnswerBody:
    """A vLLM answer with the gateway's figures added (vLLM's usage token counts kept) and its null vLLM-only
    fields dropped."""
    try:
        out = _kind(ctx.route).model_validate(body)
    except ValidationError as exc:
        raise UpstreamError(f"The policy worker's answer is not an OpenAI body: {exc.errors()[0]['msg']}",
                            code="upstream_error")
    out.system_fingerprint = system_fingerprint(out.model)
    out.usage = out.usage or Usage()
    out.usage.flops = ctx.meter.total_flops
    out.ttc = ttc_info(strategy, ctx.meter, cache=ctx.cache_status, **budget_fields(ctx), **extra)
    return out


def cached_answer(raw: bytes, ctx: RequestContext) -> AnswerBody | None:
    """A stored answer as a new one: its own id and time (clients key logs and dedup on them), no FLOPs spent, as
    its `ttc` says. None when the stored bytes are not an answer of this route (treated as a miss)."""
    try:
        body = _kind(ctx.route).model_validate_json(raw)
    except ValidationError:
        return None
    body.id, body.created = ctx.response_id, ctx.created
    body.system_fingerprint = system_fingerprint(body.model)
    body.usage = body.usage or Usage()
    body.usage.flops = 0.0
    body.ttc = ttc_info(body.ttc.strategy if body.ttc else ctx.strategy, ctx.meter, cache="hit")
    return body


# ---- stream chunks --------------------------------------------------------------------------------------------

def chunk(ctx: RequestContext, response_id: str, model: str, *, content: str | None = None,
          finish_reason: str | None = None, role: bool = False,
          tool_calls: list[dict[str, Any]] | None = None) -> ChunkBody:
    """One streamed choice delta, in the chat or completions chunk shape."""
    head = {"id": response_id, "created": ctx.created, "model": model, "system_fingerprint": system_fingerprint(model)}
    if ctx.route != "chat":
        return TextCompletion(**head, choices=[CompletionChoice(index=0, text=content or "", logprobs=None,
                                                                finish_reason=finish_reason)])
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = "assistant"
    if content is not None:
        delta["content"] = content
    if tool_calls is not None:
        delta["tool_calls"] = tool_calls
    return ChatCompletionChunk(**head, choices=[ChunkChoice(index=0, delta=Delta(**delta), logprobs=None,
                                                            finish_reason=finish_reason)])


def _chunk_kind(route: str) -> type[ChatCompletionChunk] | type[TextCompletion]:
    return ChatCompletionChunk if route == "chat" else TextCompletion


def usage_chunk(ctx: RequestContext, response_id: str, model: str, usage: Usage, ttc: TTCInfo) -> ChunkBody:
    """A stream's last chunk before [DONE]: no choices, the usage and the same `ttc` as a whole answer."""
    return _chunk_kind(ctx.route)(id=response_id, created=ctx.created, model=model,
                                  system_fingerprint=system_fingerprint(model), choices=[], usage=usage, ttc=ttc)


def decorate_usage_chunk(msg: dict[str, Any], ctx: RequestContext, model: str, strategy: str) -> ChunkBody:
    """vLLM's final usage chunk with the gateway's figures added, as `decorate_upstream` does for a whole answer."""
    try:
        out = _chunk_kind(ctx.route).model_validate(msg)
    except ValidationError as exc:
        raise UpstreamError(f"The policy worker's usage chunk is not an OpenAI chunk: {exc.errors()[0]['msg']}",
                            code="upstream_error")
    out.usage = out.usage or Usage()
    out.usage.flops = ctx.meter.total_flops
    out.ttc = ttc_info(strategy, ctx.meter, cache=ctx.cache_status, **budget_fields(ctx))
    out.system_fingerprint = system_fingerprint(model)
    return out
