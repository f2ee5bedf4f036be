"""Early stopping for best-of-N: pure rules, and their evaluation by replaying the sample bank.

- Settled (Adaptive-Consistency, Aggarwal et al. 2023): with a uniform prior over the answer distribution, the
  posterior probability that the current leader is the true majority answer. `beta`: the leader against the runner-up
  only: given the votes v1, v2, p1 / (p1 + p2) ~ Beta(v1 + a, v2 + a), so P(p1 > p2) = 1 - I_0.5(v1 + a, v2 + a)
  (exact, closed form). `dirichlet`: the leader against every other answer, by Monte Carlo on the Dirichlet
  posterior (seeded, so a rule gives the same answer twice). Stop when it exceeds `threshold`.
- Hopeless: after `k` samples no answer repeats and every verifier score is below `score_threshold`: more samples of
  a model that never agrees with itself and is never trusted by its verifier are FLOPs for nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable, Sequence

import math

import numpy as np


def _betacf(a: np.ndarray, b: np.ndarray, x: float, iterations: int = 100) -> np.ndarray:
    # Continued fraction of the incomplete beta function (modified Lentz), vectorised over a and b.
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = np.ones_like(a)
    d = 1.0 - qab * x / qap
    d = 1.0 / np.where(np.abs(d) < tiny, tiny, d)
    h = d.copy()
    for m in range(1, iterations + 1):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / np.where(np.abs(d) < tiny, tiny, d)
            c = 1.0 + aa / c
            c = np.where(np.abs(c) < tiny, tiny, c)
            h = h * d * c
    return h


def betainc(a: Any, b: Any, x: float) -> np.ndarray:
    """Regularised incomplete beta I_x(a, b) (scipy.special.betainc without scipy), vectorised over a, b."""
    a, b = np.broadcast_arrays(np.asarray(a, float), np.asarray(b, float))
    lg = np.vectorize(math.lgamma)
    front = np.exp(lg(a + b) - lg(a) - lg(b) + a * math.log(x) + b * math.log1p(-x))
    direct = x < (a + 1.0) / (a + b + 2.0)  # the continued fraction converges fast on this side
    out = np.where(direct, front * _betacf(a, b, x) / a, 1.0 - front * _betacf(b, a, 1.0 - x) / b)
    return out


@dataclass(frozen=True)
class StoppingRule:
    threshold: float = 0.95        # posterior probability that the leader is the majority
    prior: float = 1.0             # Dirichlet / Beta pseudo-count per answer
    criterion: str = "beta"        # beta | dirichlet
    min_samples: int = 2
    hopeless_k: int | None = 4     # None: no hopeless stop
    score_threshold: float = 0.2

    @property
    def name(self) -> str:
        h = f",hopeless k={self.hopeless_k} s<{self.score_threshold}" if self.hopeless_k else ""
        return f"{self.criterion} p>{self.threshold}{h}"


def beta_leader_probability(v1: Any, v2: Any, prior: float = 1.0) -> Any:
    """P(p_leader > p_runner_up | votes) under Beta(v1 + prior, v2 + prior); vectorised."""
    return 1.0 - betainc(np.asarray(v1, float) + prior, np.asarray(v2, float) + prior, 0.5)


def dirichlet_leader_probability(counts: Sequence[float], prior: float = 1.0, draws: int = 4000,
                                 seed: int = 0) -> float:
    """P(the leader's share exceeds every other answer's | counts) under Dirichlet(counts + prior). One unseen answer
    class stands for everything not seen yet (so a single answer seen once is not 'certain')."""
    c = np.sort(np.asarray(counts, float))[::-1]
    alpha = np.concatenate([c, [0.0]]) + prior
    p = np.random.default_rng(seed).dirichlet(alpha, draws)
    return float((p[:, 0] > p[:, 1:].max(1)).mean())


def _counts(answers: Sequence[Hashable | None]) -> list[int]:
    tally: dict[Hashable, int] = {}
    for a in answers:
        if a is not None:
            tally[a] = tally.get(a, 0) + 1
    return sorted(tally.values(), reverse=True)


def stop_reason(answers: Sequence[Hashable | None], scores: Sequence[float], rule: StoppingRule) -> str | None:
    """After these samples (canonical answers, None = no answer; verifier scores), stop? 'settled' / 'hopeless' /
    None. Pure: the serving loop and the replay below apply the same rule."""
    n = len(answers)
    counts = _counts(answers)
    if rule.hopeless_k and n == rule.hopeless_k and (not counts or counts[0] <= 1) \
            and max(scores, default=0.0) < rule.score_threshold:
        return "hopeless"
    if n < rule.min_samples or not counts:
        return None
    if rule.criterion == "beta":
        p = float(beta_leader_probability(counts[0], counts[1] if len(counts) > 1 else 0, rule.prior))
    else:
        p = dirichlet_leader_probability(counts, rule.prior)
    return "settled" if p > rule.threshold else None


# ---- replay on the bank --------------------------------------------------------------------------------------------

def replay_stopping(bank: Any, rule: StoppingRule, n_max: int = 16, r: int = 128, seed: int = 0,
                    backend: str = "prm*arith", selection: str = "majority") -> dict[str, np.ndarray]:
    """Per problem, over r orderings: accuracy and samples used by best-of-n_max with early stopping, and accuracy
    of the full best-of-n_max on the same orderings. Beta criterion only (vectorised)."""
    from .replay import orderings

    if rule.criterion != "beta":
        raise ValueError("replay_stopping is vectorised for the beta criterion only")
    P, S = bank.correct.shape
    order = orderings(P, S, r, seed)[..., :n_max]                              # [P, R, N]
    take = lambda a: np.take_along_axis(a[:, None, :].repeat(r, 1), order, 2)  # noqa: E731
    grp, score = take(bank.group), take(bank.scores[(backend, "last")])
    pol, rew = take(bank.policy_flops), take(bank.reward_flops)
    G = bank.group_correct.shape[1]
    onehot = grp[..., None] == np.arange(G)                                   # [P, R, N, G]
    votes = np.cumsum(onehot, 2)                                               # counts after n samples
    top2 = -np.sort(-votes, 3)[..., :2]
    p_lead = beta_leader_probability(top2[..., 0], top2[..., 1], rule.prior)   # [P, R, N]
    n_idx = np.arange(1, n_max + 1)
    stop = (p_lead > rule.threshold) & (n_idx >= rule.min_samples) & (top2[..., 0] > 0)
    if rule.hopeless_k and rule.hopeless_k <= n_max:
        k = rule.hopeless_k
        hopeless = (top2[..., k - 1, 0] <= 1) & (score[..., :k].max(2) < rule.score_threshold)
        stop[..., k - 1] |= hopeless
    stop[..., -1] = True
    used = stop.argmax(2) + 1                                                  # [P, R]
    weight = onehot * (np.maximum(score, 0.0)[..., None] if selection == "weighted" else 1.0)
    tally = np.cumsum(weight, 2)
    first = np.where(onehot.any(2), onehot.argmax(2), 1 << 30)                 # [P, R, G]

    def correct_at(n: np.ndarray) -> np.ndarray:
        t = np.take_along_axis(tally, (n - 1)[..., None, None], 2)[:, :, 0]    # [P, R, G]
        c = np.take_along_axis(votes, (n - 1)[..., None, None], 2)[:, :, 0]
        present = c > 0
        t = np.where(present, t, -np.inf)
        top = present & (t >= t.max(2, keepdims=True) - 1e-9)
        winner = np.where(top, first, 1 << 30).argmin(2)
        ok = np.take_along_axis(bank.group_correct[:, None, :].repeat(r, 1), winner[..., None], 2)[..., 0]
        return ok & present.any(2)

    mask = n_idx[None, None, :] <= used[..., None]
    flops = (pol * mask).sum(2) + bank.question_charge[:, None]
    if selection == "weighted" and backend != "arith":
        flops = flops + (rew * mask).sum(2)
    full = np.full(used.shape, n_max)
    return {"accuracy": correct_at(used).mean(1), "samples": used.mean(1), "flops": flops.mean(1),
            "full_accuracy": correct_at(full).mean(1),
            "hopeless_share": ((used == rule.hopeless_k) & ~(p_lead[..., (rule.hopeless_k or 1) - 1] >
                                                             rule.threshold)).mean(1) if rule.hopeless_k else
            np.zeros(P)}
