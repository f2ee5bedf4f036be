"""One request from validated body to result: admission, limits, budget, strategy choice, then pass-through or
search; deadline and client disconnect watched throughout; metrics recorded once at the end.

`Serving` holds exactly what a request needs (the policy client, admission, quota, caches, metrics, the reward
factory and the policy table), handed to it by the composition root (gateway.py). It speaks no HTTP: it returns a
`results.Result` and raises `errors.ServiceError`s; `status_of` (from api/errors.py) only names the status the
metrics record for an error.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable

from ..budget import (PlainRequestCost, check_sequences, completion_prompt_tokens, effective_budget, prompt_count,
                      run_limit)
from ..cache import SampleStore
from ..config import KeyPolicy, Settings
from ..errors import (DeadlineExceeded, InvalidParameter, QuotaExhausted, ServiceError, Unavailable, UnknownModel,
                      UpstreamError, UpstreamRejected)
from ..metering import Meter
from ..metrics import Metrics
from ..protocol.completions import ChatCompletionRequest, CompletionRequest
from ..router.table import PolicyTable
from ..strategies.base import Reward
from ..workers.policy import PolicyClient
from ..workers.pool import WorkerError, WorkerUnavailable
from . import passthrough, search
from .admission import Admission
from .context import RequestContext
from .lifecycle import CLIENT_GONE, RequestLifecycle
from .options import AUTO, TTCOptions, make_strategy, parse_options
from .passthrough import upstream_payload
from .quota import FlopsQuota, QuotaExceeded, QuotaUnavailable
from .response_cache import ResponseCache
from .results import ClientGone, Result, Stream

Request = ChatCompletionRequest | CompletionRequest
DISCONNECT_POLL_S = 0.25
INTERNAL_ERROR = 500  # what the metrics record for an exception that is not a ServiceError


async def watch(work: Awaitable[Result], ctx: RequestContext,
                is_disconnected: Callable[[], Awaitable[bool]] | None,
                clock: Callable[[], float] = time.monotonic) -> Result:
    """Runs the request's work; cancels it (and so its upstream calls) when the client goes away or the deadline
    passes. Streams return at once: their generators watch for themselves."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            timeout = DISCONNECT_POLL_S
            if ctx.deadline is not None:
                timeout = min(timeout, max(0.0, ctx.deadline - clock()))
            done, _ = await asyncio.wait({task}, timeout=timeout)
            if done:
                return task.result()
            if ctx.deadline is not None and clock() >= ctx.deadline:
                raise DeadlineExceeded("The request deadline passed before an answer was ready",
                                       code="deadline_exceeded")
            if is_disconnected is not None and await is_disconnected():
                raise _ClientLeft()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class _ClientLeft(Exception):
    """The client disconnected before the response was ready."""


class Serving:
    def __init__(self, settings: Settings, policy: PolicyClient, admission: Admission, quota: FlopsQuota,
                 metrics: Metrics, response_cache: ResponseCache, sample_store: SampleStore | None,
                 reward_for: Callable[[Meter, str], Reward], policy_table: PolicyTable | None,
                 status_of: Callable[[ServiceError], int], draining: Callable[[], bool] = lambda: False,
                 prompt_encoder: Callable[[Meter], Any] = lambda meter: None):
        self.settings = settings
        self.policy = policy
        self.admission = admission
        self.quota = quota
        self.metrics = metrics
        self.response_cache = response_cache
        self.sample_store = sample_store
        self.reward_for = reward_for
        self.policy_table = policy_table
        self.status_of = status_of
        self.draining = draining
        # The zero-decode difficulty estimator's encoder for one request (None without a learned PRM worker).
        self.prompt_encoder = prompt_encoder

    def check_limits(self, req: Request, max_n: int) -> int:
        """Returns the max_tokens to use; raises on what the configuration does not allow."""
        s = self.settings
        if req.model != self.policy.model:
            raise UnknownModel(f"The model '{req.model}' does not exist; available: {self.policy.model}",
                               param="model", code="model_not_found")
        prompts = prompt_count(req.prompt) if isinstance(req, CompletionRequest) else 1
        check_sequences(prompts, req.n, max_n)
        requested = req.requested_max_tokens()
        max_tokens = requested if requested is not None else s.default_max_tokens
        if max_tokens > s.max_tokens_cap:
            param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
            raise InvalidParameter(f"{param} must be at most {s.max_tokens_cap}", param=param, code="invalid_value")
        return max_tokens

    async def prompt_tokens(self, req: Request, max_tokens: int) -> list[int]:
        """Exact prompt tokens of a plain request, one count per prompt, from the policy worker's tokenizer."""
        if isinstance(req, ChatCompletionRequest):
            return [await self.policy.count_chat_tokens(upstream_payload(req, self.policy.model, max_tokens))]
        return await completion_prompt_tokens(req.prompt, self.policy.count_tokens)

    async def handle(self, ctx: RequestContext, req: Request,
                     is_disconnected: Callable[[], Awaitable[bool]] | None = None) -> Result:
        ctx.model = req.model if req.model == self.policy.model else "unknown"
        life = RequestLifecycle(ctx, self.metrics, self.admission, self.quota)
        result: Result | None = None
        try:
            if self.draining():
                raise Unavailable("The gateway is shutting down", code="workers_unavailable",
                                  retry_after_s=self.settings.retry_after_s)
            await self.admission.acquire()
            life.admitted = True
            s = self.settings
            key_policy = s.key_policies.get(ctx.key_hash) if ctx.key_hash else None
            max_n = min(s.max_n, key_policy.max_n) if key_policy and key_policy.max_n else s.max_n
            max_tokens = self.check_limits(req, max_n)
            opts = parse_options(req.ttc, ctx.headers, s, key_policy)
            if opts.deadline_ms is not None:
                # Known before anything waits, so the watcher never sleeps past it (counted from arrival).
                ctx.deadline = ctx.started + opts.deadline_ms / 1000.0
            result = await watch(self._serve(ctx, req, opts, key_policy, max_n, max_tokens, life), ctx,
                                 is_disconnected)
        except ServiceError as err:
            if err.code == "budget_exceeded":
                self.metrics.budget_rejection("too_small")
            life.finish(ctx, self.status_of(err), False)
            raise
        except _ClientLeft:
            life.finish(ctx, CLIENT_GONE, True)
            result = ClientGone()
        except BaseException:
            life.finish(ctx, INTERNAL_ERROR, False)
            raise
        finally:
            if not isinstance(result, Stream):
                await life.close_shielded()
        if isinstance(result, Stream):
            # The stream settles the request when it ends or is abandoned.
            result.on_close = life.close_shielded
        return result

    async def _reserve_quota(self, ctx: RequestContext, life: RequestLifecycle, key_policy: KeyPolicy,
                             budget: float) -> None:
        try:
            await life.reserve(ctx.key_hash, budget, key_policy.flops_quota, key_policy.quota_window_s,
                               key_policy.quota_on_redis_failure)
        except QuotaExceeded as exc:
            self.metrics.budget_rejection("quota")
            raise QuotaExhausted(
                f"This API key's FLOPs quota cannot cover this request: {exc.used:.3e} of {exc.limit:.3e} FLOPs "
                f"are used or reserved in this window, and this request reserves up to {exc.amount:.3e} (its "
                f"budget). Retry later or send a smaller X-TTC-Budget-FLOPs.", code="insufficient_quota",
                retry_after_s=exc.retry_after_s)
        except QuotaUnavailable:
            self.metrics.budget_rejection("quota_unavailable")
            raise Unavailable("The quota store is unreachable and this API key has a quota; retry shortly",
                              code="quota_unavailable", retry_after_s=self.settings.retry_after_s)

    async def _serve(self, ctx: RequestContext, req: Request, opts: TTCOptions, key_policy: KeyPolicy | None,
                     max_n: int, max_tokens: int, life: RequestLifecycle) -> Result:
        s = self.settings
        quota = key_policy.flops_quota if key_policy is not None else None
        budget, enforce = run_limit(effective_budget(opts.budget_flops, opts.budget_tokens, self.policy.shape),
                                    opts.enforce, quota,
                                    (key_policy.max_budget_flops if key_policy else None, s.max_budget_flops))
        if enforce:
            opts.mode = "enforce"
        ctx.budget_flops = budget
        limit = budget if enforce else None
        finish = life.finish
        try:
            if opts.passthrough:
                if limit is not None or (isinstance(req, CompletionRequest) and prompt_count(req.prompt) > 1):
                    ctx.prompt_tokens = await self.prompt_tokens(req, max_tokens)
                if limit is not None:
                    cost = PlainRequestCost(self.policy.shape, ctx.prompt_tokens, req.n)
                    max_tokens = cost.max_tokens_within(limit, max_tokens)
                if quota is not None:
                    await self._reserve_quota(ctx, life, key_policy, budget)
                return await passthrough.forward(self.policy, self.response_cache, ctx, req, max_tokens, finish,
                                                 self.status_of)

            def chosen(info: dict) -> None:
                ctx.difficulty = info.get("bin")
                ctx.expected_accuracy = info.get("expected_accuracy")
                if ctx.difficulty is not None:
                    self.metrics.difficulty(ctx.difficulty)

            context = {"table": self.policy_table, "on_choice": chosen,
                       "encoder": self.prompt_encoder(ctx.meter)} if opts.strategy_name == AUTO else {}
            strategy = make_strategy(opts, max_n, **context)
            ctx.strategy = strategy.name
            self.metrics.strategy(strategy.name)
            reward = self.reward_for(ctx.meter, ctx.tenant) if strategy.requires_reward else None
            soft_deadline = None
            if ctx.deadline is not None and s.deadline_action == "best":
                # Stop starting new engine calls early enough for the one in flight to finish before the deadline.
                soft_deadline = ctx.started + 0.7 * (ctx.deadline - ctx.started)
            if quota is not None:
                await self._reserve_quota(ctx, life, key_policy, budget)
            return await search.run(self.policy, reward, ctx, req, strategy, limit, max_tokens, finish, {},
                                    soft_deadline, self.sample_store, s.cache_samples_ttl_s, self.status_of)
        except WorkerUnavailable as exc:
            raise Unavailable(f"The {exc.pool} workers are unavailable; retry shortly", code="workers_unavailable",
                              retry_after_s=s.retry_after_s)
        except WorkerError as exc:
            if 400 <= exc.status < 500:
                raise UpstreamRejected(exc.message, code="upstream_rejected")
            raise UpstreamError(f"The {exc.pool} worker failed: {exc.message}", code="upstream_error")
