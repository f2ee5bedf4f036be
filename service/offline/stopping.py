"""Early stopping for best-of-N evaluated by replaying the sample bank. The rules themselves live with the strategy
(strategies/stopping.py, re-exported here): served best-of-N and this replay decide with the same functions."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..strategies.stopping import (StoppingRule, beta_leader_probability, betainc,  # noqa: F401 (re-exported)
                                   dirichlet_leader_probability, leader_probability, rule_of, stop_reason)


# ---- replay on the bank --------------------------------------------------------------------------------------------

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


def replay_stopping(bank: Any, rule: StoppingRule, n_max: int = 16, r: int = 128, seed: int = 0,
                    backend: str = "prm*arith", selection: str = "majority",
                    aggregation: str = "last") -> dict[str, np.ndarray]:
    """Per problem, over r orderings: accuracy, samples used and FLOPs of best-of-n_max with early stopping, and
    accuracy of the full best-of-n_max on the same orderings. The vote is replay's (strategies.voting.select's)."""
    from .replay import BonConfig, orderings, replay_orderings

    P, S = bank.correct.shape
    stopped = BonConfig(n_max, selection, aggregation, backend, rule)
    ok, fl, _ = replay_orderings(bank, [stopped, BonConfig(n_max, selection, aggregation, backend)], r, seed)
    order = orderings(P, S, r, seed)[..., :n_max]
    take = lambda a: np.take_along_axis(a[:, None, :].repeat(r, 1), order, 2)  # noqa: E731
    used, hopeless = stop_points(take(bank.group), take(bank.scores[(backend, aggregation)]), rule,
                                 bank.group_correct.shape[1])
    return {"accuracy": ok[..., 0].mean(1), "samples": used.mean(1), "flops": fl[..., 0].mean(1),
            "full_accuracy": ok[..., 1].mean(1), "hopeless_share": hopeless.mean(1)}
