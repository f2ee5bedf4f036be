import math
import random

import pytest

from service.strategies import build_strategy
from service.strategies.base import Problem
from service.strategies.rebase import rebase_widths
from tests.unit.fakes import (
    BASE_PROMPT,
    FakeMultiPolicy,
    FakePolicy,
    FakeReward,
    FlopMeter,
    random_solutions,
    round_robin,
)

PROBLEM = Problem(prompt=BASE_PROMPT, question="Q", max_tokens=60)


def test_widths_sum_exactly_to_the_budget_over_random_rewards():
    rng = random.Random(0)
    for _ in range(3000):
        rewards = [rng.choice([rng.random(), round(rng.random(), 1), 0.0, 1.0]) for _ in range(rng.randint(1, 12))]
        budget = rng.randint(0, 64)
        temperature = rng.choice([0.01, 0.1, 0.2, 1.0, 5.0])
        widths = rebase_widths(rewards, budget, temperature)
        assert sum(widths) == budget and len(widths) == len(rewards) and min(widths) >= 0
        # A higher reward never gets fewer children.
        for i in range(len(rewards)):
            for j in range(len(rewards)):
                if rewards[i] > rewards[j]:
                    assert widths[i] >= widths[j], (rewards, budget, temperature, widths)


def test_widths_follow_wu_et_al_sequential_ceil():
    rewards, budget, t = [0.2, 0.9, 0.5], 7, 0.2
    e = {r: math.exp(r / t) for r in rewards}
    first = math.ceil(7 * e[0.9] / sum(e.values()))
    second = math.ceil((7 - first) * e[0.5] / (e[0.5] + e[0.2]))
    assert rebase_widths(rewards, budget, t) == [7 - first - second, first, second]
    assert rebase_widths([0.5, 0.5, 0.5, 0.5], 6, 0.2) == [2, 2, 1, 1]  # ties: input order
    assert rebase_widths([1.0, 0.0], 4, 0.01) == [4, 0]  # cold: all to the best
    assert rebase_widths([0.3], 0, 0.1) == [0] and rebase_widths([], 5, 0.1) == []


async def _run(params, solutions, policy_cls=FakeMultiPolicy, budget=None, reward_flops=0.0, seed=0):
    meter = FlopMeter()
    policy = policy_cls(round_robin(solutions), meter, seed=seed)
    reward = FakeReward(meter=meter, flops_per_step=reward_flops)
    sent: list[str] = []

    async def progress(text: str) -> None:
        sent.append(text)

    result = await build_strategy("rebase", params).run(PROBLEM, policy, reward, meter.budget(budget), progress)
    return result, policy, reward, meter, "".join(sent)


SOLUTIONS = [
    "a good\nb good\nThe answer is 1.",
    "a good\nb bad\nThe answer is 2.",
    "a bad\nc meh\nd meh\nThe answer is 3.",
    "a meh\nThe answer is 4.",
]


async def test_one_batched_call_per_round_with_widths_summing_to_remaining_budget():
    result, policy, reward, _, _ = await _run({"n": 8}, SOLUTIONS)
    assert len(policy.calls) == len(reward.calls) == result.details["rounds"]
    assert policy.calls[0].ns == [8]
    finished_before = 0
    for call, scored in zip(policy.calls, reward.calls):
        assert sum(call.ns) == 8 - finished_before  # B shrinks by one per finished node
        finished_before += sum(1 for steps in scored if steps[-1].startswith("The answer is"))
    assert result.details["finished_count"] == 8  # exactly N answers
    assert result.answer is not None


async def test_better_nodes_get_more_children():
    _, policy, _, _, _ = await _run({"n": 8, "balance_temperature": 0.1}, SOLUTIONS)
    second = dict(zip(policy.calls[1].prompts, policy.calls[1].ns))
    good = second[BASE_PROMPT + "a good\n"]
    assert all(good >= n for n in second.values())


async def test_without_generate_multi_falls_back_to_one_call_per_distinct_width():
    result, policy, _, _, _ = await _run({"n": 8}, SOLUTIONS, policy_cls=FakePolicy)
    multi, multi_policy, _, _, _ = await _run({"n": 8}, SOLUTIONS)
    assert all(len(set(c.ns)) == 1 for c in policy.calls)
    assert result.details["finished_count"] == multi.details["finished_count"] == 8
    assert result.details["generate_calls"] == len(multi_policy.calls)


async def test_depth_cap_finishes_open_leaves():
    long = ["s1\ns2\ns3\ns4\ns5\nThe answer is 9."]
    result, policy, _, _, _ = await _run({"n": 4, "max_rounds": 2}, long)
    assert len(policy.calls) == 2 and result.details["finished_count"] == 4
    assert result.text == long[0] and result.finish_reason == "stop"


@pytest.mark.parametrize("seed", range(12))
async def test_budget_and_streaming_on_random_trees(seed):
    rng = random.Random(seed)
    limit = rng.choice([None, 100.0, 300.0, 800.0, 1500.0])
    result, _, _, meter, streamed = await _run({"n": rng.choice([4, 8])}, random_solutions(rng), budget=limit,
                                               reward_flops=rng.choice([0.0, 1.0]), seed=seed)
    assert limit is None or meter.total <= limit
    assert result.text.startswith(streamed)
