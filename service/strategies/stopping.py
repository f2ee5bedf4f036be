"""Early stopping for best-of-N: the pure rules. Served best-of-N (best_of_n.py) and the bank replay
(offline/stopping.py) both decide with `stop_reason` / `beta_leader_probability`, so replay's figures describe what
serving does.

- Settled (Adaptive-Consistency, Aggarwal et al. 2023): with a uniform prior over the answer distribution, the
  posterior probability that the current leader is the true majority answer. `beta`: the leader against the runner-up
  only: given the votes v1, v2, p1 / (p1 + p2) ~ Beta(v1 + a, v2 + a), so P(p1 > p2) = 1 - I_0.5(v1 + a, v2 + a)
  (exact, closed form). `dirichlet`: the leader against every other answer, by Monte Carlo on the Dirichlet
  posterior (seeded, so a rule gives the same answer twice). Stop when it exceeds `threshold`.
- Hopeless: after `k` samples no answer repeats and every verifier score is below `score_threshold`: more samples of
  a model that never agrees with itself and is never trusted by its verifier are FLOPs for nothing.
  Criterion `none`: the hopeless stop alone.
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
    criterion: str = "beta"        # beta | dirichlet | none (hopeless stop only)
    min_samples: int = 2
    hopeless_k: int | None = 4     # None: no hopeless stop
    score_threshold: float = 0.2

    @property
    def name(self) -> str:
        h = f"hopeless k={self.hopeless_k} s<{self.score_threshold}" if self.hopeless_k else ""
        if self.criterion == "none":
            return h
        return f"{self.criterion} p>{self.threshold}" + (f",{h}" if h else "")

    def ttc_params(self) -> dict[str, Any]:
        """The best-of-N `ttc` parameters that serve this rule (a table entry's params; see `rule_of`)."""
        out: dict[str, Any] = {"stopping": self.criterion}
        if self.criterion != "none":
            out.update(stop_threshold=self.threshold, stop_prior=self.prior, stop_min_samples=self.min_samples)
        if self.hopeless_k:
            out.update(hopeless_k=self.hopeless_k, hopeless_score=self.score_threshold)
        return out


def rule_of(params: Any) -> StoppingRule | None:
    """The rule that best-of-N parameters ask for (BestOfNParams or anything with its fields); None: no stopping."""
    criterion = getattr(params, "stopping", "none")
    hopeless = getattr(params, "hopeless_k", None)
    if criterion == "none" and not hopeless:
        return None
    return StoppingRule(threshold=params.stop_threshold, prior=params.stop_prior, criterion=criterion,
                        min_samples=params.stop_min_samples, hopeless_k=hopeless or None,
                        score_threshold=params.hopeless_score)


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


def leader_probability(answers: Sequence[Hashable | None], rule: StoppingRule) -> float:
    """The rule's posterior probability that the current leader is the majority answer (0 without any answer)."""
    counts = _counts(answers)
    if not counts or rule.criterion == "none":
        return 0.0
    if rule.criterion == "beta":
        return float(beta_leader_probability(counts[0], counts[1] if len(counts) > 1 else 0, rule.prior))
    return dirichlet_leader_probability(counts, rule.prior)


def stop_reason(answers: Sequence[Hashable | None], scores: Sequence[float], rule: StoppingRule) -> str | None:
    """After these samples (canonical answers, None = no answer; verifier scores), stop? 'settled' / 'hopeless' /
    None. Pure: the serving loop and the bank replay apply the same rule."""
    n = len(answers)
    counts = _counts(answers)
    if rule.hopeless_k and n == rule.hopeless_k and (not counts or counts[0] <= 1) \
            and max(scores, default=0.0) < rule.score_threshold:
        return "hopeless"
    if n < rule.min_samples or not counts or rule.criterion == "none":
        return None
    return "settled" if leader_probability(answers, rule) > rule.threshold else None
