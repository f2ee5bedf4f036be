"""Difficulty estimation for the router.

(a) `probe_difficulty`: Snell's model-predicted difficulty. k samples at temperature 0.8, scored by the configured
    reward; the statistic is the mean last-step score. Its FLOPs land on the request's meter (they count against the
    budget), and its samples come back so the chosen strategy can reuse them (`best_of_n_with_probe`).
(b) `PromptDifficultyModel`: no decoding at all. A ridge regression over prompt statistics (length, numbers, digits,
    operators, parentheses, cue words) fitted at calibration time to predict the probe statistic; the table's cut
    points turn the prediction into a bin.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..strategies.base import Completion, ComputeBudget, Policy, Problem, Reward, SamplingParams, StrategyResult
from ..strategies.best_of_n import Prior
from ..strategies.calls import BudgetedCalls
from ..strategies.params import DEFAULT_STEP_DELIMITER
from ..strategies.steps import split_steps
from ..strategies.voting import aggregate_scores
from .table import PolicyTable, choose, uses_probe

log = logging.getLogger("ttc.router")


# ---- (a) the probe ---------------------------------------------------------------------------------------------

@dataclass
class ProbeResult:
    statistic: float
    bin: int
    samples: list[Completion]
    # Step scores per sample (None when the budget did not allow scoring: the statistic is then 0, bin 5).
    scores: list[list[float]] | None
    flops: float
    budget_exhausted: bool = False


def probe_statistic(scores: Sequence[Sequence[float]]) -> float:
    """Mean last-step score over the probe samples (a sample without steps scores 0)."""
    return sum(aggregate_scores(row, "last") for row in scores) / len(scores) if scores else 0.0


async def probe_difficulty(problem: Problem, policy: Policy, reward: Reward, table: PolicyTable,
                           budget: ComputeBudget | None = None, k: int | None = None) -> ProbeResult:
    """Draw k samples (table.probe: k, temperature), score them, bin the mean last-step score."""
    budget = budget or ComputeBudget.unlimited()
    k = int(k or table.probe.get("k", 4))
    before = budget.spent
    calls = BudgetedCalls(policy, reward, budget, problem.seed)
    sampling = SamplingParams(max_tokens=problem.max_tokens, temperature=float(table.probe.get("temperature", 0.8)),
                              top_p=problem.top_p, stop=problem.stop)
    await calls.count_prompt_tokens([problem.prompt])
    k = calls.affordable(problem.prompt, sampling, k)
    if k == 0:
        return ProbeResult(0.0, table.bin_of(0.0), [], None, 0.0, True)
    out = await calls.generate([problem.prompt], sampling, k)
    samples = out[0] if out else []
    scores = await calls.score(problem.question, [split_steps(c.text, DEFAULT_STEP_DELIMITER) for c in samples])
    stat = probe_statistic(scores) if scores is not None else 0.0
    return ProbeResult(stat, table.bin_of(stat), samples, scores, budget.spent - before, calls.exhausted)


async def best_of_n_with_probe(problem: Problem, policy: Policy, reward: Reward | None, budget: ComputeBudget,
                               probe: ProbeResult, n: int, selection: str = "weighted",
                               aggregation: str = "last", temperature: float = 0.8,
                               **params: Any) -> StrategyResult:
    """Best-of-N where the probe's k samples (already paid for and scored) count towards N: the one BestOfN, given
    them as prior samples. Draws max(0, n - k) more (shrinking to what the budget allows), scores only the new ones
    and votes over all; with n <= k nothing new is drawn (more evidence at no extra cost)."""
    from ..strategies import build_strategy

    strategy = build_strategy("best_of_n", dict(params, n=n, selection=selection, aggregation=aggregation,
                                                temperature=temperature))
    result = await strategy.run(problem, policy, reward, budget, prior=Prior(probe.samples, probe.scores))
    result.details["reused_probe_samples"] = len(probe.samples)
    return result


# ---- (b) the prompt-statistics estimator -----------------------------------------------------------------------

_NUM = re.compile(r"\d+(?:\.\d+)?")
_CUES = ("each", "left", "more", "times", "total", "per", "every", "than", "remaining", "gave", "bought", "spent")
FEATURES = ("chars", "words", "numbers", "max_digits", "sum_digits", "ops", "parens", "is_expression",
            *(f"cue_{c}" for c in _CUES))


def prompt_features(question: str) -> list[float]:
    q = question.lower()
    nums = _NUM.findall(q)
    words = re.findall(r"[a-z]+", q)
    ops = len(re.findall(r"[+*/×÷]|(?<=\s)-(?=\s)", q))
    return [
        math.log1p(len(q)),
        math.log1p(len(words)),
        float(len(nums)),
        float(max((len(n.replace(".", "")) for n in nums), default=0)),
        float(sum(len(n.replace(".", "")) for n in nums)),
        float(ops),
        float(q.count("(")),
        1.0 if q.startswith("what is") and len(words) <= 3 else 0.0,
        *(float(len(re.findall(rf"\b{c}\b", q))) for c in _CUES),
    ]


@dataclass
class PromptDifficultyModel:
    """Ridge regression (standardised features) of the probe statistic on prompt features."""

    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    coef: list[float] = field(default_factory=list)
    intercept: float = 0.0
    ridge: float = 1.0
    features: tuple[str, ...] = FEATURES

    @classmethod
    def fit(cls, questions: Sequence[str], targets: Sequence[float], ridge: float = 1.0) -> "PromptDifficultyModel":
        import numpy as np

        X = np.array([prompt_features(q) for q in questions], dtype=float)
        y = np.array(targets, dtype=float)
        mean, std = X.mean(0), X.std(0)
        std[std == 0] = 1.0
        Z = (X - mean) / std
        intercept = float(y.mean())
        A = Z.T @ Z + ridge * np.eye(Z.shape[1])
        coef = np.linalg.solve(A, Z.T @ (y - intercept))
        return cls(mean.tolist(), std.tolist(), coef.tolist(), intercept, ridge)

    def predict(self, question: str) -> float:
        x = prompt_features(question)
        return self.intercept + sum(c * (v - m) / s for c, v, m, s in zip(self.coef, x, self.mean, self.std))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "ridge", "features": list(self.features), "mean": self.mean, "std": self.std,
                "coef": self.coef, "intercept": self.intercept, "ridge": self.ridge}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PromptDifficultyModel":
        if list(d.get("features", [])) != list(FEATURES):
            raise ValueError("prompt_model features differ from this code's; recalibrate")
        return cls(list(d["mean"]), list(d["std"]), list(d["coef"]), float(d["intercept"]), float(d["ridge"]))


def prompt_bin(table: PolicyTable, question: str) -> int:
    """The table's bin for a question from its prompt statistics alone (no FLOPs spent)."""
    if not table.prompt_model:
        raise ValueError("this policy table has no prompt_model")
    return table.bin_of(PromptDifficultyModel.from_dict(table.prompt_model).predict(question))


# ---- the whole router, for the serving layer ---------------------------------------------------------------------

async def hidden_bin(table: PolicyTable, question: str, encoder: Any, budget: ComputeBudget,
                     reserve: float = 0.0) -> tuple[int, float, float] | None:
    """(bin, statistic, FLOPs) from the zero-decode head, or None when it cannot run (no head, no encoder, an empty
    question, or its one prefill does not fit the budget): the caller falls back to the prompt estimator."""
    from .hidden_difficulty import load_head

    if not table.hidden_head or encoder is None or not question.strip():
        return None
    cost = encoder.estimate_flops(question)
    if not budget.allows(cost + reserve):
        return None
    head = load_head(table.hidden_head["path"], table.hidden_head.get("version"))
    before = budget.spent
    try:
        stat = head.predict(await encoder.encode(question))
    except Exception:  # a failing reward worker degrades the estimate to the prompt model, not the request
        log.warning("hidden-state difficulty failed; using the prompt estimator", exc_info=True)
        return None
    return table.bin_of(stat), stat, budget.spent - before


async def run_auto(problem: Problem, policy: Policy, reward: Reward | None, table: PolicyTable,
                   budget: ComputeBudget, max_n: int | None = None,
                   progress: Any = None, encoder: Any = None) -> tuple[StrategyResult, dict[str, Any]]:
    """`auto`: estimate difficulty (table.estimator: the probe only when a reward exists and it fits the budget;
    the zero-decode hidden-state head when the reward worker can encode and its prefill fits; else the prompt
    estimator), look up the strategy for the request's budget, run it in what remains (best-of-N reuses the probe
    samples; every strategy shrinks to fit).
    Returns the result and a description for `ttc` (bin, estimator, choice, estimation FLOPs)."""
    from ..strategies import build_strategy

    limit = budget.limit_flops
    info: dict[str, Any] = {"estimator": "prompt", "probe_flops": 0.0}
    probe: ProbeResult | None = None
    k = int(table.probe.get("k", 4))
    sampling = SamplingParams(max_tokens=problem.max_tokens, temperature=float(table.probe.get("temperature", 0.8)))
    if hasattr(policy, "count_prompt_tokens"):  # exact worst cases below, not the byte bound
        await policy.count_prompt_tokens([problem.prompt])
    probe_cost = policy.estimate_flops([problem.prompt], sampling, k)
    # The head's prefill is paid only if one worst-case answer still fits after it: an estimate that leaves the
    # strategy unable to answer at all is worse than the prompt estimator's free guess (measured: at 4 generations
    # it left 23 of 60 word-problem requests with no sample, benchmarks/served_auto.py).
    one_answer = policy.estimate_flops([problem.prompt], sampling, 1)
    hidden = await hidden_bin(table, problem.question, encoder, budget, reserve=one_answer) \
        if table.estimator == "hidden" else None
    if hidden is not None:
        info.update(statistic=hidden[1], probe_flops=hidden[2])
    if uses_probe(table.estimator, reward is not None, budget.allows(probe_cost)):
        probe = await probe_difficulty(problem, policy, reward, table, budget)
        info.update(statistic=probe.statistic, probe_flops=probe.flops)
    estimated = probe is not None or hidden is not None
    no_probe_bin = prompt_bin(table, problem.question) if not estimated and table.prompt_model else None
    # The table's budgets are request budgets: look up the request's whole budget, not what the estimate left.
    # Best-of-N reuses the probe's samples, the head's prefill is ~0.1 generation, and every strategy is anytime
    # and shrinks to what remains; looking up the remainder would drop a whole budget level (16 -> 8 samples).
    estimator, bin_, choice = choose(table, limit,
                                     probe.bin if probe is not None else None, no_probe_bin,
                                     hidden[0] if hidden is not None else None)
    info.update(estimator=estimator, bin=bin_, strategy=choice.strategy, params=choice.params,
                expected_accuracy=choice.expected_accuracy, below_all_budgets=choice.below_all_budgets)
    params = dict(choice.params)
    if max_n is not None and "n" in params:
        params["n"] = min(int(params["n"]), max_n)
    if choice.strategy == "best_of_n" and probe is not None and probe.samples \
            and params.get("selection") != "confidence":
        # New samples come from the probe's distribution, so that all of them vote alike.
        params.setdefault("temperature", float(table.probe.get("temperature", 0.8)))
        params.setdefault("n", k)
        result = await best_of_n_with_probe(problem, policy, reward, budget, probe, **params)
    else:
        strategy = build_strategy(choice.strategy, params, max_n=max_n)
        result = await strategy.run(problem, policy, reward, budget, progress)
    return result, info

