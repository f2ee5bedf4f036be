"""Compute-optimal policies from replayed outcomes, and the evidence-based policy table the router serves.

Inputs are replay's per-problem matrices: acc [P, K] (expected accuracy of config k on problem p) and flops [P, K].

- `compute_optimal_cv`: Snell et al. A1. Problems binned into 5 quantiles of a difficulty statistic (pass@1 for the
  oracle, the mean verifier score of the bank's samples for the predicted one); per (bin, budget) the best config by
  2-fold cross-validation inside the bin. Returns per-problem outcomes (each problem scored with the config chosen on
  the other half of its bin), so the policy's accuracy and FLOPs get bootstrap intervals like any config.
- `evidence_table`: the table that decides on evidence. Per (bin, budget), configs are ranked by the posterior-mean
  accuracy under a Beta prior centred on the config's pooled accuracy over all problems ("level"), or on the pooled
  curve moved to the bin's own level ("scaled"), of strength `prior_strength` pseudo-problems, so a 0-of-9 tie
  inside a bin is settled by the pooled curve, not by noise. `cv_prior` chooses the kind and the strength. A bin
  where no problem has a single correct sample in the whole bank is hopeless: it gets N = 1 ("spend nothing
  more"). A larger config must beat the cheapest one by `min_gain` of posterior mean to be worth its FLOPs.
  Monotone in budget: a budget's choice is never worse (in posterior mean) than the smaller budget's.
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


PRIORS = ("level", "scaled")


def bin_prior(pooled: np.ndarray, acc_bin: np.ndarray, prior: str) -> np.ndarray:
    """The Beta prior's centre per config in one bin. "level": the pooled accuracy itself. "scaled": the pooled curve
    moved to the bin's own level (multiplied by the bin's mean accuracy over all configs / the pooled mean), so the
    prior says how accuracy grows with N without also saying how hard the bin is."""
    if prior == "level":
        return pooled
    if prior != "scaled":
        raise ValueError(f"prior must be one of {PRIORS}")
    scale = float(acc_bin.mean()) / max(float(pooled.mean()), 1e-12)
    return np.clip(pooled * scale, 0.0, 1.0)


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
                   questions: Sequence[str] | None = None, prior: str = "level") -> PolicyTable:
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
        picks = choose_with_shrinkage(acc[members], cost, bin_prior(pooled, acc[members], prior),
                                      [budget_flops(g, gen) for g in budgets_gen],
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
    centre = "the pooled accuracy" if prior == "level" else "the pooled accuracy scaled to the bin's level"
    table.calibration = {"chooser": f"posterior mean, Beta prior centred on {centre} of each config",
                         "prior": prior, "prior_strength": prior_strength, "min_gain": min_gain,
                         "problems": int(acc.shape[0])}
    return table


def config_index(configs: Sequence[Any], backend: str | None = None) -> dict[tuple, int]:
    """params_signature -> position in `configs`, for the configs a table of `backend` can name (all when None)."""
    from .replay import params_signature

    return {params_signature(c.params): k for k, c in enumerate(configs)
            if backend is None or getattr(c, "backend", backend) == backend or c.selection == "majority"}


def served_config(params: dict[str, Any], index: dict[tuple, int], flops: np.ndarray, budget: float,
                  floor: int = 1) -> int | None:
    """The config serving runs for table `params` under one request's budget: best-of-N shrinks to the samples the
    budget pays (here N is halved, not below `floor`, until the config's FLOPs on this problem fit; a stopping rule
    the grid lacks at that N is dropped), and nothing runs when not even that fits. `flops`: per config, this
    problem's realized FLOPs. Serving reserves the worst case before it samples and tops up after, so it draws
    somewhat less than this (benchmarks/served_auto.py measures by how much); the replay never spends over a budget."""
    from .replay import params_signature

    n = int(params["n"])
    while True:
        k = index.get(params_signature(dict(params, n=n)))
        if k is None:
            k = index[params_signature({"n": n, **{x: v for x, v in params.items() if x in ("selection",
                                                                                          "aggregation")}})]
        if flops[k] <= budget * 1.0001:
            return k
        if n <= floor:
            return None
        n = max(n // 2, floor)


def table_outcomes(table: PolicyTable, acc: np.ndarray, flops: np.ndarray, configs: Sequence[Any],
                   stat: np.ndarray, budgets: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Per-problem accuracy and FLOPs [P, B] of routing with `table` (bins from `stat`, known without cost: the
    probe's cost is not added, so this is an upper bound of the served `auto` with this table); each request is
    held to its budget (served_config)."""
    index = config_index(configs, table.reward_backend)
    bins = bins_of(stat, table.cuts)
    out_a, out_f = np.zeros((acc.shape[0], len(budgets))), np.zeros((acc.shape[0], len(budgets)))
    for i, b in enumerate(bins):
        for j, g in enumerate(budgets):
            ch = table.lookup(int(b), g)
            assert ch is not None
            k = served_config(ch.params, index, flops[i], g)
            if k is not None:
                out_a[i, j], out_f[i, j] = acc[i, k], flops[i, k]
    return out_a, out_f


def kfold(n: int, k: int, seed: int) -> list[np.ndarray]:
    """k disjoint folds of range(n), shuffled with `seed`."""
    return np.array_split(np.random.default_rng(seed).permutation(n), k)


STRENGTHS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)


def cv_prior(acc: np.ndarray, flops: np.ndarray, configs: Sequence[Any], stat: np.ndarray, any_correct: np.ndarray,
             budgets_gen: Sequence[int], gen: dict[str, float], reward_backend: str, budgets: Sequence[float],
             strengths: Sequence[float] = STRENGTHS, priors: Sequence[str] = PRIORS, k: int = 5, seed: int = 0,
             min_gain: float = 0.005) -> tuple[str, float, dict[str, dict[str, Any]]]:
    """The prior (kind, strength) for the table, by k-fold cross-validation on the fitted problems only.

    A weak prior lets each bin pick its own winner among ~100 configurations, and the winner of 100 noisy
    ~100-problem contests is partly luck; an infinite one gives every bin the pooled choice, i.e. the best fixed
    configuration. Each candidate's table is scored on the folds it was not fitted on (mean accuracy over problems
    and budgets). Candidates whose accuracy is within one standard error of the best (paired over problems) are
    tied, and the usual one-standard-error rule takes the most regularised of them: the strongest prior. Between
    the kinds at that strength, the one whose table spends least wins. So accuracy is never traded beyond noise for
    FLOPs, but where CV cannot tell the candidates apart (on the 1300-problem bank they span 0.04 points) the
    budget is not spent for nothing."""
    P = acc.shape[0]
    folds = kfold(P, min(k, P), seed) if P >= 2 else []
    out: dict[tuple[str, float], tuple[np.ndarray, np.ndarray]] = {}
    for prior in priors:
        for s in strengths:
            oa, of = np.zeros((P, len(budgets))), np.zeros((P, len(budgets)))
            for test in folds:
                train = np.setdiff1d(np.arange(P), test)
                table = evidence_table(acc[train], flops[train], configs, stat[train], any_correct[train],
                                       budgets_gen, gen, reward_backend, s, min_gain, prior=prior)
                oa[test], of[test] = table_outcomes(table, acc[test], flops[test], configs, stat[test], budgets)
            out[(prior, float(s))] = (oa.mean(1), of.mean(1))
    best = max(out, key=lambda c: (round(float(out[c][0].mean()), 9), c[1]))
    scores: dict[str, dict[str, Any]] = {}
    for c, (a, f) in out.items():
        d = a - out[best][0]
        se = float(d.std(ddof=1) / np.sqrt(P)) if P > 1 else 0.0
        scores[f"{c[0]} {c[1]:g}"] = {"accuracy": float(a.mean()), "flops": float(f.mean()),
                                      "within_one_se": bool(d.mean() >= -se - 1e-12)}
    tied = [c for c in out if scores[f"{c[0]} {c[1]:g}"]["within_one_se"]]
    strongest = max(c[1] for c in tied)
    prior, strength = min((c for c in tied if c[1] == strongest), key=lambda c: (float(out[c][1].mean()), c[0]))
    return prior, strength, scores
