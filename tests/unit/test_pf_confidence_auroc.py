"""The confidence benchmark's AUROC helpers: the Mann-Whitney area (ties count half) and its pooled and
within-problem summaries."""

from __future__ import annotations

import pytest

from benchmarks.pf_confidence import auroc, auroc_summary


def test_auroc_is_one_for_a_perfect_ranking_zero_for_a_reversed_one_and_half_for_ties():
    assert auroc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert auroc([0.1], [0.5, 0.9]) == 0.0
    assert auroc([0.5, 0.5], [0.5]) == 0.5
    # 0.9 beats 0.3 and 0.6, 0.6 beats 0.3, 0.6 ties 0.6: (3 + 0.5) / 4
    assert auroc([0.9, 0.6], [0.3, 0.6]) == pytest.approx(3.5 / 4)


def test_auroc_is_undefined_without_both_classes():
    assert auroc([], [0.1]) is None and auroc([0.2], []) is None


def _s(score: float, correct: bool) -> dict:
    return {"x": score, "correct": correct}


def test_summary_pools_all_samples_and_averages_only_problems_with_both_outcomes():
    problems = [
        [_s(0.9, True), _s(0.1, False)],           # ranked right: 1.0
        [_s(0.2, True), _s(0.8, False)],           # ranked wrong: 0.0
        [_s(0.5, False), _s(0.4, False)],          # no correct sample: left out of "within"
    ]
    out = auroc_summary(problems, "x")
    assert out["within_problems"] == 2 and out["within_mean"] == pytest.approx(0.5)
    # pooled: positives 0.9, 0.2 against negatives 0.1, 0.8, 0.5, 0.4 -> 0.9 wins 4, 0.2 wins 1 -> 5/8
    assert out["overall"] == pytest.approx(5 / 8)
    assert out["samples"] == 6 and out["problems"] == 3


def test_summary_of_no_problems_is_empty_not_an_error():
    out = auroc_summary([], "x")
    assert out["overall"] is None and out["within_mean"] is None and out["within_problems"] == 0


def test_intervals_resample_problems_and_collapse_when_every_problem_ranks_perfectly():
    from benchmarks.pf_confidence import auroc_intervals

    perfect = [[_s(0.9, True), _s(0.1, False)] for _ in range(5)]
    out = auroc_intervals(perfect, "x", n_boot=200)
    assert out == {"overall_ci95": [1.0, 1.0], "within_ci95": [1.0, 1.0]}
    mixed = [[_s(0.9, True), _s(0.1, False)], [_s(0.2, True), _s(0.8, False)]] * 4
    lo, hi = auroc_intervals(mixed, "x", n_boot=300)["within_ci95"]
    assert 0.0 <= lo < 0.5 < hi <= 1.0  # half the problems ranked right, half wrong: the interval straddles 0.5
    assert auroc_intervals([], "x") == {"overall_ci95": None, "within_ci95": None}
