"""Policy table, difficulty bins, Snell's 2-fold CV choice, the prompt-statistics estimator and the auto router."""

from __future__ import annotations

import random

import pytest

from service.router.difficulty import PromptDifficultyModel, prompt_bin, prompt_features
from service.router.table import PolicyTable, load, quantile_cuts, select_by_cv


def _table() -> PolicyTable:
    entries = []
    for b in (1, 2):
        for g, flops in ((1, 1e9), (4, 4e9), (16, 1.6e10)):
            entries.append({"bin": b, "budget_generations": g, "budget_flops": flops, "strategy": "best_of_n",
                            "params": {"n": g, "selection": "weighted"}, "expected_accuracy": 0.1 * g + b,
                            "mean_flops": flops * 0.9, "n_problems": 7})
    return PolicyTable(cuts=[0.2, 0.4, 0.6, 0.8], entries=entries, budgets=[{"generations": 1, "flops": 1e9}])


def test_save_load_roundtrip(tmp_path):
    t = _table()
    t.prompt_model = PromptDifficultyModel.fit(["What is 1 + 2?", "What is (3 + 4) * 5 - 6?", "Tom has 3 apples."],
                                               [0.9, 0.2, 0.5]).to_dict()
    t.save(tmp_path / "t.json")
    u = load(tmp_path / "t.json")
    assert u.to_dict() == t.to_dict()
    assert u.format_version == 1


def test_load_rejects_other_versions(tmp_path):
    d = _table().to_dict()
    d["format_version"] = 99
    with pytest.raises(ValueError):
        PolicyTable.from_dict(d)


def test_lookup_picks_largest_budget_not_above():
    t = _table()
    assert t.lookup(1, 4e9).params["n"] == 4  # exactly on a budget
    assert t.lookup(1, 1.5e10).params["n"] == 4  # between 4 and 16
    assert t.lookup(2, 1e12).params["n"] == 16  # above all
    assert t.lookup(2, None).params["n"] == 16
    c = t.lookup(1, 1e3)  # below all: the cheapest, flagged
    assert c.params["n"] == 1 and c.below_all_budgets
    assert not t.lookup(1, 1e9).below_all_budgets
    assert t.lookup(3, 1e12) is None  # no entry for the bin
    assert t.lookup(2, 4e9).expected_accuracy == pytest.approx(2.4)


def test_bin_of_on_cut_points():
    t = _table()
    assert t.bin_of(0.95) == 1
    assert t.bin_of(0.8) == 1  # on a cut: the easier side (stat >= cut)
    assert t.bin_of(0.79) == 2
    assert t.bin_of(0.4) == 3
    assert t.bin_of(0.2) == 4
    assert t.bin_of(0.0) == 5


def test_quantile_cuts_split_evenly():
    cuts = quantile_cuts(list(range(101)))
    assert cuts == pytest.approx([20, 40, 60, 80])
    t = PolicyTable(cuts=cuts, entries=[])
    counts = [sum(t.bin_of(x) == b for x in range(100)) for b in range(1, 6)]
    assert counts == [20, 20, 20, 20, 20]


def test_select_by_cv_picks_the_better_strategy():
    rng = random.Random(0)
    n = 60
    correct = {"good": [float(rng.random() < 0.7) for _ in range(n)],
               "bad": [float(rng.random() < 0.2) for _ in range(n)],
               "mid": [float(rng.random() < 0.45) for _ in range(n)]}
    chosen, cv = select_by_cv(correct, seed=1)
    assert chosen == "good"
    assert 0.5 < cv < 0.9


def test_select_by_cv_ties_go_to_the_cheaper():
    correct = {"a": [1.0, 0.0, 1.0, 0.0], "b": [1.0, 0.0, 1.0, 0.0]}
    assert select_by_cv(correct, {"a": 5.0, "b": 1.0})[0] == "b"
    assert select_by_cv(correct, {"a": 1.0, "b": 5.0})[0] == "a"


def test_prompt_estimator_fit_predict():
    easy = [f"What is {a} + {b}?" for a, b in ((1, 2), (3, 4), (5, 6), (7, 8), (2, 9))]
    hard = [f"What is ({a} + {b}) * {c} - {d}?" for a, b, c, d in ((12, 34, 5, 67), (25, 33, 8, 59), (41, 17, 6, 88))]
    m = PromptDifficultyModel.fit(easy + hard, [0.9] * len(easy) + [0.1] * len(hard), ridge=0.1)
    assert m.predict("What is 4 + 3?") > 0.7
    assert m.predict("What is (19 + 28) * 7 - 45?") < 0.3
    again = PromptDifficultyModel.from_dict(m.to_dict())
    assert again.predict("What is 4 + 3?") == pytest.approx(m.predict("What is 4 + 3?"))
    t = PolicyTable(cuts=[0.2, 0.4, 0.6, 0.8], entries=[], prompt_model=m.to_dict())
    assert prompt_bin(t, "What is 4 + 3?") < prompt_bin(t, "What is (19 + 28) * 7 - 45?")
    assert len(prompt_features("Sam has 4 bags with 6 marbles each.")) == len(m.coef)


def _rec(pid: str, correct: list[bool], last: list[float]) -> dict:
    samples = [{"answer": "1" if c else str(10 + j), "correct": c, "last": s, "steps": 1, "tokens": 10,
                "policy_flops": 1.0} for j, (c, s) in enumerate(zip(correct, last))]
    bon = {"id": pid, "question": "What is 1 + 0?", "samples": samples, "policy_flops": len(samples) * 1.0,
           "reward_flops": 0.0, "question_charge": 0.5}
    return {"bon": bon, "beam_search:beam_width=2,lookahead=0,n=4": {"correct": True, "flops": 4.5}}


def test_route_reuses_probe_samples_and_counts_their_flops():
    from service.offline.calibrate import bon_configs
    from service.offline.fit import route
    from service.offline.calibrate import _cfg

    configs = bon_configs(16) + [_cfg("beam_search", 4, n=4, beam_width=2, lookahead=0)]
    rec = _rec("p", [True, False, False, False] + [True] * 12, [0.9, 0.1, 0.1, 0.1] + [0.5] * 12)
    t = PolicyTable(cuts=[0.2, 0.4, 0.6, 0.8], entries=[], probe={"k": 4, "temperature": 0.8, "max_tokens": 96})
    t.prompt_model = PromptDifficultyModel.fit(["What is 1 + 0?", "What is 2 + 0?"], [0.3, 0.3]).to_dict()
    for b in range(1, 6):
        t.entries.append({"bin": b, "budget_generations": 2, "budget_flops": 2.0, "strategy": "best_of_n",
                          "params": {"n": 2, "selection": "weighted"}, "expected_accuracy": 0, "mean_flops": 2,
                          "n_problems": 1})
        t.entries.append({"bin": b, "budget_generations": 8, "budget_flops": 8.0, "strategy": "beam_search",
                          "params": {"n": 4, "beam_width": 2, "lookahead": 0}, "expected_accuracy": 0,
                          "mean_flops": 4.5, "n_problems": 1})
    # Budget 6: probe (4 samples, 4.5 FLOPs with the question charge) leaves 2 -> best-of-2, served by the probe.
    r = route(t, rec, 6.0, configs, "probe")
    assert r["key"].startswith("best_of_n") and r["flops"] == pytest.approx(4.5) and r["correct"]
    # Budget 20: beam search after the probe; the question is charged once.
    r = route(t, rec, 20.0, configs, "probe")
    assert r["key"].startswith("beam_search") and r["flops"] == pytest.approx(4.5 + 4.5 - 0.5)
    # Budget below the probe: the prompt estimator decides (no probe FLOPs).
    r = route(t, rec, 3.0, configs, "probe")
    assert r["estimator"] == "prompt" and r["flops"] == pytest.approx(2.5)


def test_flops_to_reach_interpolates():
    from service.offline.bench import flops_to_reach

    pts = [{"mean_flops": 1.0, "accuracy": 0.1}, {"mean_flops": 100.0, "accuracy": 0.3}]
    assert flops_to_reach(pts, 0.2) == pytest.approx(10.0)
    assert flops_to_reach(pts, 0.05) == pytest.approx(1.0)
    assert flops_to_reach(pts, 0.4) is None


def test_probe_then_best_of_n_reuses_probe_samples():
    import asyncio

    from service.router.difficulty import best_of_n_with_probe, probe_difficulty
    from service.strategies.base import Problem
    from tests.unit.fakes import BASE_PROMPT, FakePolicy, FakeReward, FlopMeter, round_robin

    right, wrong = "4 + 3 = 7\nThe answer is 7. good", "4 + 3 = 8\nThe answer is 8. bad"
    meter = FlopMeter()
    policy = FakePolicy(round_robin([right, wrong, wrong]), meter)
    reward = FakeReward(meter=meter, flops_per_step=1.0)
    problem = Problem(prompt=BASE_PROMPT, question="Q", max_tokens=40)
    t = PolicyTable(cuts=[0.2, 0.4, 0.6, 0.8], entries=[], probe={"k": 3, "temperature": 0.8, "max_tokens": 40})

    async def go():
        probe = await probe_difficulty(problem, policy, reward, t, meter.budget(None))
        assert len(probe.samples) == 3 and probe.flops == meter.total > 0
        assert 0.0 < probe.statistic < 1.0 and t.bin_of(probe.statistic) == probe.bin
        spent = meter.total
        # n <= k: no new engine call, the vote runs over the probe samples (weighted: the right one scores higher).
        res = await best_of_n_with_probe(problem, policy, reward, meter.budget(None), probe, n=2)
        assert meter.total == spent and res.answer == "7" and res.details["n_used"] == 3
        # n > k: only n - k new samples are drawn and scored.
        calls = len(policy.calls)
        res = await best_of_n_with_probe(problem, policy, reward, meter.budget(None), probe, n=5)
        assert len(policy.calls) == calls + 1 and policy.calls[-1].ns == [2]
        assert len(reward.calls[-1]) == 2 and res.details["n_used"] == 5

    asyncio.run(go())


def test_run_auto_probes_looks_up_and_reuses():
    import asyncio

    from service.router.difficulty import run_auto
    from service.strategies.base import Problem
    from tests.unit.fakes import BASE_PROMPT, FakePolicy, FakeReward, FlopMeter, round_robin

    right, wrong = "4 + 3 = 7\nThe answer is 7. good", "4 + 3 = 8\nThe answer is 8. bad"
    meter = FlopMeter()
    policy = FakePolicy(round_robin([right, wrong]), meter)
    reward = FakeReward(meter=meter)
    problem = Problem(prompt=BASE_PROMPT, question="Q", max_tokens=40)
    t = _table()
    t.probe = {"k": 2, "temperature": 0.8, "max_tokens": 40}
    t.entries = [dict(e, bin=b) for e in t.entries if e["bin"] == 1 for b in range(1, 6)]
    result, info = asyncio.run(run_auto(problem, policy, reward, t, meter.budget(None)))
    assert info["estimator"] == "probe" and info["strategy"] == "best_of_n" and info["params"]["n"] == 16
    assert result.answer == "7" and result.details["n_used"] == 16 and result.details["reused_probe_samples"] == 2
    assert sum(sum(c.ns) for c in policy.calls) == 16  # 2 probe samples + 14 more, never 18
