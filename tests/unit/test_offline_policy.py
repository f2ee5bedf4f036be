"""Snell's oracle compute-optimal policy (a case where its efficiency ratio is exactly 4) and the evidence table:
shrinkage settles 0-of-9 ties by the pooled curve, hopeless bins spend nothing more, monotone in budget, and the
table is one the router loads and can run."""

from __future__ import annotations

import numpy as np
import pytest

from service.offline.policy import choose_with_shrinkage, compute_optimal_cv, evidence_table, quantile_bins
from service.offline.replay import BonConfig, bootstrap_weights, ratio_with_interval
from service.router.table import load
from service.strategies import build_strategy

NS = (1, 2, 4, 8, 16)


def _oracle_case():
    """8 easy problems (every config right) and 6 medium ones: weighted is right only at N = 16, majority from N = 8.
    One sample costs 1 FLOP. Best-of-N weighted needs 16 FLOPs per problem for 100%; the oracle policy gives the easy
    bin N = 1 and the medium bin majority N = 8: (8 * 1 + 6 * 8) / 14 = 4 FLOPs. Ratio: exactly 4."""
    configs = [BonConfig(n, "weighted") for n in NS] + [BonConfig(n, "majority") for n in NS]
    easy = [1.0] * 10
    medium = [0, 0, 0, 0, 1] + [0, 0, 0, 1, 1]
    acc = np.array([easy] * 8 + [medium] * 6, float)
    flops = np.tile(np.array([c.n for c in configs], float), (14, 1))
    pass1 = np.array([1.0] * 8 + [0.1] * 6)
    return configs, acc, flops, pass1


def test_oracle_policy_ratio_is_exactly_four():
    configs, acc, flops, pass1 = _oracle_case()
    _, bins = quantile_bins(pass1)
    assert set(bins[:8]) == {1} and len(set(bins[8:])) == 1 and bins[8] > 1
    res = compute_optimal_cv(acc, flops, bins, [1, 2, 4, 8, 16])
    assert res["accuracy"].mean(0).tolist() == [8 / 14] * 3 + [1.0, 1.0]
    assert res["flops"].mean(0)[3] == 4.0
    base = [k for k, c in enumerate(configs) if c.selection == "weighted"]
    r = ratio_with_interval(acc[:, base], flops[:, base], res["accuracy"], res["flops"], bootstrap_weights(14, 200))
    assert r["ratio"] == 4.0 and r["target_accuracy"] == 1.0 and r["baseline_flops"] == 16.0
    assert r["not_reached_share"] == 0.0 and r["lo"] <= 4.0 <= r["hi"]


def test_zero_of_nine_tie_is_settled_by_the_pooled_prior():
    acc_bin = np.zeros((9, 3))                   # nothing solved in this bin by any config
    pooled = np.array([0.10, 0.30, 0.25])        # but across all problems config 1 is the strongest
    cost = np.array([1.0, 4.0, 4.0])
    picks = choose_with_shrinkage(acc_bin, cost, pooled, [1.0, 4.0], strength=4.0, hopeless=False, cheapest=0,
                                  min_gain=0.0)
    assert [k for k, _ in picks] == [0, 1]
    assert abs(picks[1][1] - 4 * 0.30 / 13) < 1e-12   # posterior mean (0 + 4 * 0.3) / (9 + 4)


def test_hopeless_bin_spends_nothing_more():
    acc_bin = np.zeros((9, 3))
    picks = choose_with_shrinkage(acc_bin, np.array([1.0, 4.0, 16.0]), np.array([0.1, 0.3, 0.4]), [1, 4, 16], 4.0,
                                  hopeless=True, cheapest=0)
    assert [k for k, _ in picks] == [0, 0, 0]


def test_small_gains_do_not_buy_more_samples():
    acc_bin = np.array([[0.5, 0.51]] * 20)
    picks = choose_with_shrinkage(acc_bin, np.array([1.0, 8.0]), np.array([0.5, 0.5]), [1, 8], 4.0, False, 0,
                                  min_gain=0.02)
    assert [k for k, _ in picks] == [0, 0]


def test_choice_is_monotone_in_budget_on_random_inputs():
    rng = np.random.default_rng(0)
    for _ in range(50):
        k = 6
        acc_bin = (rng.random((int(rng.integers(1, 12)), k)) < rng.random(k)).astype(float)
        cost = np.sort(rng.random(k) * 10)
        picks = choose_with_shrinkage(acc_bin, cost, rng.random(k), sorted(rng.random(5) * 12), 4.0, False, 0)
        post = [p for _, p in picks]
        assert all(b >= a - 1e-12 for a, b in zip(post, post[1:]))


def test_evidence_table_is_a_router_table(tmp_path):
    configs = [BonConfig(n, "weighted") for n in NS] + [BonConfig(n, "majority") for n in NS]
    rng = np.random.default_rng(2)
    P = 40
    stat = rng.random(P)
    acc = np.clip(stat[:, None] + 0.05 * np.log2([c.n for c in configs])[None, :] - 0.3, 0, 1)
    acc[quantile_bins(stat)[1] == 5] = 0.0         # the hardest bin: never solved
    flops = np.tile(np.array([c.n for c in configs], float) * 1e9, (P, 1))
    gen = {"per_generation": 1e9, "question_charge": 0.0}
    table = evidence_table(acc, flops, configs, stat, acc.max(1) > 0, (1, 4, 16), gen, "prm*arith",
                           questions=[f"What is {i} + {i}?" for i in range(P)])
    table.save(tmp_path / "t.json")
    loaded = load(tmp_path / "t.json")
    assert {e["bin"] for e in loaded.entries} == {1, 2, 3, 4, 5}
    for b in range(1, 6):
        rows = [e for e in loaded.entries if e["bin"] == b]
        assert [e["budget_generations"] for e in rows] == [1, 4, 16]
        post = [e["expected_accuracy"] for e in rows]
        assert post == sorted(post)
        choice = loaded.lookup(b, 16e9)
        assert choice is not None and choice.strategy == "best_of_n"
        build_strategy(choice.strategy, choice.params)  # the serving side accepts the params
    hopeless = [e for e in loaded.entries if e["hopeless"]]
    assert hopeless and all(e["params"]["n"] == 1 for e in hopeless)
    assert loaded.prompt_model is not None


def test_auto_replay_pays_for_its_probe_and_reuses_it():
    from service.offline.auto_replay import auto_outcomes
    from service.offline.replay import bank_arrays, replay_orderings
    from service.router.table import PolicyTable
    from tests.unit.offline_fakes import correct_or_distinct

    bank = bank_arrays([correct_or_distinct(f"p{i}", c, reward_flops=0.5) for i, c in enumerate([0, 2, 8, 32])])
    configs = [BonConfig(n, "weighted") for n in NS] + [BonConfig(n, "majority") for n in NS]
    ok, cost, order = replay_orderings(bank, configs, r=16)
    entries = [{"bin": b, "budget_generations": g, "budget_flops": g * 1.5, "strategy": "best_of_n",
                "params": {"n": n, "selection": sel, "aggregation": "last"}, "expected_accuracy": 0.0,
                "mean_flops": 0.0, "n_problems": 1}
               for b in range(1, 6) for g, n, sel in ((1, 1, "weighted"), (16, 2, "majority"))]
    table = PolicyTable(cuts=[0.2, 0.4, 0.6, 0.8], entries=entries, reward_backend="prm*arith")
    table.prompt_model = None
    acc, flops, probe_used = auto_outcomes(table, bank, configs, ok, cost, order, [1.5, 12.0, 24.0])
    # 1.5 FLOPs: the 4-sample probe (6 FLOPs) does not fit; the prompt estimator's bin, best-of-1 weighted.
    assert probe_used[:, 0].tolist() == [0.0] * 4 and flops[:, 0].tolist() == [1.5] * 4
    # 12 FLOPs: probe of 4 samples (policy 4 + reward 2); the request's budget is below the 24-FLOP entry:
    # best-of-1 weighted, which reuses the probe: a weighted vote over the 4 probe samples.
    w4, maj4 = (next(k for k, c in enumerate(configs) if c.n == 4 and c.selection == s)
                for s in ("weighted", "majority"))
    assert probe_used[:, 1].tolist() == [1.0] * 4 and flops[:, 1].tolist() == [6.0] * 4
    assert np.allclose(acc[:, 1], ok[:, :, w4].mean(1))
    # 24 FLOPs: the entry is looked up with the request's budget, not the 18 the probe left: majority n=2 -> a
    # majority vote over the 4 probe samples; the probe's scoring is paid.
    assert flops[:, 2].tolist() == [6.0] * 4 and np.allclose(acc[:, 2], ok[:, :, maj4].mean(1))


def _strength_case(informative: bool, seed: int = 0):
    """Two kinds of problem: on the easy fifth majority is best, on the hard rest weighted. Pooled, weighted wins by
    far, so a strong prior overrules the easy bin's own evidence. `informative`: the statistic tells the kinds
    apart; otherwise it is noise, every bin holds both kinds, and a bin's own winner is luck."""
    configs = [BonConfig(n, "weighted") for n in NS] + [BonConfig(n, "majority") for n in NS]
    rng = np.random.default_rng(seed)
    P = 300
    hard = rng.random(P) < 0.8
    stat = np.where(hard, 0.0, 1.0) + rng.normal(scale=0.1, size=P) if informative else rng.random(P)
    easy_curve = np.array([0.5, 0.6, 0.7, 0.8, 0.9, 0.5, 0.7, 0.95, 0.95, 0.95])
    hard_curve = np.array([0.1, 0.3, 0.5, 0.6, 0.7, 0.1, 0.1, 0.1, 0.2, 0.3])
    expected = np.where(hard[:, None], hard_curve[None, :], easy_curve[None, :])
    draws = 16 if informative else 1  # replay averages orderings; one draw is the noisiest evidence
    acc = (rng.random((draws, P, len(configs))) < expected).mean(0)
    flops = np.tile(np.array([c.n for c in configs], float), (P, 1))
    return configs, acc, flops, stat


def test_cross_validated_prior_strength_trusts_bins_only_where_they_carry_evidence():
    from service.offline.policy import cv_prior

    gen = {"per_generation": 1.0, "question_charge": 0.0}
    picks = {}
    for informative in (True, False):
        configs, acc, flops, stat = _strength_case(informative)
        prior, s, scores = cv_prior(acc, flops, configs, stat, acc.max(1) > 0, (1, 4, 16), gen, "prm*arith",
                                    [1.0, 4.0, 16.0], priors=("level",))
        assert set(scores) == {f"level {x:g}" for x in (1, 2, 4, 8, 16, 32, 64, 128)} and prior == "level"
        assert scores[f"level {s:g}"]["within_one_se"]
        picks[informative] = s
    assert picks[True] <= 16.0     # bins that separate the kinds: their own evidence beats the pooled curve
    assert picks[False] >= 32.0    # bins of noise: lean on the pooled curve


def test_the_scaled_prior_does_not_lend_a_hard_bin_the_pooled_gain_of_sampling_more():
    """Pooled, N = 16 gains 8 points over N = 1; in the hard bin it gains 0.2. A prior centred on the pooled
    accuracy lends the hard bin most of the 8 points and buys N = 16 there; one centred on the pooled curve at the
    bin's own level does not."""
    from service.offline.policy import bin_prior, choose_with_shrinkage

    pooled = np.array([0.07, 0.15])              # N = 1, N = 16
    hard = np.tile([0.005, 0.007], (180, 1))     # the bin's own per-problem accuracies
    cost = np.array([1.0, 16.0])
    assert np.allclose(bin_prior(pooled, hard, "level"), pooled)
    assert np.allclose(bin_prior(pooled, hard, "scaled"), pooled * 0.006 / 0.11)
    picks = {kind: choose_with_shrinkage(hard, cost, bin_prior(pooled, hard, kind), [16.0], 64.0, False, 0)[0][0]
             for kind in ("level", "scaled")}
    assert picks == {"level": 1, "scaled": 0}
    with pytest.raises(ValueError):
        bin_prior(pooled, hard, "flat")


def test_cv_breaks_a_tie_in_accuracy_by_what_the_tables_spend():
    """N = 4 and N = 16 are equally accurate: the tables reach the same CV accuracy within noise, and between the
    prior kinds at the strongest tied strength the one whose table spends least wins."""
    from service.offline.policy import cv_prior

    configs, acc, flops, stat = _strength_case(True)
    n16 = next(k for k, c in enumerate(configs) if c.n == 16 and c.selection == "weighted")
    n4 = next(k for k, c in enumerate(configs) if c.n == 4 and c.selection == "weighted")
    acc[:, n16] = acc[:, n4]
    gen = {"per_generation": 1.0, "question_charge": 0.0}
    prior, s, scores = cv_prior(acc, flops, configs, stat, acc.max(1) > 0, (1, 4, 16), gen, "prm*arith",
                                [1.0, 4.0, 16.0])
    tied = [k for k, v in scores.items() if v["within_one_se"]]
    assert f"{prior} {s:g}" in tied and s == max(float(k.split()[1]) for k in tied)
    rivals = [k for k in tied if float(k.split()[1]) == s]
    assert scores[f"{prior} {s:g}"]["flops"] == min(scores[k]["flops"] for k in rivals)


def test_a_request_is_held_to_its_budget_n_shrinks_to_what_it_pays():
    from service.offline.policy import config_index, served_config
    from service.offline.stopping import StoppingRule

    rule = StoppingRule(0.95, hopeless_k=4, score_threshold=0.2)
    configs = [BonConfig(n, "weighted") for n in NS] + [BonConfig(16, "weighted", stop=rule)]
    index = config_index(configs, "prm*arith")
    flops = np.array([float(c.n) for c in configs[:-1]] + [6.0])  # the stopping rule stops early on this problem
    at = lambda n: next(k for k, c in enumerate(configs) if c.n == n and c.stop is None)  # noqa: E731
    weighted16 = configs[at(16)].params
    assert served_config(weighted16, index, flops, 16.0) == at(16)
    assert served_config(weighted16, index, flops, 5.0) == at(4)        # halved until it fits
    assert served_config(weighted16, index, flops, 0.5) is None         # not even one sample: no answer
    assert served_config(weighted16, index, flops, 3.0, floor=4) is None  # the probe's 4 samples are already drawn
    stop16 = configs[-1].params
    assert served_config(stop16, index, flops, 7.0) == len(configs) - 1  # its realized FLOPs fit
    assert served_config(stop16, index, flops, 5.0) == at(4)  # the grid has no stopping rule at N = 8: dropped


def test_replayed_auto_never_spends_over_a_requests_budget():
    from service.offline.auto_replay import hidden_auto_outcomes
    from service.router.table import PolicyTable

    rng = np.random.default_rng(0)
    configs = [BonConfig(n, "weighted") for n in NS] + [BonConfig(n, "majority") for n in NS]
    P = 50
    per_sample = rng.uniform(0.5, 2.0, P)  # long and short problems
    flops = per_sample[:, None] * np.array([c.n for c in configs], float)[None, :]
    acc = rng.random((P, len(configs)))
    entries = [{"bin": b, "budget_generations": g, "budget_flops": float(g), "strategy": "best_of_n",
                "params": BonConfig(g, "weighted").params, "expected_accuracy": 0.5, "mean_flops": float(g),
                "n_problems": 10} for b in range(1, 6) for g in (1, 4, 16)]
    table = PolicyTable(cuts=[0.2, 0.4, 0.6, 0.8], entries=entries, estimator="hidden")
    budgets = [1.0, 4.0, 16.0]
    encode = np.full(P, 0.1)
    a, f = hidden_auto_outcomes(table, acc, flops, configs, rng.random(P), encode, budgets, ["q"] * P)
    assert np.all(f <= np.array(budgets)[None, :] * 1.0001)
    # A problem whose one sample costs more than the whole budget gets no answer and spends nothing.
    dear = np.flatnonzero(per_sample > 1.0)
    assert np.all(a[dear, 0] == 0.0) and np.all(f[dear, 0] == 0.0)
    assert np.any(a[:, 2] > 0)
