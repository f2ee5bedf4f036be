import random

import pytest

from service.strategies import build_strategy
from service.strategies.base import Problem
from tests.unit.fakes import BASE_PROMPT, FakePolicy, FakeReward, FlopMeter, random_solutions, round_robin

PROBLEM = Problem(prompt=BASE_PROMPT, question="Q", max_tokens=60)
SOLUTIONS = [
    "a good\nb good\nThe answer is 1.",
    "a good\nb bad\nThe answer is 2.",
    "a bad\nc good\nThe answer is 3.",
    "a meh\nd meh\nThe answer is 4.",
]


async def _run(params, solutions, budget=None, reward_flops=0.0, seed=0):
    meter = FlopMeter()
    policy = FakePolicy(round_robin(solutions), meter, seed=seed)
    reward = FakeReward(meter=meter, flops_per_step=reward_flops)
    sent: list[str] = []

    async def progress(text: str) -> None:
        sent.append(text)

    result = await build_strategy("dvts", params).run(PROBLEM, policy, reward, meter.budget(budget), progress)
    return result, policy, reward, meter, "".join(sent)


async def test_subtrees_expand_m_candidates_in_one_call_per_round():
    result, policy, reward, _, _ = await _run({"n": 8, "beam_width": 4}, SOLUTIONS)
    assert len(policy.calls) == len(reward.calls) == result.details["rounds"] == 3
    for call in policy.calls:
        assert call.ns == [4] * len(call.prompts)
    assert policy.calls[0].prompts == [BASE_PROMPT, BASE_PROMPT]  # n / M = 2 subtrees
    # Greedy by the reward inside each subtree: both subtrees took "a good" then "b good".
    assert all(p.endswith("a good\n") for p in policy.calls[1].prompts)
    assert all(p.endswith("a good\nb good\n") for p in policy.calls[2].prompts)
    assert result.answer == "1" and result.text == SOLUTIONS[0]


async def test_answer_pool_holds_only_finished_solutions_at_most_n():
    result, _, _, _, _ = await _run({"n": 8, "beam_width": 4}, SOLUTIONS)
    # Each subtree contributes its final solution plus finished siblings of its last expansion: 2 x 4.
    assert result.details["candidates"] == 8
    assert sum(v for _, v in result.details["tally"]) == pytest.approx(8 * 0.5)  # all final steps score 0.5


async def test_beam_width_one_is_independent_stepwise_sampling():
    result, policy, _, _, _ = await _run({"n": 4, "beam_width": 1}, SOLUTIONS)
    assert policy.calls[0].ns == [1, 1, 1, 1] and result.details["subtrees"] == 4


@pytest.mark.parametrize("seed", range(10))
async def test_budget_and_streaming_on_random_trees(seed):
    rng = random.Random(seed)
    limit = rng.choice([None, 100.0, 400.0, 900.0])
    result, _, _, meter, streamed = await _run({"n": 4, "beam_width": 2}, random_solutions(rng), limit,
                                               reward_flops=rng.choice([0.0, 2.0]), seed=seed)
    assert limit is None or meter.total <= limit
    assert result.text.startswith(streamed)
    if limit is None:
        assert not result.budget_exhausted and result.answer is not None


async def test_streams_the_shared_part_when_subtrees_agree():
    shared = ["root\nx good\nThe answer is 1.", "root\nx bad\nThe answer is 2."]
    result, _, _, _, streamed = await _run({"n": 4, "beam_width": 2}, shared)
    assert streamed == "root\nx good\n" and result.text.startswith(streamed)
