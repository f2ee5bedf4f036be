"""Replay of the sample bank against analytic answers, and the percentile bootstrap's coverage."""

from __future__ import annotations

import random
from math import comb

import numpy as np

from service.offline.replay import (BonConfig, bank_arrays, bootstrap_weights, efficiency_ratio, orderings, replay,
                                    with_intervals)
from service.strategies.voting import Candidate, select
from tests.unit.offline_fakes import correct_or_distinct, problem, sample


def test_pass_at_1_and_best_of_n_match_the_hypergeometric_formula():
    counts = [0, 1, 4, 16, 32]
    bank = bank_arrays([correct_or_distinct(f"p{c}", c) for c in counts])
    assert np.allclose(bank.pass_at_1, [c / 32 for c in counts])
    configs = [BonConfig(n, sel) for n in (1, 4, 16) for sel in ("weighted", "best")]
    acc, flops = replay(bank, configs, r=4000, seed=3)
    for i, c in enumerate(counts):
        for k, cfg in enumerate(configs):
            expected = 1 - comb(32 - c, cfg.n) / comb(32, cfg.n)  # P(a correct sample among the first N)
            assert abs(acc[i, k] - expected) < 0.03, (c, cfg)
            assert flops[i, k] == cfg.n  # policy FLOPs 1 per sample, no reward FLOPs, no question charge


def test_votes_match_the_serving_selection_on_every_ordering():
    rng = random.Random(0)
    problems = []
    for p in range(12):
        smp = []
        for _ in range(8):
            a = rng.choice(["1", "2", "3", None])
            smp.append(sample(a, a == "2", rng.choice([0.1, 0.5, 0.5, 0.9])))
        problems.append(problem(f"q{p}", smp))
    bank = bank_arrays(problems)
    configs = [BonConfig(n, sel, "last", "prm") for n in (1, 2, 4, 8) for sel in ("majority", "weighted", "best")]
    acc, _ = replay(bank, configs, r=1, seed=11)
    order = orderings(len(problems), 8, 1, 11)
    for i, prob in enumerate(problems):
        for k, cfg in enumerate(configs):
            first = [prob["samples"][j] for j in order[i, 0, :cfg.n]]
            score = (lambda s: 1.0) if cfg.selection == "majority" else (lambda s: s["scores"]["prm"][-1])
            cands = [Candidate("", s["answer"], score(s)) for s in first]
            chosen = select(cands, cfg.selection).candidate  # type: ignore[arg-type]
            expected = bool(first[next(j for j, c in enumerate(cands) if c is chosen)]["correct"])
            assert acc[i, k] == float(expected), (i, cfg)


def test_reward_flops_count_only_when_a_verifier_is_used():
    bank = bank_arrays([correct_or_distinct("a", 3, flops=2.0, reward_flops=1.0)])
    configs = [BonConfig(4, "majority"), BonConfig(4, "weighted", "last", "prm"),
               BonConfig(4, "weighted", "last", "arith")]
    _, flops = replay(bank, configs, r=8)
    assert flops[0].tolist() == [8.0, 12.0, 8.0]


def test_bootstrap_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    hits, trials = 0, 300
    for t in range(trials):
        x = (rng.random((80, 1)) < 0.3).astype(float)
        ci = with_intervals(x, bootstrap_weights(80, 400, seed=t))
        hits += ci["lo"][0] <= 0.3 <= ci["hi"][0]
    assert 0.88 <= hits / trials <= 0.99


def test_efficiency_ratio_interpolates_and_says_not_reached():
    base_acc, base_flops = [0.2, 0.4, 0.5], [1.0, 4.0, 16.0]
    ratio, target, f_base = efficiency_ratio(base_acc, base_flops, [0.3, 0.5], [1.0, 4.0])
    assert (ratio, target, f_base) == (4.0, 0.5, 16.0)
    ratio, *_ = efficiency_ratio(base_acc, base_flops, [0.3, 0.45], [1.0, 4.0])
    assert ratio is None
