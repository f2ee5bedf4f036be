"""The zero-decode difficulty head: fitting, persistence and versioning, and `auto` with estimator "hidden" (its one
prefill metered and within the budget, the prompt estimator when it cannot run)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from service.router.hidden_difficulty import HiddenDifficultyHead, load_head, pooled_features
from service.router.table import PolicyTable, load
from tests.unit.fakes import BASE_PROMPT, FakePolicy, FakeReward, FlopMeter, round_robin
from service.strategies.base import SamplingParams


def _data(n: int = 60, d: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    return X, X[:, 0] * 0.5 - X[:, 3] * 0.25 + 0.1


def test_ridge_head_recovers_a_linear_label_and_round_trips(tmp_path):
    X, y = _data()
    head = HiddenDifficultyHead.fit(X, y, ridge=1e-3, metadata={"label": "verifier"})
    assert np.allclose(head.predict_features(X), y, atol=1e-3)
    head.save(tmp_path / "h.npz")
    back = HiddenDifficultyHead.load(tmp_path / "h.npz")
    assert back.version == head.version and back.metadata["label"] == "verifier"
    assert np.allclose(back.predict_features(X), head.predict_features(X), atol=1e-4)  # float32 on disk


def test_pooled_features_are_mean_last_token_max_and_spread():
    h = np.array([[1.0, 2.0], [3.0, 6.0]])
    assert pooled_features(h).tolist() == [2.0, 4.0, 3.0, 6.0, 3.0, 6.0, 1.0, 2.0]
    assert pooled_features(h, ("mean", "last")).tolist() == [2.0, 4.0, 3.0, 6.0]  # what older heads read
    with pytest.raises(ValueError):
        pooled_features(np.zeros((0, 2)))


def test_a_table_refuses_a_head_of_another_version(tmp_path):
    X, y = _data(d=4)
    HiddenDifficultyHead.fit(X, y, ridge=1.0).save(tmp_path / "h.npz")
    with pytest.raises(ValueError, match="refit the table"):
        load_head(tmp_path / "h.npz", version="0" * 16)


class FakeEncoder:
    """Hidden states whose mean is `value` in every dimension; each call charges `flops` to the meter."""

    def __init__(self, meter: FlopMeter, value: float, flops: float = 5.0, fail: bool = False):
        self.meter, self.value, self.flops, self.fail, self.calls = meter, value, flops, fail, 0

    async def encode(self, question: str) -> np.ndarray:
        self.calls += 1
        if self.fail:
            raise RuntimeError("reward worker down")
        self.meter.total += self.flops
        return np.full((3, 2), self.value)

    def estimate_flops(self, question: str) -> float:
        return self.flops


def _hidden_table(tmp_path) -> PolicyTable:
    # The head predicts the first feature (the mean state): a large value is easy (bin 1), a small one hard (bin 5).
    # Two-wide states, four poolings: eight features.
    X = np.random.default_rng(1).normal(size=(40, 8))
    head = HiddenDifficultyHead.fit(X, X[:, 0], ridge=1e-6)
    head.save(tmp_path / "head.npz")
    entries = [{"bin": b, "budget_generations": 1, "budget_flops": 10.0, "strategy": "best_of_n",
                "params": {"n": 1 if b == 5 else 3, "selection": "majority"}, "expected_accuracy": 0.5,
                "mean_flops": 3.0, "n_problems": 5} for b in range(1, 6)]
    table = PolicyTable(cuts=[-1.0, -0.5, 0.5, 1.0], entries=entries, estimator="hidden",
                        hidden_head={"path": "head.npz", "version": head.version})
    table.save(tmp_path / "table.json")
    return load(tmp_path / "table.json")  # the head's path resolves against the table's folder


def _run(table: PolicyTable, encoder, limit: float | None):
    from service.router.difficulty import run_auto
    from service.strategies.base import Problem

    meter = encoder.meter
    policy = FakePolicy(round_robin(["2 + 2 = 4\nThe answer is 4."]), meter)
    problem = Problem(prompt=BASE_PROMPT, question="What is 2 + 2?", max_tokens=40)
    return asyncio.run(run_auto(problem, policy, FakeReward(meter=meter), table, meter.budget(limit),
                                encoder=encoder)), meter


def test_auto_bins_by_the_head_and_pays_its_prefill(tmp_path):
    table = _hidden_table(tmp_path)
    enc = FakeEncoder(FlopMeter(), value=3.0)
    (result, info), meter = _run(table, enc, limit=None)
    assert info["estimator"] == "hidden" and info["bin"] == 1 and info["params"]["n"] == 3
    assert info["probe_flops"] == 5.0 and enc.calls == 1 and meter.total >= 5.0
    enc = FakeEncoder(FlopMeter(), value=-3.0)
    (_, info), _ = _run(table, enc, limit=None)
    assert info["bin"] == 5 and info["params"]["n"] == 1


def test_auto_never_encodes_beyond_the_budget_and_degrades_when_the_worker_fails(tmp_path):
    table = _hidden_table(tmp_path)
    enc = FakeEncoder(FlopMeter(), value=3.0, flops=50.0)
    (_, info), meter = _run(table, enc, limit=20.0)
    assert enc.calls == 0 and info["estimator"] == "prompt" and meter.total <= 20.0
    enc = FakeEncoder(FlopMeter(), value=3.0, fail=True)
    (result, info), _ = _run(table, enc, limit=None)
    assert enc.calls == 1 and info["estimator"] == "prompt" and result.text  # the request still answers


def test_auto_looks_up_the_requests_budget_not_what_the_estimate_left(tmp_path):
    # Two levels: 10 FLOPs -> n=1, 100 FLOPs -> n=3. A request of exactly 100 FLOPs pays the 5-FLOP prefill and
    # must still get the 100-FLOP entry (looking up the 95 left would drop a whole level), within its budget.
    table = _hidden_table(tmp_path)
    table.entries = [dict(e, budget_flops=10.0, params={"n": 1, "selection": "majority"}) for e in table.entries] + \
        [dict(e, budget_generations=16, budget_flops=100.0) for e in table.entries]
    enc = FakeEncoder(FlopMeter(), value=3.0)
    (result, info), meter = _run(table, enc, limit=100.0)
    assert info["estimator"] == "hidden" and info["params"]["n"] == 3 and info["probe_flops"] == 5.0
    assert meter.total <= 100.0 and result.text


def test_auto_skips_the_head_when_its_prefill_would_leave_no_answer(tmp_path):
    # The budget pays one worst-case answer but not the head's prefill on top: the free prompt estimator decides,
    # and the request still gets an answer (paying the prefill would have left nothing to sample with).
    table = _hidden_table(tmp_path)
    one_answer = FakePolicy(round_robin(["x"])).estimate_flops(
        [BASE_PROMPT], SamplingParams(max_tokens=40, temperature=0.8), 1)
    enc = FakeEncoder(FlopMeter(), value=3.0, flops=one_answer / 2)
    (result, info), meter = _run(table, enc, limit=one_answer * 1.2)
    assert enc.calls == 0 and info["estimator"] == "prompt" and result.samples == 1 and result.text
    assert meter.total <= one_answer * 1.2
    enc = FakeEncoder(FlopMeter(), value=3.0, flops=one_answer / 2)
    (result, info), _ = _run(table, enc, limit=one_answer * 1.6)
    assert enc.calls == 1 and info["estimator"] == "hidden" and result.samples >= 1


def _bank_problems(n: int, seed: int = 0) -> tuple[list[dict], dict[str, np.ndarray]]:
    from tests.unit.offline_fakes import correct_or_distinct

    rng = np.random.default_rng(seed)
    problems, feats = [], {}
    for i in range(n):
        k = int(rng.integers(0, 9))
        problems.append(correct_or_distinct(f"q{i}", k, n=8))
        feats[f"q{i}"] = np.r_[k / 8 + rng.normal(scale=0.05), rng.normal(size=5)]
    return problems, feats


def test_the_table_is_fitted_on_out_of_fold_predictions_never_on_a_problems_own_label():
    from service.offline.bank import is_held_out
    from service.offline.evaluate import fit_predictions

    problems, feats = _bank_problems(60)
    head = HiddenDifficultyHead.fit(np.stack([feats[p["id"]] for p in problems]), [0.0] * 60, 10.0,
                                    {"label": "pass_at_1", "ridge": 10.0})
    pred = fit_predictions(head, feats, problems, 0.3)
    fit_ids = [p["id"] for p in problems if not is_held_out(p["id"], 0.3)]
    assert sorted(pred) == sorted(fit_ids)  # the held-out problems are never part of the folds
    truth = {p["id"]: np.mean([s["correct"] for s in p["samples"]]) for p in problems}
    assert np.corrcoef([pred[i] for i in fit_ids], [truth[i] for i in fit_ids])[0, 1] > 0.9
    # Flip one fitted problem's label: its own prediction must not move (its fold never saw it), others' may.
    j = next(k for k, p in enumerate(problems) if p["id"] == fit_ids[0])
    flipped = [dict(p, samples=[dict(s, correct=not s["correct"]) for s in p["samples"]]) if k == j else p
               for k, p in enumerate(problems)]
    again = fit_predictions(head, feats, flipped, 0.3)
    assert again[fit_ids[0]] == pytest.approx(pred[fit_ids[0]], abs=1e-12)
    assert any(abs(again[i] - pred[i]) > 1e-6 for i in fit_ids[1:])


def test_replay_cuts_the_tables_bins_on_the_fit_predictions_when_given():
    from service.offline.evaluate import evaluate

    problems, _ = _bank_problems(40, seed=1)
    hidden = {"path": "head.npz", "version": "v", "encode_flops": {p["id"]: 1.0 for p in problems},
              "prediction": {p["id"]: float(i) for i, p in enumerate(problems)},
              "fit_prediction": {p["id"]: 100.0 + i for i, p in enumerate(problems)}}
    rep, table = evaluate({"models": {}}, problems, "prm", r=4, n_boot=20, hidden=hidden)
    assert table.cuts and min(table.cuts) > 100.0
    assert rep["hidden_estimator"]["table_fitted_on"].startswith("out-of-fold")


def test_a_feature_cache_of_other_poolings_is_not_read(tmp_path):
    from service.offline.train_difficulty import load_features, save_features

    path = tmp_path / "bank.hidden-10l.npz"
    save_features(path, {"a": np.ones(4, np.float32)}, ("mean", "last"))
    assert set(load_features(path, ("mean", "last"))) == {"a"}
    assert load_features(path, ("mean", "last", "max", "std")) == {}  # re-encoded, never mixed
    np.savez_compressed(path, ids=np.array(["a"]), features=np.ones((1, 4), np.float32))  # a cache from before
    assert set(load_features(path, ("mean", "last"))) == {"a"} and load_features(path) == {}


def test_the_logit_label_orders_like_pass_at_1_and_stays_finite_at_0_and_32_of_32():
    from service.offline.train_difficulty import labels
    from tests.unit.offline_fakes import correct_or_distinct

    problems = [correct_or_distinct(f"q{k}", k, n=32) for k in (0, 1, 16, 32)]
    labs = labels(problems)
    assert labs["pass_at_1"].tolist() == [0.0, 1 / 32, 0.5, 1.0]
    logit = labs["logit_pass_at_1"]
    assert np.all(np.isfinite(logit)) and np.all(np.diff(logit) > 0)
    assert logit[2] == pytest.approx(0.0) and logit[0] == pytest.approx(-logit[3])


def test_the_held_out_spearman_carries_a_bootstrap_interval_around_it():
    from service.offline.bench_checks import spearman
    from service.offline.train_difficulty import spearman_interval

    rng = np.random.default_rng(3)
    x = rng.normal(size=300)
    y = x + rng.normal(size=300)
    lo, hi = spearman_interval(x, y)
    assert lo < spearman(list(x), list(y)) < hi and hi - lo < 0.25
    assert spearman_interval(x[:5], y[:5]) is None  # too few problems to say anything
