"""Early-stopping rules on scripted vote sequences, and the vectorised replay agreeing with the pure rule."""

from __future__ import annotations

import random

import numpy as np

from service.offline.replay import bank_arrays, orderings
from service.offline.stopping import (StoppingRule, beta_leader_probability, betainc, dirichlet_leader_probability,
                                      replay_stopping, stop_reason)
from tests.unit.offline_fakes import problem, sample


def _first_stop(answers, scores, rule):
    for n in range(1, len(answers) + 1):
        why = stop_reason(answers[:n], scores[:n], rule)
        if why:
            return n, why
    return len(answers), None


def test_beta_probability_is_exact():
    # I_0.5(a, b) for integers is a binomial tail: P(Bin(a + b - 1, 1/2) >= a).
    from math import comb

    for a, b in ((3, 5), (10, 2), (17, 17), (1, 1)):
        tail = sum(comb(a + b - 1, j) for j in range(a, a + b)) / 2 ** (a + b - 1)
        assert abs(float(betainc(a, b, 0.5)) - tail) < 1e-12
    assert np.allclose(beta_leader_probability([1, 2, 3, 4], [0, 0, 0, 0]), [0.75, 0.875, 0.9375, 0.96875])


def test_unanimous_votes_settle_after_four():
    rule = StoppingRule(0.95, hopeless_k=None)
    assert _first_stop(["7"] * 8, [0.5] * 8, rule) == (4, "settled")   # 1 - 2^-5 = 0.969 > 0.95 > 0.9375


def test_a_split_vote_never_settles():
    rule = StoppingRule(0.95, hopeless_k=None)
    assert _first_stop(["7", "8"] * 8, [0.5] * 16, rule) == (16, None)


def test_a_lead_settles_later_than_unanimity():
    rule = StoppingRule(0.95, hopeless_k=None)
    n, why = _first_stop(["7", "8", "7", "7", "7", "7", "7", "7", "7", "7"], [0.5] * 10, rule)
    assert why == "settled" and n == 7    # Beta(7, 2): P(X > 0.5) = 0.965; at 6 votes Beta(6, 2): 0.9375


def test_hopeless_needs_no_repeat_and_low_scores():
    rule = StoppingRule(0.95, hopeless_k=4, score_threshold=0.2)
    assert _first_stop(["1", "2", None, "4", "5"], [0.1] * 5, rule) == (4, "hopeless")
    assert _first_stop(["1", "2", "1", "4", "5"], [0.1] * 5, rule)[1] is None
    assert _first_stop(["1", "2", "3", "4", "5"], [0.1, 0.1, 0.9, 0.1, 0.1], rule)[1] is None


def test_dirichlet_counts_the_unseen_answers():
    assert dirichlet_leader_probability([6]) > 0.95            # alpha (7, 1): 1 - 2^-7
    assert dirichlet_leader_probability([2]) < 0.95            # alpha (3, 1): 0.875
    assert dirichlet_leader_probability([3, 3]) < 0.6
    rule = StoppingRule(0.95, criterion="dirichlet", hopeless_k=None)
    assert _first_stop(["7"] * 8, [0.5] * 8, rule) == (4, "settled")  # alpha (5, 1): 0.969


def test_replay_applies_the_same_rule_as_the_pure_function():
    rng = random.Random(4)
    problems = []
    for p in range(10):
        pool = ["1", "2"] if p % 2 else ["1", "2", "3", "4", "5", "6", None]
        smp = []
        for _ in range(16):
            a = rng.choice(pool)
            smp.append(sample(a, a == "1", rng.choice([0.05, 0.1, 0.6])))
        problems.append(problem(f"s{p}", smp))
    bank = bank_arrays(problems)
    rule = StoppingRule(0.9, hopeless_k=4, score_threshold=0.2)
    r = 6
    out = replay_stopping(bank, rule, n_max=16, r=r, seed=5, backend="prm")
    order = orderings(len(problems), 16, r, 5)
    for i, prob in enumerate(problems):
        used = []
        for o in range(r):
            seq = [prob["samples"][j] for j in order[i, o]]
            # canonical answers: the bank's answer groups
            answers = [None if bank.group[i, j] < 0 else int(bank.group[i, j]) for j in order[i, o]]
            used.append(_first_stop(answers, [s["scores"]["prm"][-1] for s in seq], rule)[0])
        assert abs(out["samples"][i] - np.mean(used)) < 1e-9, i
    assert (out["accuracy"] <= 1).all() and (out["samples"] <= 16).all()
