"""Pure parts of `bench`: rank correlation, the revisions harm count, and rescoring draws for another backend."""

from __future__ import annotations

import pytest

from service.offline.bench_checks import _ranks, revisions_harm, spearman
from service.offline.fit import bon_outcome, rescore


def test_ranks_average_ties_and_spearman():
    assert _ranks([10, 20, 20, 5]) == [1.0, 2.5, 2.5, 0.0]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [7, 7, 7]) is None  # no variation, no correlation
    assert spearman([1, 2], [1, 2]) is None  # too few points


def test_revisions_harm_counts_correct_to_wrong_over_runs():
    recs = {
        "p1": {"revisions:chain_length=2,n=4": {"gold": "7", "chains": [["7", "8"], ["6", "7"]]},
               "bon": {}},
        "p2": {"revisions:chain_length=2,n=4": {"gold": "3", "chains": [["3", "3"], [None, "4"]]}},
        "p3": {"revisions:chain_length=2,n=4": {"gold": "1", "correct": False}},  # no chains recorded
    }
    harm = revisions_harm(recs)
    assert harm == {"runs": 2, "revisions": 4, "from_correct": 2, "correct_to_wrong": 1, "wrong_to_correct": 1,
                    "correct_to_wrong_rate": 0.5}


def test_rescore_swaps_the_vote_weights_and_drops_searches():
    samples = [{"answer": "5", "correct": True, "last": 0.9, "last_by": {"arith": 0.2, "prm": 0.9},
                "policy_flops": 10.0},
               {"answer": "6", "correct": False, "last": 0.1, "last_by": {"arith": 0.8, "prm": 0.1},
                "policy_flops": 10.0},
               {"answer": "6", "correct": False, "last": 0.1, "last_by": {"arith": 0.1, "prm": 0.1},
                "policy_flops": 10.0}]
    rec = {"bon": {"samples": samples, "reward_flops": 30.0, "question_charge": 1.0}, "beam_search:n=4": {}}
    assert bon_outcome(rec["bon"], 3, "weighted") == (True, 61.0)  # prm weights: 0.9 for "5" vs 0.2 for "6"
    arith = rescore(rec, "arith")
    assert set(arith) == {"bon"} and arith["bon"]["reward_flops"] == 0.0
    assert bon_outcome(arith["bon"], 3, "weighted") == (False, 31.0)  # calculator weights: 0.2 vs 0.9
    assert rec["bon"]["samples"][0]["last"] == 0.9  # the original record is untouched
    for s in samples:
        s["last_by"].update({"confidence": 0.5, "confidence*arith": 0.5 * s["last_by"]["arith"],
                             "prm*arith": s["last_by"]["prm"] * s["last_by"]["arith"]})
    # The policy's own confidence costs no reward FLOPs; anything the PRM scored keeps its FLOPs.
    assert rescore(rec, "confidence")["bon"]["reward_flops"] == 0.0
    assert rescore(rec, "confidence*arith")["bon"]["reward_flops"] == 0.0
    assert rescore(rec, "prm*arith")["bon"]["reward_flops"] == 30.0
