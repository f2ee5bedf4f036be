"""Records one finished request in the metrics, exactly once, whether it ended as JSON, as a stream or as an error."""

from __future__ import annotations

import time

from ..metrics import Metrics
from .context import RequestContext


def record_request(metrics: Metrics, ctx: RequestContext, status: int, *, disconnected: bool = False) -> None:
    if ctx.finished:
        return
    ctx.finished = True
    route = ctx.path or ("/v1/chat/completions" if ctx.route == "chat" else "/v1/completions")
    metrics.request_done(route, ctx.model or "unknown", status, ctx.strategy, time.monotonic() - ctx.started)
    if ctx.first_token_s is not None:
        metrics.first_token(route, ctx.strategy, ctx.first_token_s)
    m = ctx.meter
    metrics.add_tokens(ctx.model or "unknown", prompt=m.policy.prompt_tokens, completion=m.policy.completion_tokens,
                       cached_prompt=m.policy.cached_tokens, reward=m.reward.prompt_tokens)
    if m.total_flops > 0:
        metrics.request_flops_done(ctx.strategy, m.policy.flops, m.reward.flops)
    if disconnected:
        metrics.client_disconnect()
    if ctx.budget_exhausted:
        metrics.budget_exhaustion(ctx.strategy)
