"""DeepConf online early termination that really aborts samples: the per-token stopping rule, best-of-N's online
mode on fakes with scripted log-probabilities (exact stop points, metering, budget, seeds, the vote, the fallback
without `generate_stoppable`), the wrappers that must pass it through, MeteredPolicy's streamed samples on the
in-memory worker and the whole request through the API."""

from __future__ import annotations

import random

import pytest

from service.metering import Meter
from service.rewards import ConfidenceReward
from service.rewards.confidence import RecordingPolicy
from service.serving.sample_reuse import SampleReusingPolicy
from service.strategies import StrategyParamError, build_strategy
from service.strategies.base import Problem, SamplingParams
from service.strategies.confidence import OnlineStop, first_stop, token_confidence, warmup_threshold
from service.workers.policy import ABORT_SLACK_TOKENS, MeteredPolicy, PolicyClient
from tests.unit.fakes import BASE_PROMPT, FakePolicy, FakeStoppablePolicy, FlopMeter, round_robin, tokens

from .serving_fakes import SHAPE, FakeRuntime, FakeWorkerPool, settings, sse_data

PROBLEM = Problem(prompt=BASE_PROMPT, question="Q", max_tokens=40, seed=1)
PROMPT_TOKENS = len(tokens(BASE_PROMPT))


def scripted(word: str) -> float:
    """Scripted token confidence: a word "x6.5" has confidence 6.5, every other word 8."""
    w = word.strip()
    return float(w[1:]) if w.startswith("x") and w[1:].replace(".", "").isdigit() else 8.0


def trace(text: str) -> list[float]:
    return [scripted(w) for w in tokens(text)]


# Warm-up: lowest windows (2 tokens) 6 and 7, so eta 50 puts the threshold at 6.5.
WARM_A = "x6 x6 x8 x8\nThe answer is 4."
WARM_B = "x8 x8 x7 x7\nThe answer is 4."
NEVER = "x8 x8 x8 x5 x8 x8\nThe answer is 5."  # windows reach 6.5 exactly: not below, runs to the end
AT_3 = "x8 x8 x4 x8 x8\nThe answer is 5."  # window (8, 4) = 6 at token 3
AT_2 = "x6 x6 x6\nThe answer is 9."  # window (6, 6) at token 2
SCRIPT = [WARM_A, WARM_B, NEVER, AT_3, AT_2, WARM_A]
ONLINE = {"n": 6, "selection": "confidence", "online": True, "warmup": 2, "eta": 50, "confidence_window": 2}


class Capturing(FakeStoppablePolicy):
    """Keeps every completion generate_stoppable returned."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.stoppable_out = []

    async def generate_stoppable(self, prompt, params, n, should_stop):
        out = await super().generate_stoppable(prompt, params, n, should_stop)
        self.stoppable_out += out
        return out


def test_online_stop_fires_exactly_where_first_stop_does():
    rng = random.Random(3)
    for _ in range(500):
        conf = [rng.choice([1.0, 2.5, 4.0, 6.0, 8.0]) for _ in range(rng.randint(0, 30))]
        window, threshold = rng.randint(1, 6), rng.uniform(1.0, 8.0)
        monitor = OnlineStop(window, threshold)
        fired = next((i + 1 for i, c in enumerate(conf) if monitor.push(c)), None)
        assert fired == first_stop(conf, window, threshold)


async def test_an_aborted_sample_stops_at_the_first_token_below_the_threshold():
    meter = FlopMeter()
    policy = Capturing(round_robin(SCRIPT), meter, confidence=scripted)
    result = await build_strategy("best_of_n", ONLINE).run(PROBLEM, policy, None, meter.budget(None))
    threshold = warmup_threshold([6.0, 7.0], 50)
    assert threshold == 6.5
    online = result.details["online"]
    assert online["aborted"] is True and online["threshold"] == 6.5 and online["samples_aborted"] == 3
    expected = [first_stop(trace(s), 2, threshold) for s in SCRIPT[2:]]
    assert expected == [None, 3, 2, 2]
    out = policy.stoppable_out
    assert [c.finish_reason for c in out] == ["stop", "abort", "abort", "abort"]
    assert [c.token_count for c in out[1:]] == [3, 2, 2] == online["aborted_at"]
    assert out[1].text == "x8 x8 x4 " and len(out[1].top_logprobs) == 3
    # Two calls: the warm-up batch, then the stoppable samples; the engine never saw the aborted tails.
    assert [call.ns for call in policy.calls] == [[2], [4]]
    full = sum(len(tokens(s)) for s in SCRIPT[:3])
    assert online["tokens_generated"] == result.completion_tokens == full + 3 + 2 + 2
    assert online["tokens_without_abort_at_most"] == full + 3 * 40
    # Tokens metered = tokens generated (the fake charges one FLOP per prompt or generated token).
    assert meter.total == 6 * PROMPT_TOKENS + result.completion_tokens
    # Aborted samples do not vote: the warm-up (4, confidences 6 and 7) against NEVER (5, 6.5).
    assert result.answer == "4" and result.details["candidates"] == 3
    assert {answer for answer, _ in result.details["tally"]} == {"4", "5"}


async def test_tokens_in_flight_after_the_abort_are_metered_and_reported():
    meter = FlopMeter()
    policy = FakeStoppablePolicy(round_robin(SCRIPT), meter, confidence=scripted, inflight=2)
    result = await build_strategy("best_of_n", ONLINE).run(PROBLEM, policy, None, meter.budget(None))
    full = sum(len(tokens(s)) for s in SCRIPT[:2])
    assert policy.generated == len(tokens(NEVER)) + 5 + 4 + 4  # stops at 3, 2, 2 plus 2 in flight each
    assert result.completion_tokens == full + policy.generated == result.details["online"]["tokens_generated"]
    assert meter.total == 6 * PROMPT_TOKENS + result.completion_tokens


@pytest.mark.parametrize("case", range(40))
async def test_the_budget_is_never_exceeded_with_random_scripted_traces(case):
    rng = random.Random(case)
    script = [" ".join(f"x{rng.choice([1, 3, 5, 7, 8])}" for _ in range(rng.randint(1, 12)))
              + f"\nThe answer is {rng.randrange(3)}." for _ in range(rng.randint(2, 8))]
    n = rng.randint(2, 8)
    params = {"n": n, "selection": "confidence", "online": True, "warmup": rng.randint(1, n - 1),
              "eta": rng.choice([10, 50, 90]), "confidence_window": rng.randint(1, 4)}
    meter = FlopMeter()
    policy = FakeStoppablePolicy(round_robin(script), meter, confidence=scripted, inflight=rng.randint(0, 3))
    problem = Problem(prompt=BASE_PROMPT, question="Q", max_tokens=rng.randint(4, 20), seed=case)
    worst = n * (PROMPT_TOKENS + problem.max_tokens)
    limit = rng.uniform(0.2, 1.2) * worst
    result = await build_strategy("best_of_n", params).run(problem, policy, None, meter.budget(limit))
    assert meter.total <= limit
    assert meter.total == result.samples * PROMPT_TOKENS + result.completion_tokens
    assert result.samples <= n
    if result.samples and result.details["online"].get("aborted"):  # else the budget left no sample to stop
        assert result.details["online"]["tokens_generated"] == result.completion_tokens


async def test_without_generate_stoppable_online_falls_back_to_reporting():
    online = await build_strategy("best_of_n", ONLINE).run(
        PROBLEM, FakePolicy(round_robin(SCRIPT), confidence=scripted), None, FlopMeter().budget(None))
    report = await build_strategy("best_of_n", dict(ONLINE, online=False)).run(
        PROBLEM, FakePolicy(round_robin(SCRIPT), confidence=scripted), None, FlopMeter().budget(None))
    details = online.details["online"]
    assert details["aborted"] is False and details["would_stop"] == 3 and "cannot abort" in details["reason"]
    assert "reason" not in report.details["online"]
    assert (online.answer, online.completion_tokens, online.details["confidences"]) == \
        (report.answer, report.completion_tokens, report.details["confidences"])
    # The report-only mode's saving on the same traces: NEVER runs on, the others stop at 3, 2 and 2.
    assert details["tokens_saved_if_aborted"] == sum(len(tokens(s)) for s in SCRIPT[3:]) - 7


async def test_seeded_samples_get_the_seeds_of_the_one_call_and_repeat():
    seeds = []
    for _ in range(2):
        policy = FakeStoppablePolicy(round_robin(SCRIPT), confidence=scripted)
        await build_strategy("best_of_n", ONLINE).run(PROBLEM, policy, None, FlopMeter().budget(None))
        assert policy.calls[0].params.seed == 1  # the warm-up batch: children 1, 2 in vLLM
        seeds.append(policy.sample_seeds)
    assert seeds[0] == seeds[1] == [3, 4, 5, 6]  # samples 2..5 of the report-only n=6 call: distinct, repeatable
    policy = FakeStoppablePolicy(round_robin(SCRIPT), confidence=scripted)
    await build_strategy("best_of_n", ONLINE).run(Problem(prompt=BASE_PROMPT, question="Q", max_tokens=40),
                                                  policy, None, FlopMeter().budget(None))
    assert policy.sample_seeds == [None] * 4  # unseeded: every request draws its own


def test_online_is_validated_by_name():
    for params in [{"online": True}, {"selection": "majority", "online": True},
                   {"selection": "confidence", "online": True, "n": 4, "warmup": 4},
                   {"selection": "confidence", "online": "yes"}]:
        with pytest.raises(StrategyParamError) as exc:
            build_strategy("best_of_n", params)
        assert exc.value.param == "online"
    assert build_strategy("best_of_n", {"selection": "confidence", "online": True, "n": 5}).params.online


async def test_wrappers_pass_generate_stoppable_through():
    inner = FakeStoppablePolicy(round_robin(SCRIPT), confidence=scripted)
    reward = ConfidenceReward()
    recording = reward.wrap_policy(inner)
    assert isinstance(recording, RecordingPolicy) and hasattr(recording, "generate_stoppable")
    assert not hasattr(reward.wrap_policy(FakePolicy(round_robin(SCRIPT))), "generate_stoppable")
    out = await recording.generate_stoppable(BASE_PROMPT, SamplingParams(max_tokens=20), 2, lambda i, top: False)
    assert inner.calls[-1].params.top_logprobs == 20 and len(reward.ledger.entries) == 2  # asked for and recorded
    reusing = SampleReusingPolicy(inner, None, "t", 60.0)  # type: ignore[arg-type]
    assert len(await reusing.generate_stoppable(BASE_PROMPT, SamplingParams(max_tokens=20, top_logprobs=2), 3,
                                                lambda i, top: True)) == 3
    assert [c.token_count for c in out] == [len(tokens(WARM_A)), len(tokens(WARM_B))]
    # Through the strategy with the confidence verifier configured (BudgetedCalls wraps the policy): still aborts.
    policy = FakeStoppablePolicy(round_robin(SCRIPT), confidence=scripted)
    result = await build_strategy("best_of_n", ONLINE).run(PROBLEM, policy, ConfidenceReward(),
                                                           FlopMeter().budget(None))
    assert result.details["online"]["samples_aborted"] == 3


async def test_adaptive_batches_after_the_warmup_are_stoppable():
    # The first batch disagrees (4 and 5), so the vote is not settled and more batches follow.
    policy = FakeStoppablePolicy(round_robin([WARM_A, NEVER, AT_3, AT_2]), confidence=scripted)
    params = dict(ONLINE, n=8, consensus=0.99)
    result = await build_strategy("best_of_n", params).run(PROBLEM, policy, None, FlopMeter().budget(None))
    online = result.details["online"]
    # Threshold 6.25 (WARM_A 6, NEVER 6.5): AT_3, AT_2 and WARM_A stop after the warm-up, NEVER runs on.
    assert online["aborted"] is True and online["threshold"] == 6.25 and online["samples_aborted"] == 5
    assert result.details["adaptive"]["batches"] == len(policy.calls) == 4 and policy.sample_seeds
    assert result.answer == "5"  # WARM_A (6) against NEVER twice (6.5 each); the aborted ones do not vote


# --- MeteredPolicy on the in-memory worker ---------------------------------------------------------------------

def _policy(pool: FakeWorkerPool, meter: Meter) -> MeteredPolicy:
    return MeteredPolicy(PolicyClient(pool, SHAPE), meter)  # type: ignore[arg-type]


def _stop(window: int, threshold: float):
    monitors: dict[int, OnlineStop] = {}
    return lambda i, top: monitors.setdefault(i, OnlineStop(window, threshold)).push(token_confidence(top))


@pytest.mark.parametrize("chunk_tokens,prefetch", [(1, 0), (3, 0), (1, 2)])
async def test_metered_policy_streams_stops_and_meters_what_was_generated(chunk_tokens, prefetch):
    pool = FakeWorkerPool(answer=lambda prompt: "a b c d e f g h")
    pool.chunk_tokens, pool.prefetch = chunk_tokens, prefetch
    # Sample 0 (of this worker) turns unsure at its 4th token, sample 1 never.
    pool.confidence = lambda sample, token: 2.0 if sample == 0 and token >= 3 else 8.0
    meter = Meter()
    params = SamplingParams(max_tokens=8, top_logprobs=3, seed=10)
    out = await _policy(pool, meter).generate_stoppable("P", params, 2, _stop(2, 6.0))
    assert [s["payload"]["seed"] for s in pool.streams] == [10, 11]
    assert all(s["payload"]["stream"] and s["payload"]["logprobs"] == 3 for s in pool.streams)
    stopped, full = out
    assert stopped.finish_reason == "abort" and stopped.token_count == 4 and stopped.text == "a b c d "
    assert stopped.top_logprobs == [[-8.0] * 3] * 3 + [[-2.0] * 3] and stopped.token_offsets == [0, 2, 4, 6]
    # Received: up to the stopping token, the rest of its chunk, and the chunks that had arrived unread.
    sent = pool.streams[0]["sent"]
    assert sent == {(1, 0): 4, (3, 0): 6, (1, 2): 6}[chunk_tokens, prefetch] and pool.streams[0]["finished"] is False
    assert stopped.engine_tokens == min(8, sent + ABORT_SLACK_TOKENS) >= sent
    assert full.finish_reason == "stop" and full.token_count == 8 and full.engine_tokens is None
    assert pool.streams[1]["finished"] is True and full.text == "a b c d e f g h"
    # Metered: every token sent (the aborted one's bound), never less; the prompt of each request once.
    assert meter.policy.completion_tokens == stopped.engine_tokens + 8 >= sent + 8
    assert meter.policy.prompt_tokens == 2


# --- the whole request through the API -------------------------------------------------------------------------

TTC = {"strategy": "best_of_n", "n": 6, "selection": "confidence", "online": True, "warmup": 2, "eta": 50,
       "confidence_window": 2}


def _runtime() -> FakeRuntime:
    rt = FakeRuntime(settings())
    # Warm-up samples 0 and 1 are sure throughout (threshold 8); later even-numbered samples doubt at token 2.
    rt.pool.confidence = lambda sample, token: 1.0 if sample >= 2 and sample % 2 == 0 and token == 2 else 8.0
    return rt


@pytest.mark.parametrize("stream", [False, True])
async def test_online_best_of_n_through_the_api_aborts_within_the_budget(stream):
    rt = _runtime()
    budget = 1.0e9
    body = {"model": "tiny", "messages": [{"role": "user", "content": "What is 2 + 2?"}], "max_tokens": 16,
            "seed": 5, "ttc": TTC}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    async with rt.client() as client:
        r = await client.post("/v1/chat/completions", json=body, headers={"X-TTC-Budget-FLOPs": str(budget)})
    assert r.status_code == 200, r.text
    if stream:
        last = [e for e in sse_data(r.text) if isinstance(e, dict)][-1]
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in sse_data(r.text)
                       if isinstance(e, dict) and e["choices"])
        usage, ttc = last["usage"], last["ttc"]
    else:
        text, usage, ttc = r.json()["choices"][0]["message"]["content"], r.json()["usage"], r.json()["ttc"]
    assert text == "2 + 2 = 4\nThe answer is 4." and usage["flops"] <= budget
    online = ttc["details"]["online"]
    assert online["aborted"] is True and online["samples_aborted"] == 2 and online["aborted_at"] == [3, 3]
    streams = rt.pool.streams
    assert len(streams) == 4 and [s["finished"] for s in streams] == [False, True, False, True]
    # Usage and meter: the warm-up's and the finished streams' 9 tokens each, the aborted ones' bound.
    bound = sum(min(16, s["sent"] + ABORT_SLACK_TOKENS) for s in streams if not s["finished"])
    assert usage["completion_tokens"] == 4 * 9 + bound == online["tokens_generated"]
    assert usage["completion_tokens"] >= 4 * 9 + sum(s["sent"] for s in streams if not s["finished"])


async def test_separate_requests_are_budgeted_with_one_prompt_each():
    # One n=N request prefills the prompt once; N streamed requests may prefill it N times. The stoppable call is
    # checked against the latter, so the meter (which charges each stream's prompt) cannot pass the budget.
    from service.strategies.base import ComputeBudget
    from service.strategies.calls import BudgetedCalls

    pool = FakeWorkerPool(answer=lambda prompt: "a b c d e f g h")
    meter = Meter()
    policy = _policy(pool, meter)
    # With a known KV block size an n=N request's samples after the first recompute only the prompt's last block.
    policy.client.block_size = 16
    params = SamplingParams(max_tokens=8, top_logprobs=2)
    prompt = "a long prompt " * 20
    await policy.count_prompt_tokens([prompt])
    batched, one = policy.estimate_flops([prompt], params, 4), policy.estimate_flops([prompt], params, 1)
    assert batched < 4 * one
    calls = BudgetedCalls(policy, None, ComputeBudget(batched, lambda: meter.total_flops))
    assert calls.affordable_separate(prompt, params, 4) < 4
    assert await calls.generate_stoppable(prompt, params, 4, lambda i, top: False) is None and calls.exhausted
    calls = BudgetedCalls(policy, None, ComputeBudget(4 * one, lambda: meter.total_flops))
    out = await calls.generate_stoppable(prompt, params, 4, lambda i, top: False)
    assert len(out) == 4 and meter.total_flops <= 4 * one and meter.policy.prompt_tokens == 4 * len(prompt)


async def test_online_without_confidence_is_400_naming_the_field():
    async with FakeRuntime(settings()).client() as client:
        r = await client.post("/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": "Hi"}],
            "ttc": {"strategy": "best_of_n", "selection": "majority", "online": True}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "ttc.online"
