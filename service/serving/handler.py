"""One request from validated body to response: admission, limits, budget, strategy choice, then pass-through or
search; deadline and client disconnect watched throughout; metrics recorded once at the end."""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable

from starlette.background import BackgroundTask
from starlette.responses import Response, StreamingResponse

from ..api.errors import APIError, unavailable
from ..api.protocol import ChatCompletionRequest, CompletionRequest
from ..gateway import Gateway
from ..workers.pool import WorkerError, WorkerUnavailable
from . import passthrough, search
from .context import RequestContext
from .observe import record_request
from ..router.auto import AutoStrategy
from .options import AUTO, TTCOptions, make_strategy, parse_options
from .quota import QuotaExceeded

Request = ChatCompletionRequest | CompletionRequest
DISCONNECT_POLL_S = 0.25


def check_limits(gw: Gateway, req: Request, max_n: int) -> int:
    """Returns the max_tokens to use; raises 400 on what the configuration does not allow."""
    s = gw.settings
    if req.model != gw.policy.model:
        raise APIError(404, f"The model '{req.model}' does not exist; available: {gw.policy.model}",
                       param="model", code="model_not_found")
    if req.n > max_n:
        raise APIError(400, f"n must be at most {max_n}", param="n", code="invalid_value")
    requested = req.requested_max_tokens()
    max_tokens = requested if requested is not None else s.default_max_tokens
    if max_tokens > s.max_tokens_cap:
        param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
        raise APIError(400, f"{param} must be at most {s.max_tokens_cap}", param=param, code="invalid_value")
    return max_tokens


def prompt_chars(req: Request) -> int:
    if isinstance(req, ChatCompletionRequest):
        return sum(len(m.text()) + 16 for m in req.messages)  # + template tokens per message
    prompts = req.prompt if isinstance(req.prompt, list) else [req.prompt]
    return sum(len(p) if isinstance(p, str) else 3 * len(p) if isinstance(p, list) else 3 for p in prompts)


def effective_budget(gw: Gateway, opts: TTCOptions) -> float | None:
    """The FLOPs limit a request runs under: its FLOPs budget and its token budget at the policy's per-token cost."""
    limits = [opts.budget_flops] if opts.budget_flops is not None else []
    if opts.budget_tokens is not None:
        shape = gw.policy.shape
        limits.append(opts.budget_tokens * (2.0 * shape.non_embedding_params + shape.logits_flops(1)))
    return min(limits) if limits else None


def passthrough_max_tokens(gw: Gateway, req: Request, max_tokens: int, budget: float | None) -> int:
    """Under an enforced budget a plain request may generate only what the budget pays for (finish_reason length)."""
    if budget is None:
        return max_tokens
    shape = gw.policy.shape
    prompt = int(prompt_chars(req) / gw.policy.chars_per_token) + 1
    fits = lambda k: shape.generation_flops(prompt, 0, [k] * req.n) <= budget  # noqa: E731
    if not fits(1):
        raise APIError(400, f"The FLOPs budget {budget:.3e} cannot pay for even one token of this request",
                       param="X-TTC-Budget-FLOPs", code="budget_exceeded")
    lo, hi = 1, max_tokens
    while lo < hi:  # largest k that fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


async def watch(work: Awaitable[Response], ctx: RequestContext,
                is_disconnected: Callable[[], Awaitable[bool]] | None) -> Response:
    """Runs the request's work; cancels it (and so its upstream calls) when the client goes away or the deadline
    passes. Streaming responses return at once: their generators watch for themselves."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            timeout = DISCONNECT_POLL_S
            if ctx.deadline is not None:
                timeout = min(timeout, max(0.0, ctx.deadline - time.monotonic()))
            done, _ = await asyncio.wait({task}, timeout=timeout)
            if done:
                return task.result()
            if ctx.deadline is not None and time.monotonic() >= ctx.deadline:
                raise APIError(504, "The request deadline passed before an answer was ready",
                               code="deadline_exceeded")
            if is_disconnected is not None and await is_disconnected():
                raise ClientGone()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class ClientGone(Exception):
    """The client disconnected before the response was ready."""


async def handle(gw: Gateway, ctx: RequestContext, req: Request,
                 is_disconnected: Callable[[], Awaitable[bool]] | None = None) -> Response:
    ctx.model = req.model if req.model == gw.policy.model else "unknown"
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            gw.admission.release()

    def finish(c: RequestContext, status: int, disconnected: bool) -> None:
        record_request(gw.metrics, c, status, disconnected=disconnected)
        if c.quota_reserved:
            unused, c.quota_reserved = c.quota_reserved - c.meter.total_flops, 0.0
            gw.spawn(gw.quota.refund(c.key_hash, unused))
        release()

    try:
        if gw.draining:
            raise unavailable("The gateway is shutting down", gw.settings.retry_after_s)
        await gw.admission.acquire()
    except APIError as err:
        released = True  # nothing was acquired
        record_request(gw.metrics, ctx, err.status)
        raise
    try:
        response = await watch(_serve(gw, ctx, req, finish), ctx, is_disconnected)
    except APIError as err:
        if err.code == "budget_exceeded":
            gw.metrics.budget_rejection("too_small")
        finish(ctx, err.status, False)
        raise
    except ClientGone:
        finish(ctx, 499, True)
        return Response(status_code=499)
    except BaseException:
        finish(ctx, 500, False)
        raise
    if isinstance(response, StreamingResponse):
        # The stream's generator calls finish at its end; this also frees the slot if it never started.
        response.background = BackgroundTask(release)
    else:
        release()
    return response


async def _serve(gw: Gateway, ctx: RequestContext, req: Request, finish) -> Response:
    key_policy = gw.settings.key_policies.get(ctx.key_hash) if ctx.key_hash else None
    max_n = min(gw.settings.max_n, key_policy.max_n) if key_policy and key_policy.max_n else gw.settings.max_n
    max_tokens = check_limits(gw, req, max_n)
    opts = parse_options(req.ttc, ctx.headers, gw.settings, key_policy)
    if opts.deadline_ms is not None:
        ctx.deadline = ctx.started + opts.deadline_ms / 1000.0
    budget = effective_budget(gw, opts)
    if key_policy and key_policy.flops_quota:
        # Under a quota every request runs under a budget, reserved whole up front and settled at the end.
        if budget is None or not opts.enforce:
            budget = min(x for x in (budget, key_policy.max_budget_flops, gw.settings.max_budget_flops,
                                     key_policy.flops_quota) if x is not None)
            opts.mode = "enforce"
        try:
            await gw.quota.reserve(ctx.key_hash, budget, key_policy.flops_quota, key_policy.quota_window_s)
        except QuotaExceeded as exc:
            gw.metrics.budget_rejection("quota")
            raise APIError(429, f"This API key's FLOPs quota is spent ({exc.used:.3e} of {exc.limit:.3e} FLOPs)",
                           code="insufficient_quota", type_="insufficient_quota",
                           headers={"Retry-After": str(exc.retry_after_s), "x-should-retry": "false"})
        ctx.quota_reserved = budget
    ctx.budget_flops = budget
    limit = budget if opts.enforce else None
    try:
        if opts.passthrough:
            max_tokens = passthrough_max_tokens(gw, req, max_tokens, limit)
            return await passthrough.forward(gw.policy, gw.response_cache, ctx, req, max_tokens, finish)
        if opts.strategy_name == AUTO:
            if opts.params:
                raise APIError(400, "strategy auto takes no parameters", param="ttc.strategy", code="invalid_value")
            if gw.policy_table is None:
                raise APIError(400, "strategy auto needs a calibrated policy table (TTC_POLICY_TABLE_PATH)",
                               param="ttc.strategy", code="invalid_value")

            def chosen(info: dict) -> None:
                ctx.difficulty = info.get("bin")
                ctx.expected_accuracy = info.get("expected_accuracy")
                if ctx.difficulty is not None:
                    gw.metrics.difficulty(ctx.difficulty)

            strategy = AutoStrategy(gw.policy_table, max_n, chosen)
        else:
            strategy = make_strategy(opts, max_n)
        ctx.strategy = strategy.name
        gw.metrics.strategy(strategy.name)
        reward = gw.reward_for(ctx.meter, ctx.tenant) if strategy.requires_reward else None
        soft_deadline = None
        if ctx.deadline is not None and gw.settings.deadline_action == "best":
            # Stop starting new engine calls early enough for the one in flight to finish before the deadline.
            soft_deadline = ctx.started + 0.7 * (ctx.deadline - ctx.started)
        response = await search.run(gw.policy, reward, ctx, req, strategy, limit, max_tokens, finish, {},
                                    soft_deadline, gw.sample_store, gw.settings.cache_samples_ttl_s)
        return response
    except WorkerUnavailable as exc:
        raise unavailable(f"The {exc.pool} workers are unavailable; retry shortly", gw.settings.retry_after_s)
    except WorkerError as exc:
        if 400 <= exc.status < 500:
            raise APIError(400, exc.message, code="upstream_rejected")
        raise APIError(502, f"The {exc.pool} worker failed: {exc.message}", code="upstream_error")
