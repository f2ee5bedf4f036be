import math
import random

import pytest
from service.strategies import StrategyParamError, build_strategy
from service.strategies.base import Problem
from service.strategies.particle_filtering import effective_sample_size, group_copies, particle_weights, resample
from service.strategies.steps import Node
from tests.unit.fakes import (BASE_PROMPT, FakeMultiPolicy, FakePolicy, FakeReward, FlopMeter, random_solutions,
                              round_robin)

PROBLEM = Problem(prompt=BASE_PROMPT, question="Q", max_tokens=60, seed=1)

SOLUTIONS = [
    "a good\nb good\nThe answer is 1.",
    "a good\nb bad\nThe answer is 2.",
    "a bad\nc meh\nd meh\nThe answer is 3.",
    "a meh\nThe answer is 4.",
]


def test_weights_are_softmax_of_logits_over_temperature():
    w = particle_weights([0.9, 0.5, 0.1], 1.0)
    assert sum(w) == pytest.approx(1.0)
    # logit(0.9) = ln 9, logit(0.5) = 0, logit(0.1) = -ln 9: weights 9 : 1 : 1/9.
    assert w[0] / w[1] == pytest.approx(9.0) and w[1] / w[2] == pytest.approx(9.0)
    hot = particle_weights([0.9, 0.5, 0.1], 2.0)
    assert hot[0] / hot[1] == pytest.approx(3.0)
    assert particle_weights([1.0, 0.0], 1.0)[0] < 1.0  # clamped: a 0 score keeps a tiny weight
    assert effective_sample_size([0.25] * 4) == pytest.approx(4.0)
    assert effective_sample_size([1.0, 0.0, 0.0]) == pytest.approx(1.0)


@pytest.mark.parametrize("method", ["multinomial", "systematic"])
def test_resampling_sums_to_n_and_follows_the_weights(method):
    rng = random.Random(7)
    weights = particle_weights([0.9, 0.7, 0.5, 0.2, 0.05], 1.0)
    counts = [0] * len(weights)
    draws, n = 4000, 8
    for _ in range(draws):
        copies = resample(weights, n, method, rng)
        assert sum(copies) == n and min(copies) >= 0
        if method == "systematic":  # floor(n w) or one more, never further from n * w
            assert all(math.floor(n * w) <= c <= math.floor(n * w) + 1 for c, w in zip(copies, weights))
        counts = [a + b for a, b in zip(counts, copies)]
    expected = [w * draws * n for w in weights]
    statistic = sum((c - e) ** 2 / e for c, e in zip(counts, expected))
    # Chi-square with 4 degrees of freedom: P(X > 18.47) = 0.001 (scipy is not a dependency of this project).
    # Systematic draws are less variable than multinomial ones, so they pass more easily.
    assert statistic < 18.47, (counts, expected)


def test_resampling_degenerate_cases():
    rng = random.Random(0)
    assert resample([1.0], 5, "multinomial", rng) == [5]
    assert resample([0.5, 0.5], 0, "systematic", rng) == [0, 0]
    assert resample([], 3, "multinomial", rng) == []
    with pytest.raises(ValueError):
        resample([1.0], 1, "stratified", rng)


def test_duplicates_become_one_prompt_with_n_copies():
    a, b, a2 = Node(text="x\n"), Node(text="y\n"), Node(text="x\n")
    frontier, widths = group_copies([a, b, a2], [2, 0, 3])
    assert [f.text for f in frontier] == ["x\n"] and widths == [5]


async def _run(params, solutions, budget=None, reward_flops=0.0, seed=0, policy_cls=FakeMultiPolicy, problem=PROBLEM):
    meter = FlopMeter()
    policy = policy_cls(round_robin(solutions), meter, seed=seed)
    reward = FakeReward(meter=meter, flops_per_step=reward_flops)
    sent: list[str] = []

    async def progress(text: str) -> None:
        sent.append(text)

    result = await build_strategy("particle_filtering", params).run(problem, policy, reward, meter.budget(budget),
                                                                    progress)
    return result, policy, reward, meter, "".join(sent)


async def test_completed_particles_leave_the_population():
    result, policy, reward, _, _ = await _run({"n": 8}, SOLUTIONS)
    assert len(policy.calls) == len(reward.calls) == result.details["rounds"]
    assert policy.calls[0].ns == [8]
    finished_before = 0
    for call, scored in zip(policy.calls, reward.calls):
        assert sum(call.ns) == 8 - finished_before  # one fewer live particle per finished one
        assert len(call.prompts) == len(set(call.prompts))  # duplicates go out once, with n = copies
        finished_before += sum(1 for steps in scored if steps[-1].startswith("The answer is"))
    assert result.details["finished_count"] == 8
    assert result.details["resampling_events"] == len(result.details["effective_sample_size"])
    assert result.details["live_particles"][0] == 8
    assert result.answer is not None


async def test_resampling_moves_particles_to_good_steps():
    # Cold weights: after round one almost every particle continues from "a good".
    result, policy, _, _, _ = await _run({"n": 16, "weight_temperature": 0.2}, SOLUTIONS)
    second = dict(zip(policy.calls[1].prompts, policy.calls[1].ns))
    assert second.get(BASE_PROMPT + "a good\n", 0) >= 0.75 * sum(second.values())
    assert result.answer == "1"  # good, good beats good, bad


async def test_ess_threshold_skips_resampling_when_weights_are_even():
    even = ["a meh\nb meh\nThe answer is 1.", "a meh\nc meh\nThe answer is 2."]
    result, _, _, _, _ = await _run({"n": 4, "ess_threshold": 0.5}, even)
    assert result.details["resampling_events"] == 0 and result.details["finished_count"] == 4


async def test_same_seed_same_search():
    a, *_ = await _run({"n": 8}, SOLUTIONS, seed=3)
    b, *_ = await _run({"n": 8}, SOLUTIONS, seed=3)
    assert a.text == b.text and a.details["effective_sample_size"] == b.details["effective_sample_size"]


async def test_without_generate_multi_and_at_the_depth_cap():
    long = ["s1\ns2\ns3\ns4\ns5\nThe answer is 9."]
    result, policy, _, _, _ = await _run({"n": 4, "max_rounds": 2}, long, policy_cls=FakePolicy)
    assert len(policy.calls) == 2 and result.details["finished_count"] == 4
    assert result.text == long[0]


@pytest.mark.parametrize("seed", range(16))
async def test_budget_never_exceeded_on_random_trees(seed):
    rng = random.Random(seed)
    limit = rng.choice([None, 60.0, 150.0, 400.0, 900.0, 2000.0])
    params = {"n": rng.choice([2, 4, 8]), "resampling": rng.choice(["multinomial", "systematic"]),
              "weight_temperature": rng.choice([0.1, 1.0, 5.0])}
    result, _, _, meter, streamed = await _run(params, random_solutions(rng), budget=limit,
                                               reward_flops=rng.choice([0.0, 1.0, 3.0]), seed=seed)
    assert limit is None or meter.total <= limit
    assert result.text.startswith(streamed)
    if limit is None:
        assert not result.budget_exhausted


def test_parameters_are_validated_by_name():
    for params, field in [({"weight_temperature": 0}, "weight_temperature"), ({"resampling": "stratified"},
                          "resampling"), ({"ess_threshold": 1.5}, "ess_threshold"), ({"n": 0}, "n"),
                          ({"beam_width": 2}, "beam_width")]:
        with pytest.raises(StrategyParamError) as exc:
            build_strategy("particle_filtering", params)
        assert exc.value.param == field


async def test_needs_a_reward():
    with pytest.raises(StrategyParamError):
        await build_strategy("particle_filtering", {}).run(PROBLEM, FakeMultiPolicy(round_robin(SOLUTIONS)), None,
                                                           FlopMeter().budget(None))
