"""Early stopping inside served best-of-N: the rule of strategies/stopping.py applied after every sample, rounds
under the budget, fresh samples per round, and defaults that keep one batched call."""

from __future__ import annotations

import pytest

from service.strategies import StrategyParamError, build_strategy
from service.strategies.base import Problem, SamplingParams
from service.strategies.best_of_n import Prior
from service.strategies.stopping import StoppingRule, rule_of, stop_reason
from tests.unit.fakes import BASE_PROMPT, FakePolicy, FakeReward, FlopMeter, round_robin

PROBLEM = Problem(prompt=BASE_PROMPT, question="Q", max_tokens=40)


def answer(a: str, verdict: str = "meh") -> str:
    return f"2 + 2 = {a}\nThe answer is {a}. {verdict}"


def first_stop(answers, scores, rule):
    for m in range(1, len(answers) + 1):
        why = stop_reason(answers[:m], scores[:m], rule)
        if why:
            return m, why
    return len(answers), None


async def run(params, solutions, reward=None, limit=None, meter=None, problem=PROBLEM):
    meter = meter or FlopMeter()
    policy = FakePolicy(round_robin(solutions), meter)
    result = await build_strategy("best_of_n", params).run(problem, policy, reward, meter.budget(limit))
    return result, policy, meter


async def test_unanimous_votes_settle_after_four_single_sample_rounds():
    result, policy, _ = await run({"n": 16, "selection": "majority", "stopping": "beta"}, [answer("4")])
    es = result.details["early_stopping"]
    assert [c.ns for c in policy.calls] == [[1]] * 4 and result.samples == 4
    assert es == {"rule": "beta p>0.95", "rounds": 4, "samples": 4, "stopped": "settled", "at_sample": 4,
                  "leader_probability": 0.9688}
    assert result.answer == "4" and not result.budget_exhausted


@pytest.mark.parametrize("script", [
    ["7", "8", "7", "7", "7", "7", "7", "7", "7", "7"],
    ["7", "8"] * 6,
    ["1", "2", "3", "1", "1", "1", "1", "1", "1", "1", "1", "1"],
    ["5", "5", "6", "5", "5", "5", "5", "5"],
])
async def test_served_stop_is_the_pure_rule_on_the_same_sequence(script):
    rule = StoppingRule(0.9, hopeless_k=None)
    params = {"n": len(script), "selection": "majority", **rule.ttc_params()}
    result, policy, _ = await run(params, [answer(a) for a in script])
    groups = {a: i for i, a in enumerate(dict.fromkeys(script))}
    at, why = first_stop([groups[a] for a in script], [1.0] * len(script), rule)
    es = result.details["early_stopping"]
    assert es["samples"] == at and (es["stopped"] == why if why else es["stopped"] == "n")
    assert sum(sum(c.ns) for c in policy.calls) == at


async def test_a_split_vote_draws_all_n():
    result, _, _ = await run({"n": 12, "selection": "majority", "stopping": "beta"}, [answer("7"), answer("8")])
    assert result.details["early_stopping"]["stopped"] == "n" and result.samples == 12


async def test_hopeless_stops_after_k_distinct_low_scored_answers():
    bad = [answer(str(a), "bad") for a in range(1, 9)]
    result, policy, _ = await run({"n": 8, "hopeless_k": 4}, bad, FakeReward())
    es = result.details["early_stopping"]
    assert es["stopped"] == "hopeless" and es["samples"] == 4 and es["rule"] == "hopeless k=4 s<0.2"
    # A repeat, or one trusted sample, is not hopeless.
    result, _, _ = await run({"n": 8, "hopeless_k": 4}, [answer("1", "bad"), answer("2", "bad"), answer("1", "bad"),
                                                         answer("3", "bad")] + bad, FakeReward())
    assert result.details["early_stopping"]["stopped"] == "n"
    result, _, _ = await run({"n": 6, "hopeless_k": 4}, [answer("1", "good")] + bad, FakeReward())
    assert result.details["early_stopping"]["stopped"] == "n"


async def test_weighted_and_best_score_each_round_once():
    for selection in ("weighted", "best"):
        reward = FakeReward()
        result, policy, _ = await run({"n": 8, "selection": selection, "stopping": "beta", "round_size": 2},
                                      [answer("4", "good")], reward)
        assert [len(c) for c in reward.calls] == [2, 2] and [c.ns for c in policy.calls] == [[2], [2]]
        assert result.details["early_stopping"]["at_sample"] == 4 and result.answer == "4"
        assert result.details["selection_used"] == selection


async def test_larger_rounds_stop_at_the_end_of_the_round_the_rule_fires_in():
    result, policy, _ = await run({"n": 16, "selection": "majority", "stopping": "beta", "round_size": 3},
                                  [answer("4")])
    es = result.details["early_stopping"]
    assert [c.ns for c in policy.calls] == [[3], [3]] and es["at_sample"] == 4 and es["samples"] == 6
    assert result.details["candidates"] == 6  # every sample paid for votes


@pytest.mark.parametrize("reward_flops", [0.0, 3.0])
async def test_budget_is_checked_before_every_round_and_never_exceeded(reward_flops):
    meter = FlopMeter()
    per_sample = FakePolicy(round_robin([answer("1")])).estimate_flops([BASE_PROMPT], SamplingParams(40), 1)
    limit = 5.5 * per_sample
    reward = FakeReward(meter=meter, flops_per_step=reward_flops)
    result, policy, meter = await run({"n": 16, "stopping": "beta", "round_size": 2},
                                      [answer("1"), answer("2"), answer("3")], reward, limit, meter)
    es = result.details["early_stopping"]
    assert meter.total <= limit and result.budget_exhausted and es["stopped"] == "budget"
    assert [c.ns for c in policy.calls][:2] == [[2], [2]] and es["samples"] == sum(sum(c.ns) for c in policy.calls)
    assert result.text


async def test_budget_below_one_sample_returns_empty():
    result, policy, meter = await run({"n": 4, "stopping": "beta"}, [answer("1")], FakeReward(), limit=1.0)
    assert result.text == "" and result.budget_exhausted and policy.calls == [] and meter.total == 0


async def test_unseeded_rounds_draw_fresh_samples_and_seeded_ones_derive_seeds():
    _, policy, _ = await run({"n": 5, "selection": "majority", "stopping": "beta"}, [answer("1"), answer("2")])
    seeds = [c.params.seed for c in policy.calls]
    assert seeds[0] is None and None not in seeds[1:] and len(set(seeds)) == len(seeds)
    seeded = Problem(prompt=BASE_PROMPT, question="Q", max_tokens=40, seed=11)
    _, policy, _ = await run({"n": 5, "selection": "majority", "stopping": "beta"}, [answer("1"), answer("2")],
                             problem=seeded)
    seeds = [c.params.seed for c in policy.calls]
    assert None not in seeds and len(set(seeds)) == len(seeds) == 5


async def test_defaults_keep_one_batched_call():
    result, policy, _ = await run({"n": 6}, [answer("1"), answer("2")], FakeReward())
    assert [c.ns for c in policy.calls] == [[6]] and "early_stopping" not in result.details
    assert rule_of(build_strategy("best_of_n", {}).params) is None


async def test_prior_samples_count_and_can_settle_without_new_draws():
    meter = FlopMeter()
    policy = FakePolicy(round_robin([answer("4", "good")]), meter)
    prior = Prior((await policy.generate([BASE_PROMPT], SamplingParams(40), 4))[0], [[0.9, 0.9]] * 4)
    policy.calls.clear()
    spent = meter.total
    strategy = build_strategy("best_of_n", {"n": 16, "stopping": "beta"})
    result = await strategy.run(PROBLEM, policy, FakeReward(), meter.budget(None), prior=prior)
    assert policy.calls == [] and meter.total == spent
    assert result.details["early_stopping"]["stopped"] == "settled" and result.details["prior_samples"] == 4


@pytest.mark.parametrize("params,param", [
    ({"selection": "majority", "hopeless_k": 4}, "hopeless_k"),
    ({"n": 4, "hopeless_k": 5}, "hopeless_k"),
    ({"round_size": 2}, "round_size"),
    ({"n": 4, "stopping": "beta", "round_size": 5}, "round_size"),
    ({"selection": "confidence", "stopping": "beta"}, "stopping"),
    ({"stopping": "lead"}, "stopping"),
    ({"stopping": "beta", "stop_threshold": 1.0}, "stop_threshold"),
])
def test_invalid_stopping_params_name_the_field(params, param):
    with pytest.raises(StrategyParamError) as err:
        build_strategy("best_of_n", params)
    assert err.value.param == param


def test_a_rule_round_trips_through_ttc_params():
    for rule in (StoppingRule(0.95, hopeless_k=None), StoppingRule(0.8, hopeless_k=4, score_threshold=0.2),
                 StoppingRule(criterion="none", hopeless_k=3, score_threshold=0.3),
                 StoppingRule(0.9, prior=0.5, criterion="dirichlet", min_samples=3, hopeless_k=None)):
        assert rule_of(build_strategy("best_of_n", {"n": 16, **rule.ttc_params()}).params) == rule


async def test_bank_replay_of_a_stopping_config_is_what_serving_does():
    """The same samples in the same order: replay's per-ordering outcome and samples used equal the served run's."""
    import random

    import numpy as np

    from service.offline.replay import BonConfig, bank_arrays, replay_orderings
    from service.offline.stopping import stop_points
    from tests.unit.offline_fakes import problem, sample

    rng = random.Random(3)
    problems = []
    for p in range(6):
        pool = ["1", "2"] if p % 2 else ["1", "2", "3", "4", "5", None]
        smp = [sample(a, a == "1", rng.choice([0.05, 0.15, 0.6, 0.9])) for a in (rng.choice(pool) for _ in range(8))]
        problems.append(problem(f"p{p}", smp))
    bank = bank_arrays(problems)
    rules = (StoppingRule(0.8, hopeless_k=None), StoppingRule(0.9, hopeless_k=3, score_threshold=0.2))
    configs = [BonConfig(8, "weighted", "last", "prm", rules[1]), BonConfig(8, "majority", stop=rules[0]),
               BonConfig(8, "best", "last", "prm", rules[1])]
    ok, _, order = replay_orderings(bank, configs, r=3, seed=1)
    # The verdict is a word, so that a sample without an answer holds no number for extract_answer to find.
    words = {0.05: "tiny", 0.15: "low", 0.6: "fair", 0.9: "high"}
    reward = FakeReward(step_score=lambda s: next((v for v, w in words.items() if f"[{w}]" in s), 1.0))
    for i, prob in enumerate(problems):
        for o in range(3):
            seq = [prob["samples"][j] for j in order[i, o, :8]]
            texts = [f"two and two\n{'The answer is ' + s['answer'] if s['answer'] else 'no idea'}. "
                     f"[{words[s['scores']['prm'][-1]]}]" for s in seq]
            for k, c in enumerate(configs):
                served, _, _ = await run({**c.params, "round_size": 1}, texts, reward)
                used, _ = stop_points(np.array([[[bank.group[i, j] for j in order[i, o, :8]]]]),
                                      np.array([[[s["scores"]["prm"][-1] for s in seq]]]), c.stop, 8)
                assert served.details["early_stopping"]["samples"] == int(used[0, 0]), (i, o, c.key)
                assert (served.answer == "1") == bool(ok[i, o, k]), (i, o, c.key)


def test_a_table_entry_with_stopping_round_trips_to_the_served_strategy(tmp_path):
    """replay's config -> evidence table entry -> saved/loaded -> run_auto (probe samples as prior) -> BestOfN with
    the same rule; and routing replays find the config again from the entry."""
    import asyncio

    import numpy as np

    from service.offline.policy import evidence_table, table_outcomes
    from service.offline.replay import all_configs
    from service.router.difficulty import run_auto
    from service.router.table import load

    rule = StoppingRule(0.95, hopeless_k=4, score_threshold=0.2)
    configs = all_configs((1, 4, 8), backends=("prm*arith",), aggregations=("last",), rules=[rule])
    stopped = next(k for k, c in enumerate(configs) if c.stop == rule and c.n == 8)
    P = 20
    acc = np.full((P, len(configs)), 0.3)
    acc[:, stopped] = 0.9  # the stopping config wins everywhere
    flops = np.tile(np.array([c.n for c in configs], float), (P, 1))
    stat = np.linspace(0, 1, P)
    table = evidence_table(acc, flops, configs, stat, np.ones(P, bool), (8,), {"per_generation": 1.0}, "prm*arith")
    table.save(tmp_path / "t.json")
    table = load(tmp_path / "t.json")
    assert all(rule_of(build_strategy("best_of_n", e["params"]).params) == rule for e in table.entries)
    out_a, _ = table_outcomes(table, acc, flops, configs, stat, [8.0])
    assert np.allclose(out_a, 0.9)

    meter = FlopMeter()
    policy = FakePolicy(round_robin([answer("4", "good")]), meter)
    table.probe = {"k": 2, "temperature": 0.8, "max_tokens": 40}
    result, info = asyncio.run(run_auto(PROBLEM, policy, FakeReward(meter=meter), table, meter.budget(None)))
    es = result.details["early_stopping"]
    assert info["params"]["stopping"] == "beta" and es["rule"] == rule.name and es["stopped"] == "settled"
    assert result.details["reused_probe_samples"] == 2 and sum(sum(c.ns) for c in policy.calls) == 4


async def test_a_round_whose_scoring_does_not_fit_stays_out_of_a_verifier_vote():
    texts = [answer("1", "good"), answer("2", "bad")]
    probe = FakePolicy(round_robin(texts))
    est = probe.estimate_flops([BASE_PROMPT], SamplingParams(40), 1)
    await probe.generate([BASE_PROMPT], SamplingParams(40), 1)
    actual = probe.meter.total  # every sample here costs the same
    meter = FlopMeter()
    reward = FakeReward(meter=meter, flops_per_step=est / 2)  # 2 steps a sample: scoring a round of 2 costs 2 est
    limit = 4 * actual + 4 * est - 1  # round 2 is drawn (2 est of room), its scoring no longer fits
    result, policy, meter = await run({"n": 8, "stopping": "beta", "round_size": 2}, texts, reward, limit, meter)
    es = result.details["early_stopping"]
    assert es["samples"] == 4 and es["rounds"] == 2 and es["stopped"] == "budget" and len(reward.calls) == 1
    assert result.details["candidates"] == 2 and result.details["selection_used"] == "weighted"
    assert result.answer == "1" and result.budget_exhausted and meter.total <= limit


@pytest.mark.parametrize("params", [{"n": 8}, {"n": 8, "stopping": "beta"}])
async def test_prior_samples_vote_when_the_budget_allows_nothing_new(params):
    meter = FlopMeter()
    policy = FakePolicy(round_robin([answer("4", "good"), answer("5", "bad")]), meter)
    prior = Prior((await policy.generate([BASE_PROMPT], SamplingParams(40), 2))[0], [[0.9, 0.9], [0.9, 0.1]])
    policy.calls.clear()
    result = await build_strategy("best_of_n", params).run(PROBLEM, policy, FakeReward(), meter.budget(meter.total),
                                                            prior=prior)
    assert policy.calls == [] and result.answer == "4" and result.budget_exhausted
    assert result.details["candidates"] == 2 and result.details["prior_samples"] == 2
