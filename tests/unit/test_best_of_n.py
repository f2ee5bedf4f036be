import random

import pytest

from service.rewards import ArithmeticReward
from service.strategies import StrategyParamError, build_strategy
from service.strategies.base import Problem, SamplingParams
from tests.unit.fakes import (
    BASE_PROMPT,
    FakePolicy,
    FakeReward,
    FlopMeter,
    from_solutions,
    round_robin,
    tokens,
)

RIGHT = "3 + 4 = 7\n7 * 2 = 14\nThe answer is 14."
WRONG = "3 + 4 = 8\n8 * 2 = 17\nThe answer is 17."
PROBLEM = Problem(prompt=BASE_PROMPT, question="Q", max_tokens=40)


async def test_one_generate_call_and_one_score_call():
    meter = FlopMeter()
    policy = FakePolicy(round_robin([RIGHT, WRONG, WRONG]), meter)
    reward = FakeReward()
    result = await build_strategy("best_of_n", {"n": 6}).run(PROBLEM, policy, reward, meter.budget(None))
    assert len(policy.calls) == 1 and policy.calls[0].ns == [6] and policy.calls[0].prompts == [BASE_PROMPT]
    assert len(reward.calls) == 1 and len(reward.calls[0]) == 6
    assert reward.calls[0][0] == RIGHT.split("\n")  # steps are lines
    assert result.samples == 6 and not result.budget_exhausted


async def test_weighted_selection_with_calculator_and_majority_without_reward_calls():
    policy = FakePolicy(round_robin([RIGHT, WRONG, WRONG]))
    weighted = await build_strategy("best_of_n", {"n": 6}).run(PROBLEM, policy, ArithmeticReward(),
                                                              FlopMeter().budget(None))
    assert weighted.answer == "14"
    reward = FakeReward()
    majority = await build_strategy("best_of_n", {"n": 6, "selection": "majority"}).run(
        PROBLEM, FakePolicy(round_robin([RIGHT, WRONG, WRONG])), reward, FlopMeter().budget(None))
    assert majority.answer == "17" and majority.score == pytest.approx(4 / 6)
    assert reward.calls == []


async def test_budget_shrinks_n_and_is_never_exceeded():
    meter = FlopMeter()
    policy = FakePolicy(from_solutions([RIGHT]), meter)
    per_sample = policy.estimate_flops([BASE_PROMPT], _params(), 1)
    limit = 3.5 * per_sample
    result = await build_strategy("best_of_n", {"n": 8, "top_up": False}).run(
        PROBLEM, policy, ArithmeticReward(), meter.budget(limit))
    assert [c.ns for c in policy.calls] == [[3]]
    assert result.budget_exhausted and result.details["n_used"] == 3 and result.answer == "14"
    assert "top_up" not in result.details and meter.total <= limit


async def test_budget_below_one_sample_returns_empty_without_calling():
    meter = FlopMeter()
    policy = FakePolicy(from_solutions([RIGHT]), meter)
    result = await build_strategy("best_of_n", {"n": 4}).run(PROBLEM, policy, ArithmeticReward(), meter.budget(1.0))
    assert result.text == "" and result.budget_exhausted and policy.calls == [] and meter.total == 0


async def test_scoring_that_does_not_fit_falls_back_to_majority():
    meter = FlopMeter()
    policy = FakePolicy(round_robin([RIGHT, WRONG, WRONG]), meter)
    reward = FakeReward(meter=meter, flops_per_step=1e6)
    result = await build_strategy("best_of_n", {"n": 3}).run(PROBLEM, policy, reward, meter.budget(1e4))
    assert result.details["selection_used"] == "majority" and result.budget_exhausted
    assert reward.calls == [] and meter.total <= 1e4


async def test_reward_required_for_weighted():
    with pytest.raises(StrategyParamError) as err:
        await build_strategy("best_of_n", {}).run(PROBLEM, FakePolicy(from_solutions([RIGHT])), None,
                                                  FlopMeter().budget(None))
    assert err.value.param == "selection"


async def test_greedy_uses_temperature_zero():
    policy = FakePolicy(round_robin([WRONG, RIGHT]))
    result = await build_strategy("greedy", {}).run(PROBLEM, policy, None, FlopMeter().budget(None))
    assert policy.calls[0].params.temperature == 0.0 and result.answer == "17" and result.finish_reason == "stop"


def _params():
    return SamplingParams(max_tokens=PROBLEM.max_tokens)


def _sample_cost(policy, text):
    return (len(tokens(BASE_PROMPT)) + len(tokens(text))) * policy.flops_per_token


async def test_top_up_draws_the_rest_of_n_once_the_real_cost_is_known():
    # The first call is sized on the worst case (40 tokens per sample); RIGHT is much shorter, so the budget pays for
    # all 8 once the first samples are metered for what they really cost (the last call still needs its worst case).
    meter = FlopMeter()
    policy = FakePolicy(from_solutions([RIGHT]), meter)
    worst = policy.estimate_flops([BASE_PROMPT], _params(), 1)
    limit = 7 * _sample_cost(policy, RIGHT) + worst + 1
    assert limit < 4 * worst
    result = await build_strategy("best_of_n", {"n": 8}).run(PROBLEM, policy, ArithmeticReward(), meter.budget(limit))
    drawn = [c.ns[0] for c in policy.calls]
    assert drawn[0] == int(limit // worst) < 8 and sum(drawn) == 8 and len(drawn) >= 2
    assert result.details["n_used"] == 8 and result.details["top_up"] == {"rounds": len(drawn) - 1, "samples": drawn}
    assert not result.budget_exhausted and result.samples == 8 and meter.total <= limit


async def test_top_up_scores_every_round_and_keeps_the_vote_weighted():
    meter = FlopMeter()
    policy = FakePolicy(round_robin([RIGHT, WRONG]), meter)
    reward = FakeReward(meter=meter, flops_per_step=5.0)
    limit = 8 * (_sample_cost(policy, RIGHT) + 3 * 5.0) + policy.estimate_flops([BASE_PROMPT], _params(), 1)
    result = await build_strategy("best_of_n", {"n": 8}).run(PROBLEM, policy, reward, meter.budget(limit))
    # Each round's samples are scored once, in their own reward call: nothing rescored, every voter scored.
    assert [len(call) for call in reward.calls] == [c.ns[0] for c in policy.calls]
    assert result.details["selection_used"] == "weighted" and len(policy.calls) >= 2
    assert meter.total <= limit


async def test_top_up_reserves_scoring_and_never_overspends():
    # Random sample lengths and budgets: whatever the draw, the meter never passes the limit and every sample that
    # votes under a verifier selection was scored.
    texts = [RIGHT, WRONG, "The answer is 14.", RIGHT + "\n" + "and so on " * 6]
    for seed in range(60):
        rng = random.Random(seed)
        meter = FlopMeter()
        policy = FakePolicy(lambda prompt, r, t: rng.choice(texts), meter)
        reward = FakeReward(meter=meter, flops_per_step=rng.choice([0.0, 3.0, 12.0]))
        limit = rng.uniform(0.5, 9) * policy.estimate_flops([BASE_PROMPT], _params(), 1)
        result = await build_strategy("best_of_n", {"n": rng.randint(2, 12)}).run(
            PROBLEM, policy, reward, meter.budget(limit))
        assert meter.total <= limit, seed
        if result.details.get("selection_used") == "weighted":
            assert sum(len(call) for call in reward.calls) == result.details["n_used"], seed


async def test_top_up_rounds_get_their_own_seeds():
    meter = FlopMeter()
    policy = FakePolicy(from_solutions([RIGHT]), meter)
    limit = 7 * _sample_cost(policy, RIGHT) + policy.estimate_flops([BASE_PROMPT], _params(), 1)
    for seed in (None, 11):
        policy.calls.clear()
        meter.total = 0.0
        problem = Problem(prompt=BASE_PROMPT, question="Q", max_tokens=40, seed=seed)
        await build_strategy("best_of_n", {"n": 8}).run(problem, policy, ArithmeticReward(), meter.budget(limit))
        seeds = [c.params.seed for c in policy.calls]
        assert len(seeds) >= 2 and len(set(seeds)) == len(seeds), seeds


async def test_top_up_is_validated():
    with pytest.raises(StrategyParamError) as err:
        build_strategy("best_of_n", {"top_up": "yes"})
    assert err.value.param == "top_up"


class CountingPolicy(FakePolicy):
    """Like the served policy client: estimates use a 4x prompt-token bound until the prompt has been counted."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.counted: set[str] = set()

    async def count_prompt_tokens(self, prompts):
        self.counted.update(prompts)

    def estimate_flops(self, prompts, params, n=1):
        return sum((len(tokens(p)) * (1 if p in self.counted else 4) + params.max_tokens) * n * self.flops_per_token
                   for p in prompts)


async def test_first_call_is_sized_on_the_counted_prompt_not_the_bound():
    meter = FlopMeter()
    policy = CountingPolicy(from_solutions([RIGHT]), meter)
    exact = FakePolicy(from_solutions([RIGHT])).estimate_flops([BASE_PROMPT], _params(), 1)
    result = await build_strategy("best_of_n", {"n": 8, "top_up": False}).run(
        PROBLEM, policy, ArithmeticReward(), meter.budget(3.5 * exact))
    assert [c.ns for c in policy.calls] == [[3]] and result.details["n_used"] == 3
