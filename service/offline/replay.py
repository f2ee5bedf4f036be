"""Replay evaluation: best-of-N configurations evaluated by subsampling the sample bank, with bootstrap intervals.

For each problem, R random orderings of its N_bank samples (R >= 100); best-of-N takes the first N of each ordering,
so every (problem, config) gets its expected accuracy and mean FLOPs over R draws instead of one draw. Intervals are
percentile bootstraps over problems (seeded): the problem is the unit that varies between benchmarks.

Votes follow strategies.voting.select exactly: answers grouped by equivalence (math_verify, once per problem, over
the whole bank), unanswered samples cast no vote; weighted sums max(0, score) per answer, ties to the answer whose
best member scores higher, then to the one seen first; majority counts votes, ties to the one seen first (serving
does not score majority votes, so majority carries no reward FLOPs); best takes the earliest top-scored sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..strategies.stopping import StoppingRule, beta_leader_probability
from .bank import BACKENDS, step_scores

AGGREGATIONS = ("last", "min", "prod", "mean")
NS = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class BonConfig:
    n: int
    selection: str  # majority | weighted | best
    aggregation: str = "last"
    backend: str = "prm*arith"
    # Early stopping inside best-of-N (served with the same rule: params carry its ttc parameters).
    stop: StoppingRule | None = None

    @property
    def key(self) -> str:
        rule = "".join(f",{k}={v}" for k, v in sorted(self.stop.ttc_params().items())) if self.stop else ""
        if self.selection == "majority":
            return f"best_of_n:n={self.n},selection=majority" + rule
        return f"best_of_n[{self.backend}]:aggregation={self.aggregation},n={self.n},selection={self.selection}" + rule

    @property
    def params(self) -> dict[str, Any]:
        """The served strategy's `ttc` parameters (a table entry's params)."""
        p: dict[str, Any] = {"n": self.n, "selection": self.selection}
        if self.selection != "majority":
            p["aggregation"] = self.aggregation
        if self.stop is not None:
            p.update(self.stop.ttc_params())
        return p

    @property
    def signature(self) -> tuple:
        """What identifies the config among a table's params (routing replays look entries up by it)."""
        return params_signature(self.params)


def params_signature(params: dict[str, Any]) -> tuple:
    """Best-of-N table params, normalised: aggregation means nothing to a majority vote."""
    p = dict(params)
    p.setdefault("selection", "weighted")
    if p["selection"] == "majority":
        p.pop("aggregation", None)
    else:
        p.setdefault("aggregation", "last")
    return tuple(sorted(p.items()))


def all_configs(ns: Sequence[int] = NS, backends: Sequence[str] = BACKENDS,
                aggregations: Sequence[str] = AGGREGATIONS, rules: Sequence[StoppingRule] = ()) -> list[BonConfig]:
    """The grid; with `rules`, each rule also inside best-of-N majority (rules without a hopeless stop: serving's
    majority has no verifier scores) and weighted (last-step scores), for every N above 2."""
    out = [BonConfig(n, "majority") for n in ns]
    out += [BonConfig(n, sel, agg, b) for b in backends for agg in aggregations for sel in ("weighted", "best")
            for n in ns]
    for rule in rules:
        if not rule.hopeless_k:
            out += [BonConfig(n, "majority", stop=rule) for n in ns if n > 2]
        out += [BonConfig(n, "weighted", "last", b, rule) for b in backends for n in ns
                if n > 2 and (rule.hopeless_k or 0) <= n]
    return out


@dataclass
class BankArrays:
    """The bank as arrays: problems x samples (every problem keeps its first S = min N_bank samples)."""

    ids: list[str]
    correct: np.ndarray          # [P, S] bool
    group: np.ndarray            # [P, S] int: answer group (first-occurrence order in bank order), -1 = no answer
    group_correct: np.ndarray    # [P, S] bool, by group index
    policy_flops: np.ndarray     # [P, S]
    reward_flops: np.ndarray     # [P, S]
    question_charge: np.ndarray  # [P]
    scores: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)  # (backend, aggregation) -> [P, S]
    sources: list[str] = field(default_factory=list)
    levels: list[Any] = field(default_factory=list)
    questions: list[str] = field(default_factory=list)

    @property
    def pass_at_1(self) -> np.ndarray:
        return self.correct.mean(1)

    def per_generation(self, backend: str) -> dict[str, float]:
        """The budget unit (calibrate's): mean FLOPs of one sample, policy plus its reward share, + question charge."""
        pol = float(self.policy_flops.mean())
        rew = 0.0 if backend == "arith" else float(self.reward_flops.mean())
        return {"per_generation": pol + rew, "policy": pol, "reward": rew, "samples": int(self.correct.size),
                "question_charge": float(self.question_charge.mean())}


def _aggregate(steps: Sequence[float], how: str) -> float:
    from ..strategies.voting import aggregate_scores

    return aggregate_scores(steps, how)  # type: ignore[arg-type]


def bank_arrays(problems: Sequence[dict[str, Any]], min_samples: int | None = None) -> BankArrays:
    from ..strategies.voting import Candidate, group_by_answer

    s = min_samples or min(len(p["samples"]) for p in problems)
    kept = [p for p in problems if len(p["samples"]) >= s]
    P = len(kept)
    correct = np.zeros((P, s), bool)
    group = np.full((P, s), -1, int)
    gcorrect = np.zeros((P, s), bool)
    pol, rew = np.zeros((P, s)), np.zeros((P, s))
    scores = {(b, a): np.zeros((P, s)) for b in BACKENDS for a in AGGREGATIONS}
    for i, p in enumerate(kept):
        smp = p["samples"][:s]
        for g, members in enumerate(group_by_answer([Candidate("", x["answer"]) for x in smp])):
            group[i, members] = g
            gcorrect[i, g] = bool(smp[members[0]]["correct"])
        for j, x in enumerate(smp):
            correct[i, j] = bool(x["correct"])
            pol[i, j], rew[i, j] = x["policy_flops"], x["reward_flops"]
            for b in BACKENDS:
                st = step_scores(x, b)
                for a in AGGREGATIONS:
                    scores[(b, a)][i, j] = _aggregate(st, a)
    return BankArrays([p["id"] for p in kept], correct, group, gcorrect, pol, rew,
                      np.array([float(p["question_charge"]) for p in kept]), scores,
                      [str(p.get("source")) for p in kept], [p.get("level") for p in kept],
                      [p["question"] for p in kept])


def orderings(n_problems: int, n_samples: int, r: int, seed: int) -> np.ndarray:
    """[P, R, S]: R random permutations of the samples per problem."""
    rng = np.random.default_rng(seed)
    return np.argsort(rng.random((n_problems, r, n_samples)), axis=2)


def _vote(group: np.ndarray, gcorrect: np.ndarray, w: np.ndarray, tie_by_score: bool) -> np.ndarray:
    """Correctness of the vote per (problem, ordering). group, w: [P, R, N]; gcorrect: [P, G]."""
    G = gcorrect.shape[1]
    onehot = group[..., None] == np.arange(G)                       # [P, R, N, G]
    sums = np.einsum("prng,prn->prg", onehot, w)
    present = onehot.any(2)
    sums = np.where(present, sums, -np.inf)
    top = present & (sums >= sums.max(2, keepdims=True) - 1e-9)
    if tie_by_score:
        best = np.where(onehot, w[..., None], -np.inf).max(2)
        best = np.where(top, best, -np.inf)
        top &= best >= best.max(2, keepdims=True) - 1e-12
    first = np.where(onehot.any(2), onehot.argmax(2), 1 << 30)     # position of each group's first vote
    winner = np.where(top, first, 1 << 30).argmin(2)                # [P, R]
    ok = np.take_along_axis(gcorrect[:, None, :].repeat(winner.shape[1], 1), winner[..., None], 2)[..., 0]
    return ok & present.any(2)                                      # no answer at all: wrong


def replay_orderings(bank: BankArrays, configs: Sequence[BonConfig], r: int = 128, seed: int = 0,
                     chunk: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(correct [P, R, K], FLOPs [P, R, K], orderings [P, R, S]): every config on every ordering of every problem."""
    P, S = bank.correct.shape
    if max(c.n for c in configs) > S:
        raise ValueError(f"a config draws more samples than the bank holds ({S})")
    order = orderings(P, S, r, seed)
    ok_all, fl_all = np.zeros((P, r, len(configs)), bool), np.zeros((P, r, len(configs)))
    for lo in range(0, P, chunk):
        sl = slice(lo, min(P, lo + chunk))
        o = order[sl]
        take = lambda a: np.take_along_axis(a[sl][:, None, :].repeat(r, 1), o, 2)  # noqa: E731  [p, R, S]
        grp, cor = take(bank.group), take(bank.correct)
        pol, rew = take(bank.policy_flops), take(bank.reward_flops)
        for k, c in enumerate(configs):
            n = c.n
            g, used = grp[..., :n], np.ones(n, bool)
            w = take(bank.scores[(c.backend, c.aggregation)])[..., :n] if c.selection != "majority" or c.stop else None
            if c.stop is not None:
                # Samples after the stop are never drawn: out of the vote and the FLOPs.

                stops, _ = stop_points(g, w, c.stop, bank.group_correct.shape[1])
                used = np.arange(1, n + 1) <= stops[..., None]             # [p, R, n]
                g = np.where(used, g, -1)
            cost = (pol[..., :n] * used).sum(2) + bank.question_charge[sl, None]
            if c.selection == "majority":
                ok = _vote(g, bank.group_correct[sl], np.ones(g.shape), False)
            else:
                if c.backend != "arith":
                    cost = cost + (rew[..., :n] * used).sum(2)
                if c.selection == "best":
                    ok = np.take_along_axis(cor[..., :n], np.where(used, w, -np.inf).argmax(2)[..., None], 2)[..., 0]
                else:
                    ok = _vote(g, bank.group_correct[sl], np.maximum(w, 0.0) * used, True)
            ok_all[sl, :, k], fl_all[sl, :, k] = ok, cost
    return ok_all, fl_all, order


def replay(bank: BankArrays, configs: Sequence[BonConfig], r: int = 128, seed: int = 0,
           chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(accuracy [P, K], mean FLOPs [P, K]): per problem, averaged over r random orderings of its samples."""
    ok, fl, _ = replay_orderings(bank, configs, r, seed, chunk)
    return ok.mean(1), fl.mean(1)


# ---- bootstrap over problems ---------------------------------------------------------------------------------------

def bootstrap_weights(n_problems: int, b: int = 1000, seed: int = 0) -> np.ndarray:
    """[B, P]: how often each problem is drawn in each resample, divided by P (so W @ x is a resampled mean)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n_problems, (b, n_problems))
    w = np.zeros((b, n_problems))
    np.add.at(w, (np.arange(b)[:, None], idx), 1.0)
    return w / n_problems


def interval(boot: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = np.percentile(boot, [50 * (1 - level), 50 * (1 + level)], axis=0)
    return lo, hi


def with_intervals(values: np.ndarray, weights: np.ndarray) -> dict[str, Any]:
    """Mean over problems of each column of `values` [P, K] and its percentile bootstrap 95% interval."""
    boot = weights @ values
    lo, hi = interval(boot)
    return {"mean": values.mean(0), "lo": lo, "hi": hi}


# ---- the efficiency ratio --------------------------------------------------------------------------------------

def flops_to_reach(acc: Sequence[float], flops: Sequence[float], target: float) -> float | None:
    """Smallest FLOPs at which the accuracy-vs-FLOPs curve reaches `target` (linear in log-FLOPs between points)."""
    from .bench import flops_to_reach as on_points

    return on_points([{"accuracy": float(a), "mean_flops": float(f)} for a, f in zip(acc, flops)], target)


def efficiency_ratio(base_acc: Sequence[float], base_flops: Sequence[float], acc: Sequence[float],
                     flops: Sequence[float]) -> tuple[float | None, float, float]:
    """(FLOPs the baseline needs for its best accuracy / FLOPs the policy needs for it (None: never reached),
    target accuracy, baseline FLOPs)."""
    best = max(base_acc)
    f_base = min(f for a, f in zip(base_acc, base_flops) if a >= best - 1e-12)
    f_pol = flops_to_reach(acc, flops, best)
    return (f_base / f_pol if f_pol else None), float(best), float(f_base)


def ratio_with_interval(base_acc: np.ndarray, base_flops: np.ndarray, acc: np.ndarray, flops: np.ndarray,
                        weights: np.ndarray) -> dict[str, Any]:
    """The efficiency ratio on all problems and its bootstrap interval. Inputs are per-problem [P, points] matrices
    (baseline configs; policy budgets). A resample where the policy never reaches the baseline's best accuracy counts
    as ratio 0 (it is below any finite ratio); their share is reported."""
    point, target, f_base = efficiency_ratio(base_acc.mean(0), base_flops.mean(0), acc.mean(0), flops.mean(0))
    ba, bf, pa, pf = (weights @ m for m in (base_acc, base_flops, acc, flops))
    boots = [efficiency_ratio(ba[i], bf[i], pa[i], pf[i])[0] for i in range(weights.shape[0])]
    vals = np.array([x if x is not None else 0.0 for x in boots])
    lo, hi = interval(vals)
    return {"ratio": point, "lo": float(lo), "hi": float(hi), "target_accuracy": target, "baseline_flops": f_base,
            "not_reached_share": float(np.mean([x is None for x in boots]))}


def finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def stop_points(grp: np.ndarray, score: np.ndarray, rule: StoppingRule, n_groups: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """(samples used [p, R], stopped as hopeless [p, R]) for samples in draw order: grp, score [p, R, N] (answer
    group, -1 = none; the score the served rule sees). `stop_reason` after every sample, vectorised (beta / none)."""
    if rule.criterion not in ("beta", "none"):
        raise ValueError("the replay is vectorised for the beta criterion (and hopeless-only) only")
    n_max = grp.shape[-1]
    votes = np.cumsum(grp[..., None] == np.arange(n_groups), 2)                # [p, R, N, G] counts after n
    top2 = -np.sort(-votes, 3)[..., :2]
    if top2.shape[-1] < 2:
        top2 = np.concatenate([top2, np.zeros_like(top2)], -1)
    p_lead = beta_leader_probability(top2[..., 0], top2[..., 1], rule.prior)   # [p, R, N]
    if rule.criterion == "none":
        p_lead = np.zeros_like(p_lead)
    n_idx = np.arange(1, n_max + 1)
    stop = (p_lead > rule.threshold) & (n_idx >= rule.min_samples) & (top2[..., 0] > 0)
    hopeless = np.zeros(stop.shape[:2], bool)
    if rule.hopeless_k and rule.hopeless_k <= n_max:
        k = rule.hopeless_k
        hopeless = (top2[..., k - 1, 0] <= 1) & (score[..., :k].max(2) < rule.score_threshold)
        hopeless &= ~stop[..., :k - 1].any(2)  # settled before k: never reaches k
        stop[..., k - 1] |= hopeless
    stop[..., -1] = True
    return stop.argmax(2) + 1, hopeless
