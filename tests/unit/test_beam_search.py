import random

import pytest

from service.strategies import StrategyParamError, build_strategy
from service.strategies.base import Problem
from service.strategies.beam_search import spread
from tests.unit.fakes import BASE_PROMPT, FakePolicy, FakeReward, FlopMeter, random_solutions, round_robin

PROBLEM = Problem(prompt=BASE_PROMPT, question="Q", max_tokens=60)
TRAP = ["good start\nbad middle\nThe answer is 1.", "plain start\ngood middle\nThe answer is 2."]


async def _run(params, solutions, budget=None, reward=None, problem=PROBLEM, seed=0):
    meter = FlopMeter()
    policy = FakePolicy(round_robin(solutions), meter, seed=seed)
    reward = reward or FakeReward(meter=meter)
    sent: list[str] = []

    async def progress(text: str) -> None:
        sent.append(text)

    result = await build_strategy("beam_search", params).run(problem, policy, reward, meter.budget(budget), progress)
    return result, policy, reward, meter, "".join(sent)


def test_spread():
    assert spread(8, 2) == [4, 4] and spread(8, 3) == [3, 3, 2] and sum(spread(16, 5)) == 16


async def test_one_generate_and_one_score_call_per_round_keeping_n_live_beams():
    rng = random.Random(1)
    solutions = ["\n".join(f"line {d} v{rng.randrange(3)} {rng.choice(['good', 'bad'])}" for d in range(4))
                 + "\nThe answer is 5." for _ in range(12)]
    result, policy, reward, _, _ = await _run({"n": 8, "beam_width": 4}, solutions)
    rounds = result.details["rounds"]
    assert len(policy.calls) == rounds == len(reward.calls) == 5
    for call in policy.calls:
        assert sum(call.ns) == 8  # N live beams every round (N / M survivors x M)
    assert policy.calls[0].prompts == [BASE_PROMPT]
    assert all(len(call.prompts) == 2 and call.ns == [4, 4] for call in policy.calls[1:])
    assert all("\n" in call.params.stop for call in policy.calls)
    assert result.answer == "5" and result.details["finished_count"] == 8


async def test_survivors_are_the_best_scored_steps():
    result, policy, _, _, _ = await _run({"n": 4, "beam_width": 2}, TRAP)
    # Without lookahead the tempting first step wins and leads into the bad middle.
    assert all(p.endswith("good start\n") for p in policy.calls[1].prompts)
    assert result.answer == "1"


async def test_lookahead_scores_the_end_of_the_rollout():
    result, policy, reward, _, _ = await _run({"n": 4, "beam_width": 2, "lookahead": 1}, TRAP)
    # The reward saw each first step followed by its greedy continuation, and nothing shorter.
    assert sorted(map(tuple, reward.calls[0])) == sorted([("good start", "bad middle")] * 2
                                                         + [("plain start", "good middle")] * 2)
    rollout_calls = [c for c in policy.calls if c.params.temperature == 0.0]
    assert rollout_calls and all(c.ns == [1] * len(c.prompts) for c in rollout_calls)
    assert result.answer == "2"
    assert result.text == TRAP[1]  # the rollout only steered pruning; the answer is the beam's own text


async def test_streamed_text_is_a_prefix_of_the_answer():
    shared = "Let a = 3\nLet b = 4\n"
    solutions = [shared + tail for tail in ("a + b = 7 good\nThe answer is 7.", "a * b = 12 bad\nThe answer is 12.")]
    result, _, _, _, streamed = await _run({"n": 4, "beam_width": 2}, solutions)
    assert streamed.startswith(shared) and result.text.startswith(streamed)
    assert result.details["streamed"] == streamed


@pytest.mark.parametrize("seed", range(12))
async def test_streaming_prefix_property_on_random_trees(seed):
    rng = random.Random(seed)
    params = {"n": rng.choice([4, 8]), "beam_width": 2, "lookahead": rng.choice([0, 1])}
    limit = rng.choice([None, 400.0, 900.0, 2000.0])
    result, _, _, meter, streamed = await _run(params, random_solutions(rng), budget=limit, seed=seed)
    assert result.text.startswith(streamed)
    assert limit is None or meter.total <= limit


@pytest.mark.parametrize("limit", [10.0, 60.0, 150.0, 300.0, 600.0, 1200.0])
async def test_budget_is_never_exceeded(limit):
    reward_meter_charge = 3.0
    meter = FlopMeter()
    policy = FakePolicy(round_robin(random_solutions(random.Random(7), count=8)), meter)
    reward = FakeReward(meter=meter, flops_per_step=reward_meter_charge)
    result = await build_strategy("beam_search", {"n": 4, "beam_width": 2, "lookahead": 1}).run(
        PROBLEM, policy, reward, meter.budget(limit))
    assert meter.total <= limit
    if result.budget_exhausted and not result.details.get("reason"):
        assert result.text  # an anytime answer, finished or partial


async def test_budget_exhausted_before_any_beam_finished_returns_best_partial():
    solutions = ["one good\ntwo\nthree\nfour\nThe answer is 4.", "one bad\ntwo\nthree\nfour\nThe answer is 5."]
    meter = FlopMeter()
    policy = FakePolicy(round_robin(solutions), meter)
    first_round = policy.estimate_flops([BASE_PROMPT], _step_params(), 4)
    result, _, _, meter, streamed = await _run({"n": 4, "beam_width": 2}, solutions, budget=first_round + 1.0)
    assert result.budget_exhausted and result.details["partial"] and result.finish_reason == "length"
    assert result.text.startswith("one good\n") and result.text.startswith(streamed)
    assert any(s.startswith(result.text) for s in solutions)


async def test_last_round_generates_to_the_end():
    result, policy, _, _, _ = await _run({"n": 4, "beam_width": 2, "max_rounds": 1}, TRAP)
    assert len(policy.calls) == 1 and "\n" not in policy.calls[0].params.stop
    assert result.text in TRAP and result.finish_reason == "stop"


async def test_no_beam_exceeds_max_tokens():
    long = ["w " * 30 + "\n" + "x " * 30 + "\nThe answer is 1."]
    problem = Problem(prompt=BASE_PROMPT, question="Q", max_tokens=40)
    result, policy, _, _, _ = await _run({"n": 2, "beam_width": 1}, long, problem=problem)
    assert result.finish_reason == "length" and len(result.text.split()) <= 40


async def test_each_call_gets_its_own_seed():
    problem = Problem(prompt=BASE_PROMPT, question="Q", max_tokens=60, seed=123)
    _, policy, _, _, _ = await _run({"n": 4, "beam_width": 2}, TRAP, problem=problem)
    seeds = [c.params.seed for c in policy.calls]
    assert None not in seeds and len(set(seeds)) == len(seeds)


async def test_needs_a_reward():
    with pytest.raises(StrategyParamError):
        await build_strategy("beam_search", {}).run(PROBLEM, FakePolicy(round_robin(TRAP)), None,
                                                    FlopMeter().budget(None))


def _step_params():
    from service.strategies.steps import Node, step_params

    return step_params([Node()], PROBLEM, 0.8, "\n", last=False)
