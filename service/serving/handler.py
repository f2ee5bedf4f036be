"""One request from validated body to response: limits, model check, strategy choice, then pass-through or search."""

from __future__ import annotations

from starlette.responses import Response

from ..api.errors import APIError, unavailable
from ..api.protocol import ChatCompletionRequest, CompletionRequest
from ..gateway import Gateway
from ..workers.pool import WorkerError, WorkerUnavailable
from . import passthrough, search
from .context import RequestContext
from .observe import record_request
from .options import make_strategy, parse_options

Request = ChatCompletionRequest | CompletionRequest


def check_limits(gw: Gateway, req: Request) -> int:
    """Returns the max_tokens to use; raises 400 on what the configuration does not allow."""
    s = gw.settings
    if req.model != gw.policy.model:
        raise APIError(404, f"The model '{req.model}' does not exist; available: {gw.policy.model}",
                       param="model", code="model_not_found")
    if req.n > s.max_n:
        raise APIError(400, f"n must be at most {s.max_n}", param="n", code="invalid_value")
    requested = req.requested_max_tokens()
    max_tokens = requested if requested is not None else s.default_max_tokens
    if max_tokens > s.max_tokens_cap:
        param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
        raise APIError(400, f"{param} must be at most {s.max_tokens_cap}", param=param, code="invalid_value")
    return max_tokens


async def handle(gw: Gateway, ctx: RequestContext, req: Request) -> Response:
    ctx.model = req.model if req.model == gw.policy.model else "unknown"

    def finish(c: RequestContext, status: int, disconnected: bool) -> None:
        record_request(gw.metrics, c, status, disconnected=disconnected)

    try:
        if gw.draining:
            raise unavailable("The gateway is shutting down", gw.settings.retry_after_s)
        max_tokens = check_limits(gw, req)
        options = parse_options(req.ttc, ctx.headers, gw.settings.default_strategy)
        try:
            if options.passthrough:
                return await passthrough.forward(gw.policy, gw.response_cache, ctx, req, max_tokens, finish)
            strategy = make_strategy(options, gw.settings.max_n)
            ctx.strategy = strategy.name
            gw.metrics.strategy(strategy.name)
            reward = gw.reward_for(ctx.meter, ctx.tenant) if strategy.requires_reward else None
            return await search.run(gw.policy, reward, ctx, req, strategy, options.budget_flops, max_tokens, finish,
                                    {})
        except WorkerUnavailable as exc:
            raise unavailable(f"The {exc.pool} workers are unavailable; retry shortly", gw.settings.retry_after_s)
        except WorkerError as exc:
            if 400 <= exc.status < 500:
                raise APIError(400, exc.message, code="upstream_rejected")
            raise APIError(502, f"The {exc.pool} worker failed: {exc.message}", code="upstream_error")
    except APIError as err:
        finish(ctx, err.status, False)
        raise
