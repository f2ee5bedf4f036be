"""Requests that run a test-time strategy: build the problem, run the strategy against the metered policy and reward,
answer as JSON or as a real stream (keep-alives while searching, the fixed shared prefix as soon as it is known)."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable

from ..budget import ComputeBudget, check_one_answer
from ..errors import InvalidParameter, ServiceError, Unavailable
from ..protocol.completions import (ECHOED_MESSAGE_FIELDS, PASSTHROUGH_ONLY_FIELDS, STRATEGY_SAMPLING_FIELDS,
                            ChatCompletionRequest, CompletionRequest)
from ..strategies import Strategy
from ..strategies.base import Problem, SamplingParams
from ..cache import SampleStore, parse_cache_control
from ..workers.policy import MeteredPolicy, PolicyClient
from ..workers.pool import WorkerError, WorkerUnavailable
from . import sse
from .context import RequestContext
from .passthrough import Finish
from .sample_reuse import SampleReusingPolicy
from .lifecycle import CLIENT_GONE, OK
from .bodies import answer, chunk, search_ttc, usage, usage_chunk
from .results import Answer, Result, Stream

KEEP_ALIVE_S = 5.0
INTERNAL = 500


# Strategies that sample whole answers, so each candidate can be guided to one JSON value; the step-wise searches
# continue partial texts, which a JSON grammar restarted at every step would not respect.
STRUCTURED_STRATEGIES = ("best_of_n", "greedy")


def check_supported(req: ChatCompletionRequest | CompletionRequest, strategy: str) -> None:
    """What a strategy cannot honour is a 400 naming the field, never silently dropped."""
    if getattr(req, "tools", None):
        raise InvalidParameter(f"strategy {strategy} does not support tool calls; use strategy none", param="tools",
                               code="unsupported_parameter")
    for name in PASSTHROUGH_ONLY_FIELDS:
        value = getattr(req, name, None)
        if value is not None and not (name == "tool_choice" and value == "none"):
            raise InvalidParameter(f"{name} is not supported with strategy {strategy}; use strategy none",
                                   param=name, code="unsupported_parameter")
    if req.response_format is not None and req.response_format.structured and strategy not in STRUCTURED_STRATEGIES:
        raise InvalidParameter(f"strategy {strategy} does not support response_format (it extends partial answers "
                               f"step by step); use {', '.join(STRUCTURED_STRATEGIES)} or none",
                               param="response_format", code="unsupported_parameter")


def sampling_extras(req: ChatCompletionRequest | CompletionRequest) -> dict[str, Any]:
    """What every engine call of the search carries besides its own parameters: the client's per-token sampling
    controls and, for structured answers, the same guided decoding."""
    extra = {name: getattr(req, name) for name in STRATEGY_SAMPLING_FIELDS if getattr(req, name) is not None}
    if req.response_format is not None and req.response_format.structured:
        extra["response_format"] = req.response_format.wire()
    return extra


async def build_problem(policy: PolicyClient, ctx: RequestContext, req: ChatCompletionRequest | CompletionRequest,
                        max_tokens: int) -> tuple[Problem, int]:
    """The problem and its prompt's token count (what usage.prompt_tokens reports: the prompt, once)."""
    if isinstance(req, ChatCompletionRequest):
        messages = [m.model_dump(exclude_none=True, exclude=set(ECHOED_MESSAGE_FIELDS)) for m in req.messages]
        # The worker's own chat template, exactly what vLLM's chat endpoint would feed the model.
        tok = await policy.pool.post_json("/tokenize", {"model": policy.model, "messages": messages,
                                                        "add_generation_prompt": True})
        text = await policy.pool.post_json("/detokenize", {"model": policy.model, "tokens": tok["tokens"]})
        prompt, prompt_tokens = text["prompt"], len(tok["tokens"])
        users = [m.text() for m in req.messages if m.role == "user"]
        question = users[-1] if users else req.messages[-1].text()
    else:
        text = req.single_text_prompt()
        if text is None:
            raise InvalidParameter("A ttc strategy takes a single text prompt", param="prompt", code="invalid_value")
        prompt = question = text
        tok = await policy.pool.post_json("/tokenize", {"model": policy.model, "prompt": prompt})
        prompt_tokens = int(tok.get("count") or len(tok.get("tokens") or ()))
    structured = req.response_format is not None and req.response_format.structured
    problem = Problem(prompt=prompt, question=question, max_tokens=max_tokens,
                      # Problem's own default (the one home of the search temperature) unless the client set one.
                      temperature=Problem.temperature if req.temperature is None else req.temperature,
                      top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed, stop=tuple(req.stop or ()),
                      structured=structured)
    return problem, prompt_tokens


async def run(policy_client: PolicyClient, reward: Any, ctx: RequestContext,
              req: ChatCompletionRequest | CompletionRequest, strategy: Strategy, budget_flops: float | None,
              max_tokens: int, finish: Finish, extra: dict[str, Any], soft_deadline: float | None = None,
              sample_store: SampleStore | None = None, samples_ttl_s: float = 3600.0,
              status_of: Callable[[ServiceError], int] | None = None) -> Result:
    if req.n != 1:
        raise InvalidParameter("n must be 1 with a ttc strategy; the number of samples is ttc.n", param="n",
                               code="invalid_value")
    check_supported(req, strategy.name)
    problem, prompt_tokens = await build_problem(policy_client, ctx, req, max_tokens)
    policy = MeteredPolicy(policy_client, ctx.meter, sampling_extras(req))
    if sample_store is not None and strategy.name == "best_of_n":
        cc = parse_cache_control(ctx.headers.get("cache-control"))
        policy = SampleReusingPolicy(policy, sample_store, ctx.tenant, samples_ttl_s, read=not cc.no_cache,
                                     write=not cc.no_store)
    budget = ComputeBudget(budget_flops, lambda: ctx.meter.total_flops, deadline=soft_deadline)
    await policy_client.count_tokens([problem.prompt])  # the check below then uses the exact prompt tokens
    one_answer = policy.estimate_flops([problem.prompt], SamplingParams(max_tokens=max_tokens, temperature=0.0))
    check_one_answer(budget, one_answer, max_tokens)
    reward_name = getattr(reward, "name", None)
    if not req.stream:
        result = await strategy.run(problem, policy, reward, budget)
        ctx.budget_exhausted = result.budget_exhausted
        ttc = search_ttc(ctx, strategy, reward_name, result, extra, policy)
        body = answer(ctx.route, ctx.response_id, ctx.created, policy_client.model, result.text,
                      result.finish_reason, usage(ctx.meter, prompt_tokens, result.completion_tokens), ttc)
        finish(ctx, OK, False)
        return Answer(body)
    return Stream(_stream(policy_client.model, ctx, strategy, problem, policy, reward, budget, req.include_usage,
                          finish, extra, prompt_tokens, status_of))


async def _stream(model: str, ctx: RequestContext, strategy: Strategy, problem: Problem, policy: Any,
                  reward: Any, budget: ComputeBudget, include_usage: bool, finish: Finish,
                  extra: dict[str, Any], prompt_tokens: int,
                  status_of: Callable[[ServiceError], int] | None) -> AsyncIterator[bytes]:
    queue: asyncio.Queue[str] = asyncio.Queue()

    async def progress(text: str) -> None:
        await queue.put(text)

    rid = ctx.response_id
    task = asyncio.create_task(strategy.run(problem, policy, reward, budget, progress))
    sent = ""
    status, disconnected = CLIENT_GONE, True
    getter: asyncio.Future | None = None
    try:
        if ctx.route == "chat":
            yield sse.event(chunk(ctx, rid, model, role=True, content=""))
        while not (task.done() and queue.empty()):
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter, task}, timeout=KEEP_ALIVE_S, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                text = getter.result()
                ctx.mark_first_token()
                sent += text
                yield sse.event(chunk(ctx, rid, model, content=text))
            else:
                getter.cancel()
                if not done:
                    # Proxies close idle streams; a comment line keeps this one open while the search runs.
                    yield sse.KEEP_ALIVE
        result = task.result()
        ctx.budget_exhausted = result.budget_exhausted
        rest = result.text[len(sent):] if result.text.startswith(sent) else result.text
        if rest:
            ctx.mark_first_token()
            yield sse.event(chunk(ctx, rid, model, content=rest))
        yield sse.event(chunk(ctx, rid, model, finish_reason=result.finish_reason))
        if include_usage:
            ttc = search_ttc(ctx, strategy, getattr(reward, "name", None), result, extra, policy)
            yield sse.event(usage_chunk(ctx, rid, model, usage(ctx.meter, prompt_tokens, result.completion_tokens),
                                        ttc))
        yield sse.DONE
        status, disconnected = OK, False
    except (WorkerUnavailable, WorkerError) as exc:
        detail = exc.detail if isinstance(exc, WorkerUnavailable) else exc.message
        error = Unavailable(f"search failed: {detail}", code="workers_unavailable")
        yield sse.error_event(error.message, "service_unavailable", error.code)
        yield sse.DONE
        status, disconnected = (status_of(error) if status_of else INTERNAL), False
    finally:
        # A client that goes away cancels or closes this generator: cancel the search and, with it, its upstream
        # calls, and the pending queue read (left pending, it is destroyed with a warning).
        if getter is not None and not getter.done():
            getter.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        finish(ctx, status, disconnected)
