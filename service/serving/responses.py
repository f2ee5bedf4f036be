"""OpenAI response bodies and the gateway's additions to them (usage.flops, the `ttc` object); the X-TTC-* headers
are api/http.py's."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Any

from ..metering import Meter
from .context import RequestContext

# vLLM-only fields that are null unless asked for; dropped so responses look like OpenAI's.
_VLLM_NULL_FIELDS = ("token_ids", "prompt_token_ids", "prompt_logprobs", "routed_experts", "kv_transfer_params",
                     "prompt_text", "ec_transfer_params", "metrics", "service_tier")


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


def ttc_object(strategy: str, meter: Meter, **extra: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "strategy": strategy,
        "flops": meter.as_dict(),
        "tokens": {
            "policy_prompt": meter.policy.prompt_tokens,
            "policy_cached": meter.policy.cached_tokens,
            "policy_completion": meter.policy.completion_tokens,
            "reward": meter.reward.prompt_tokens,
        },
        "calls": {"policy": meter.policy.calls, "reward": meter.reward.calls},
    }
    obj.update({k: v for k, v in extra.items() if v is not None})
    return obj


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


def usage_block(meter: Meter, prompt_tokens: int | None = None, completion_tokens: int | None = None) -> dict[str, Any]:
    prompt = meter.policy.prompt_tokens if prompt_tokens is None else prompt_tokens
    completion = meter.policy.completion_tokens if completion_tokens is None else completion_tokens
    usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                             "total_tokens": prompt + completion, "flops": meter.total_flops}
    if meter.policy.cached_tokens:
        usage["prompt_tokens_details"] = {"cached_tokens": meter.policy.cached_tokens}
    return usage


def decorate_upstream(body: dict[str, Any], ctx: RequestContext, strategy: str, **extra: Any) -> dict[str, Any]:
    """Add the gateway's figures to a response that came from vLLM, keeping vLLM's usage token counts."""
    for key in _VLLM_NULL_FIELDS:
        if key in body and body[key] is None:
            del body[key]
    for choice in body.get("choices", []):
        for key in _VLLM_NULL_FIELDS:
            if key in choice and choice[key] is None:
                del choice[key]
    body["system_fingerprint"] = system_fingerprint(str(body.get("model", "")))
    usage = body.get("usage") or {}
    usage["flops"] = ctx.meter.total_flops
    if usage.get("prompt_tokens_details") is None:
        usage.pop("prompt_tokens_details", None)
    if usage.get("completion_tokens_details") is None:
        usage.pop("completion_tokens_details", None)
    body["usage"] = usage
    body["ttc"] = ttc_object(strategy, ctx.meter, cache=ctx.cache_status, **budget_fields(ctx), **extra)
    return body


def chat_response(ctx: RequestContext, model: str, text: str, finish_reason: str, ttc: dict[str, Any],
                  usage: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": ctx.response_id, "object": "chat.completion", "created": ctx.created, "model": model,
        "system_fingerprint": system_fingerprint(model),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": finish_reason}],
        "usage": usage, "ttc": ttc,
    }


def completion_response(ctx: RequestContext, model: str, text: str, finish_reason: str, ttc: dict[str, Any],
                        usage: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": ctx.response_id, "object": "text_completion", "created": ctx.created, "model": model,
        "system_fingerprint": system_fingerprint(model),
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage, "ttc": ttc,
    }


def chunk(ctx: RequestContext, response_id: str, model: str, *, content: str | None = None,
          finish_reason: str | None = None, role: bool = False) -> dict[str, Any]:
    """One streamed choice delta, in the chat or completions chunk shape."""
    if ctx.route == "chat":
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if content is not None:
            delta["content"] = content
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": content or "", "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    return {"id": response_id, "object": obj, "created": ctx.created, "model": model,
            "system_fingerprint": system_fingerprint(model), "choices": [choice]}


def usage_chunk(ctx: RequestContext, response_id: str, model: str, usage: dict[str, Any],
                ttc: dict[str, Any]) -> dict[str, Any]:
    obj = "chat.completion.chunk" if ctx.route == "chat" else "text_completion"
    return {"id": response_id, "object": obj, "created": ctx.created, "model": model,
            "system_fingerprint": system_fingerprint(model), "choices": [], "usage": usage, "ttc": ttc}
