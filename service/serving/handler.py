"""One request from validated body to response: admission, limits, budget, strategy choice, then pass-through or
search; deadline and client disconnect watched throughout; metrics recorded once at the end."""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable

from starlette.responses import Response, StreamingResponse

from ..api.errors import APIError, unavailable
from ..api.protocol import ChatCompletionRequest, CompletionRequest
from ..budget import BudgetError, PlainRequestCost, check_sequences, completion_prompt_tokens, effective_budget, \
    prompt_count
from ..config import KeyPolicy
from ..gateway import Gateway
from ..workers.pool import WorkerError, WorkerUnavailable
from . import passthrough, search
from .context import RequestContext
from .lifecycle import RequestLifecycle
from ..router.auto import AutoStrategy
from .options import AUTO, TTCOptions, make_strategy, parse_options
from .passthrough import upstream_payload
from .quota import QuotaExceeded, QuotaUnavailable

Request = ChatCompletionRequest | CompletionRequest
DISCONNECT_POLL_S = 0.25


def _invalid(err: BudgetError) -> APIError:
    return APIError(400, err.message, param=err.param, code=err.code)


def check_limits(gw: Gateway, req: Request, max_n: int) -> int:
    """Returns the max_tokens to use; raises 400 on what the configuration does not allow."""
    s = gw.settings
    if req.model != gw.policy.model:
        raise APIError(404, f"The model '{req.model}' does not exist; available: {gw.policy.model}",
                       param="model", code="model_not_found")
    prompts = prompt_count(req.prompt) if isinstance(req, CompletionRequest) else 1
    try:
        check_sequences(prompts, req.n, max_n)
    except BudgetError as err:
        raise _invalid(err)
    requested = req.requested_max_tokens()
    max_tokens = requested if requested is not None else s.default_max_tokens
    if max_tokens > s.max_tokens_cap:
        param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
        raise APIError(400, f"{param} must be at most {s.max_tokens_cap}", param=param, code="invalid_value")
    return max_tokens


async def prompt_tokens(gw: Gateway, req: Request, max_tokens: int) -> list[int]:
    """Exact prompt tokens of a plain request, one count per prompt, from the policy worker's tokenizer."""
    if isinstance(req, ChatCompletionRequest):
        return [await gw.policy.count_chat_tokens(upstream_payload(req, gw.policy.model, max_tokens))]
    return await completion_prompt_tokens(req.prompt, gw.policy.count_tokens)


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
    life = RequestLifecycle(ctx, gw.metrics, gw.admission, gw.quota)
    response: Response | None = None
    try:
        if gw.draining:
            raise unavailable("The gateway is shutting down", gw.settings.retry_after_s)
        await gw.admission.acquire()
        life.admitted = True
        key_policy = gw.settings.key_policies.get(ctx.key_hash) if ctx.key_hash else None
        max_n = min(gw.settings.max_n, key_policy.max_n) if key_policy and key_policy.max_n else gw.settings.max_n
        max_tokens = check_limits(gw, req, max_n)
        opts = parse_options(req.ttc, ctx.headers, gw.settings, key_policy)
        if opts.deadline_ms is not None:
            # Known before anything waits, so the watcher never sleeps past it (counted from arrival).
            ctx.deadline = ctx.started + opts.deadline_ms / 1000.0
        response = await watch(_serve(gw, ctx, req, opts, key_policy, max_n, max_tokens, life), ctx,
                               is_disconnected)
    except APIError as err:
        if err.code == "budget_exceeded":
            gw.metrics.budget_rejection("too_small")
        life.finish(ctx, err.status, False)
        raise
    except ClientGone:
        life.finish(ctx, 499, True)
        response = Response(status_code=499)
    except BaseException:
        life.finish(ctx, 500, False)
        raise
    finally:
        if not isinstance(response, StreamingResponse):
            await life.close_shielded()
    if isinstance(response, StreamingResponse):
        # The stream settles the request when it ends or is abandoned.
        return life.settling(response)
    return response


async def _reserve_quota(gw: Gateway, ctx: RequestContext, life: RequestLifecycle, key_policy: KeyPolicy,
                         budget: float) -> None:
    try:
        await life.reserve(ctx.key_hash, budget, key_policy.flops_quota, key_policy.quota_window_s,
                           key_policy.quota_on_redis_failure)
    except QuotaExceeded as exc:
        gw.metrics.budget_rejection("quota")
        raise APIError(429, f"This API key's FLOPs quota cannot cover this request: {exc.used:.3e} of "
                            f"{exc.limit:.3e} FLOPs are used or reserved in this window, and this request reserves "
                            f"up to {exc.amount:.3e} (its budget). Retry later or send a smaller "
                            f"X-TTC-Budget-FLOPs.", code="insufficient_quota", type_="insufficient_quota",
                       headers={"Retry-After": str(exc.retry_after_s), "x-should-retry": "false"})
    except QuotaUnavailable:
        gw.metrics.budget_rejection("quota_unavailable")
        raise APIError(503, "The quota store is unreachable and this API key has a quota; retry shortly",
                       code="quota_unavailable", headers={"Retry-After": str(gw.settings.retry_after_s)})


async def _serve(gw: Gateway, ctx: RequestContext, req: Request, opts: TTCOptions, key_policy: KeyPolicy | None,
                 max_n: int, max_tokens: int, life: RequestLifecycle) -> Response:
    budget = effective_budget(opts.budget_flops, opts.budget_tokens, gw.policy.shape)
    quota = key_policy is not None and key_policy.flops_quota is not None
    if quota:
        # Under a quota every request runs under an enforced budget, reserved whole and settled at the end.
        if budget is None or not opts.enforce:
            budget = min(x for x in (budget, key_policy.max_budget_flops, gw.settings.max_budget_flops,
                                     key_policy.flops_quota) if x is not None)
            opts.mode = "enforce"
    ctx.budget_flops = budget
    limit = budget if opts.enforce else None
    finish = life.finish
    try:
        if opts.passthrough:
            if limit is not None or (isinstance(req, CompletionRequest) and prompt_count(req.prompt) > 1):
                ctx.prompt_tokens = await prompt_tokens(gw, req, max_tokens)
            if limit is not None:
                cost = PlainRequestCost(gw.policy.shape, ctx.prompt_tokens, req.n)
                max_tokens = cost.max_tokens_within(limit, max_tokens)
            if quota:
                await _reserve_quota(gw, ctx, life, key_policy, budget)
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

            strategy = AutoStrategy(gw.policy_table, max_n, chosen, gw.prompt_encoder(ctx.meter))
        else:
            strategy = make_strategy(opts, max_n)
        ctx.strategy = strategy.name
        gw.metrics.strategy(strategy.name)
        reward = gw.reward_for(ctx.meter, ctx.tenant) if strategy.requires_reward else None
        soft_deadline = None
        if ctx.deadline is not None and gw.settings.deadline_action == "best":
            # Stop starting new engine calls early enough for the one in flight to finish before the deadline.
            soft_deadline = ctx.started + 0.7 * (ctx.deadline - ctx.started)
        if quota:
            await _reserve_quota(gw, ctx, life, key_policy, budget)
        response = await search.run(gw.policy, reward, ctx, req, strategy, limit, max_tokens, finish, {},
                                    soft_deadline, gw.sample_store, gw.settings.cache_samples_ttl_s)
        return response
    except BudgetError as err:
        raise _invalid(err)
    except WorkerUnavailable as exc:
        raise unavailable(f"The {exc.pool} workers are unavailable; retry shortly", gw.settings.retry_after_s)
    except WorkerError as exc:
        if 400 <= exc.status < 500:
            raise APIError(400, exc.message, code="upstream_rejected")
        raise APIError(502, f"The {exc.pool} worker failed: {exc.message}", code="upstream_error")
