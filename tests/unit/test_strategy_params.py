import random

import pytest

from service.rewards import ArithmeticReward
from service.strategies import PARAMS, STRATEGIES, StrategyParamError, build_strategy
from service.strategies.base import Problem
from tests.unit.fakes import BASE_PROMPT, FakeMultiPolicy, FakeReward, FlopMeter, random_solutions, round_robin


def test_registry_and_defaults():
    assert set(STRATEGIES) == set(PARAMS) == {"greedy", "best_of_n", "beam_search", "dvts", "rebase", "revisions",
                                                  "particle_filtering"}
    beam = build_strategy("beam_search", None)
    assert beam.name == "beam_search"
    assert beam.params.model_dump() == {"n": 8, "temperature": None, "selection": "weighted", "aggregation": "last",
                                        "step_delimiter": "\n", "max_rounds": 40, "beam_width": 4, "lookahead": 0}
    assert build_strategy("rebase", {}).params.balance_temperature == 0.2
    assert build_strategy("revisions", {}).params.chain_length == 4
    assert build_strategy("greedy", {}).params.model_dump() == {}
    assert build_strategy("best_of_n", {"selection": "majority"}).requires_reward is False
    for name in STRATEGIES:
        strategy = build_strategy(name, {})
        # Parameters round-trip (they are logged and used in cache keys).
        assert build_strategy(name, strategy.params.model_dump()).params == strategy.params


@pytest.mark.parametrize("name,params,param", [
    ("beam_search", {"n": 4, "beam_width": 8}, "beam_width"),
    ("beam_search", {"n": 8, "beam_width": 3}, "beam_width"),
    ("dvts", {"n": 6, "beam_width": 4}, "beam_width"),
    ("beam_search", {"lookahead": -1}, "lookahead"),
    ("beam_search", {"max_rounds": 0}, "max_rounds"),
    ("best_of_n", {"selection": "oracle"}, "selection"),
    ("best_of_n", {"aggregation": "max"}, "aggregation"),
    ("best_of_n", {"n": 0}, "n"),
    ("best_of_n", {"n": 100}, "n"),
    ("best_of_n", {"n": "8"}, "n"),
    ("best_of_n", {"n": True}, "n"),
    ("best_of_n", {"temperature": 0}, "temperature"),
    ("best_of_n", {"temperature": 3.0}, "temperature"),
    ("best_of_n", {"beam_width": 2}, "beam_width"),
    ("greedy", {"n": 4}, "n"),
    ("rebase", {"balance_temperature": 0}, "balance_temperature"),
    ("rebase", {"step_delimiter": ""}, "step_delimiter"),
    ("revisions", {"n": 8, "chain_length": 3}, "chain_length"),
    ("revisions", {"n": 2, "chain_length": 4}, "chain_length"),
    ("tree_of_thought", {}, "strategy"),
])
def test_invalid_parameters_name_the_parameter(name, params, param):
    with pytest.raises(StrategyParamError) as err:
        build_strategy(name, params, max_n=64)
    assert err.value.param == param and err.value.message
    assert str(err.value).startswith(f"{param}: ")


def test_max_n_is_optional_and_inclusive():
    assert build_strategy("best_of_n", {"n": 64}, max_n=64).params.n == 64
    assert build_strategy("best_of_n", {"n": 1000}).params.n == 1000
    with pytest.raises(StrategyParamError):
        build_strategy("best_of_n", [1, 2])  # type: ignore[arg-type]


STRATEGY_CASES = [
    ("greedy", {}),
    ("best_of_n", {"n": 8}),
    ("beam_search", {"n": 8, "beam_width": 2, "lookahead": 1}),
    ("dvts", {"n": 8, "beam_width": 2}),
    ("rebase", {"n": 8}),
    ("revisions", {"n": 8, "chain_length": 4}),
]


@pytest.mark.parametrize("name,params", STRATEGY_CASES)
async def test_budget_is_never_exceeded_by_any_strategy(name, params):
    rng = random.Random(name)
    for limit in [0.0, 50.0, 150.0, 400.0, 1000.0, 3000.0]:
        meter = FlopMeter()
        policy = FakeMultiPolicy(round_robin(random_solutions(rng)), meter)
        reward = FakeReward(meter=meter, flops_per_step=2.0)
        problem = Problem(prompt=BASE_PROMPT, question="Q", max_tokens=30)
        result = await build_strategy(name, params).run(problem, policy, reward, meter.budget(limit))
        assert meter.total <= limit, (name, limit, meter.total)
        if limit == 0.0:
            # Nothing fits: nothing is spent, nothing is answered, and the result says why.
            assert result.budget_exhausted and not result.text and meter.total == 0, (name, result)
        elif not result.budget_exhausted:
            assert result.text, (name, limit)  # a search the budget did not stop has an answer


@pytest.mark.parametrize("name,params", STRATEGY_CASES)
async def test_every_strategy_answers_with_the_calculator_reward(name, params):
    solutions = ["2 + 2 = 4\n4 * 3 = 12\nThe answer is 12.", "2 + 2 = 5\n5 * 3 = 15\nThe answer is 15."]
    problem = Problem(prompt=BASE_PROMPT, question="Q", max_tokens=40)
    fresh = round_robin(solutions)

    def continuation(prompt, rng, temperature):
        # A revision prompt is not a continuation of the base prompt: answer it afresh.
        return fresh(BASE_PROMPT if prompt.endswith("Corrected solution:\n") else prompt, rng, temperature)

    meter = FlopMeter()
    result = await build_strategy(name, params).run(problem, FakeMultiPolicy(continuation, meter),
                                                    ArithmeticReward(), meter.budget(None))
    assert result.answer == "12" and result.text == solutions[0] and not result.budget_exhausted
    assert result.completion_tokens > 0 and result.samples >= 1
