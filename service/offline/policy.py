"""Compute-optimal policies from replayed outcomes, and the evidence-based policy table the router serves.

Inputs are replay's per-problem matrices: acc [P, K] (expected accuracy of config k on problem p) and flops [P, K].

- `compute_optimal_cv`: Snell et al. A1. Problems binned into 5 quantiles of a difficulty statistic (pass@1 for the
  oracle, the mean verifier score of the bank's samples for the predicted one); per (bin, budget) the best config by
  2-fold cross-validation inside the bin. Returns per-problem outcomes (each problem scored with the config chosen on
  the other half of its bin), so the policy's accuracy and FLOPs get bootstrap intervals like any config.
- `evidence_table`: the table that decides on evidence. Per (bin, budget), configs are ranked by the posterior-mean
  accuracy under a Beta prior centred on the config's pooled accuracy over all problems (strength `prior_strength`
  pseudo-problems), so a 0-of-9 tie inside a bin is settled by the pooled curve, not by noise. A bin where no problem
  has a single correct sample in the whole bank is hopeless: it gets N = 1 ("spend nothing more"). A larger config
  must beat the cheapest one by `min_gain` of posterior mean to be worth its FLOPs. Monotone in budget: a budget's
  choice is never worse (in posterior mean) than the smaller budget's.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

import numpy as np

from ..router.table import N_BINS, PolicyTable, quantile_cuts


def bins_of(stat: np.ndarray, cuts: Sequence[float]) -> np.ndarray:
    """Snell's `5 - sum(stat >= c for c in cuts)`: 1 = easiest."""
    return N_BINS - (np.asarray(stat)[:, None] >= np.asarray(cuts)[None, :]).sum(1)


def quantile_bins(stat: np.ndarray) -> tuple[list[float], np.ndarray]:
    cuts = quantile_cuts(list(map(float, stat)))
    return cuts, bins_of(stat, cuts)


def _choose(acc: np.ndarray, cost: np.ndarray, budget: float) -> int:
    """Best mean accuracy among configs whose mean FLOPs fit the budget; ties to the cheaper; none fits: cheapest."""
    fits = np.flatnonzero(cost <= budget * 1.0001)
    if not fits.size:
        return int(np.argmin(cost))
    return int(min(fits, key=lambda k: (-round(float(acc[k]), 12), float(cost[k]), k)))


def compute_optimal_cv(acc: np.ndarray, flops: np.ndarray, bins: np.ndarray, budgets: Sequence[float],
                       seed: int = 0) -> dict[str, Any]:
    """Per-problem accuracy and FLOPs [P, B] of the 2-fold cross-validated per-(bin, budget) choice."""
    P = acc.shape[0]
    out_acc, out_flops = np.zeros((P, len(budgets))), np.zeros((P, len(budgets)))
    choices: dict[str, Any] = {}
    for b in range(1, N_BINS + 1):
        members = [int(i) for i in np.flatnonzero(bins == b)]
        if not members:
            continue
        order = list(members)
        random.Random(seed + b).shuffle(order)
        folds = [order[: len(order) // 2], order[len(order) // 2:]] if len(order) >= 2 else [order, order]
        for j, g in enumerate(budgets):
            for fit, test in ((folds[0], folds[1]), (folds[1], folds[0])):
                k = _choose(acc[fit].mean(0), flops[fit].mean(0), g)
                out_acc[test, j], out_flops[test, j] = acc[test, k], flops[test, k]
            choices[f"{b}:{j}"] = _choose(acc[members].mean(0), flops[members].mean(0), g)
    return {"accuracy": out_acc, "flops": out_flops, "choices": choices}


# ---- the evidence table --------------------------------------------------------------------------------------------

def posterior_mean(successes: np.ndarray, n: int, prior_mean: np.ndarray, strength: float) -> np.ndarray:
    """Beta-binomial posterior mean with prior Beta(strength * m, strength * (1 - m)); successes may be fractional
    (expected correct over replay orderings)."""
    return (successes + strength * prior_mean) / (n + strength)


def choose_with_shrinkage(acc_bin: np.ndarray, cost_bin: np.ndarray, pooled: np.ndarray, budgets: Sequence[float],
                          strength: float, hopeless: bool, cheapest: int, min_gain: float = 0.005
                          ) -> list[tuple[int, float]]:
    """Per budget (ascending): (config index, posterior-mean accuracy) for one bin. acc_bin [n, K] per problem."""
    n = acc_bin.shape[0]
    post = posterior_mean(acc_bin.sum(0), n, pooled, strength)
    out: list[tuple[int, float]] = []
    prev: tuple[int, float] | None = None
    for g in budgets:
        if hopeless:
            pick = (cheapest, float(post[cheapest]))
        else:
            fits = [k for k in range(len(post)) if cost_bin[k] <= g * 1.0001] or [cheapest]
            base = cheapest if cheapest in fits else min(fits, key=lambda k: cost_bin[k])
            best = max(fits, key=lambda k: (round(float(post[k]), 12), -float(cost_bin[k])))
            k = best if post[best] >= post[base] + min_gain else base
            pick = (k, float(post[k]))
        if prev is not None and pick[1] < prev[1]:  # monotone: a larger budget may always run the smaller one's
            pick = prev
        out.append(pick)
        prev = pick
    return out


def evidence_table(acc: np.ndarray, flops: np.ndarray, configs: Sequence[Any], stat: np.ndarray,
                   any_correct: np.ndarray, budgets_gen: Sequence[int], gen: dict[str, float], reward_backend: str,
                   prior_strength: float = 4.0, min_gain: float = 0.005, cuts: Sequence[float] | None = None,
                   questions: Sequence[str] | None = None) -> PolicyTable:
    """A PolicyTable (the router's format) chosen by posterior-mean accuracy per (bin, budget).

    stat: the difficulty statistic the router will see at serving time (the probe's mean verifier score, estimated
    here by its expectation: the mean over the bank's samples); any_correct [P]: the bank holds a correct sample.
    """
    from .fit import budget_flops

    cuts = list(cuts) if cuts is not None else quantile_cuts(list(map(float, stat)))
    bins = bins_of(stat, cuts)
    pooled = acc.mean(0)
    cheapest = int(np.argmin(flops.mean(0)))
    table = PolicyTable(cuts=cuts, entries=[], reward_backend=reward_backend, estimator="probe")
    table.budgets = [{"generations": g, "flops": budget_flops(g, gen)} for g in budgets_gen]
    table.generation_flops = dict(gen)
    if questions is not None:
        from ..router.difficulty import PromptDifficultyModel

        table.prompt_model = PromptDifficultyModel.fit(list(questions), list(map(float, stat))).to_dict()
    for b in range(1, N_BINS + 1):
        members = np.flatnonzero(bins == b)
        if not members.size:
            continue
        cost = flops[members].mean(0)
        hopeless = not bool(any_correct[members].any())
        picks = choose_with_shrinkage(acc[members], cost, pooled, [budget_flops(g, gen) for g in budgets_gen],
                                      prior_strength, hopeless, cheapest, min_gain)
        for g, (k, post) in zip(budgets_gen, picks):
            c = configs[k]
            table.entries.append({"bin": b, "budget_generations": g, "budget_flops": budget_flops(g, gen),
                                  "strategy": "best_of_n", "params": c.params, "expected_accuracy": post,
                                  "in_bin_accuracy": float(acc[members, k].mean()), "mean_flops": float(cost[k]),
                                  "n_problems": int(members.size), "hopeless": hopeless,
                                  "chosen_by": "posterior_mean_beta_prior"})
    have = sorted({e["bin"] for e in table.entries})
    for b in range(1, N_BINS + 1):  # empty bins (ties in the statistic) borrow the nearest bin, as router.fit does
        if have and b not in have:
            src = min(have, key=lambda h: (abs(h - b), h))
            table.entries += [{**e, "bin": b, "filled_from_bin": src, "n_problems": 0}
                              for e in table.entries if e["bin"] == src]
    table.entries.sort(key=lambda e: (e["bin"], e["budget_flops"]))
    table.calibration = {"chooser": "posterior mean, Beta prior centred on the pooled accuracy of each config",
                         "prior_strength": prior_strength, "min_gain": min_gain, "problems": int(acc.shape[0])}
    return table


def table_outcomes(table: PolicyTable, acc: np.ndarray, flops: np.ndarray, configs: Sequence[Any],
                   stat: np.ndarray, budgets: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Per-problem accuracy and FLOPs [P, B] of routing with `table` (bins from `stat`, known without cost: the
    probe's cost is not added, so this is an upper bound of the served `auto` with this table)."""
    from .replay import params_signature

    index = {params_signature(c.params): k
             for k, c in enumerate(configs) if getattr(c, "backend", table.reward_backend) == table.reward_backend
             or c.selection == "majority"}
    bins = bins_of(stat, table.cuts)
    out_a, out_f = np.zeros((acc.shape[0], len(budgets))), np.zeros((acc.shape[0], len(budgets)))
    for i, b in enumerate(bins):
        for j, g in enumerate(budgets):
            ch = table.lookup(int(b), g)
            assert ch is not None
            k = index[params_signature(ch.params)]
            out_a[i, j], out_f[i, j] = acc[i, k], flops[i, k]
    return out_a, out_f


def kfold(n: int, k: int, seed: int) -> list[np.ndarray]:
    """k disjoint folds of range(n), shuffled with `seed`."""
    return np.array_split(np.random.default_rng(seed).permutation(n), k)


STRENGTHS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)


def cv_prior_strength(acc: np.ndarray, flops: np.ndarray, configs: Sequence[Any], stat: np.ndarray,
                      any_correct: np.ndarray, budgets_gen: Sequence[int], gen: dict[str, float],
                      reward_backend: str, budgets: Sequence[float], strengths: Sequence[float] = STRENGTHS,
                      k: int = 5, seed: int = 0, min_gain: float = 0.005) -> tuple[float, dict[float, float]]:
    """The prior strength whose table scores best on folds it was not fitted on (mean accuracy over problems and
    budgets; ties to the stronger prior). A weak prior lets each bin pick its own winner among ~100 configurations,
    and the winner of 100 noisy ~100-problem contests is partly luck; an infinite one gives every bin the pooled
    choice, i.e. the best fixed configuration. Cross-validation says where between the two the evidence stands."""
    P = acc.shape[0]
    folds = kfold(P, min(k, P), seed) if P >= 2 else []
    scores: dict[float, float] = {}
    for s in strengths:
        total = 0.0
        for test in folds:
            train = np.setdiff1d(np.arange(P), test)
            table = evidence_table(acc[train], flops[train], configs, stat[train], any_correct[train], budgets_gen,
                                   gen, reward_backend, s, min_gain)
            total += table_outcomes(table, acc[test], flops[test], configs, stat[test], budgets)[0].sum()
        scores[float(s)] = total / max(1, P * len(budgets))
    best = max(scores, key=lambda s: (round(scores[s], 9), s))
    return best, scores
