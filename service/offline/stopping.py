"""Early stopping for best-of-N evaluated by replaying the sample bank. The rules themselves live with the strategy
(strategies/stopping.py, re-exported here): served best-of-N and this replay decide with the same functions."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..strategies.stopping import (StoppingRule, beta_leader_probability, betainc,  # noqa: F401 (re-exported)
                                   dirichlet_leader_probability, leader_probability, rule_of, stop_reason)


# ---- replay on the bank --------------------------------------------------------------------------------------------

def replay_stopping(bank: Any, rule: StoppingRule, n_max: int = 16, r: int = 128, seed: int = 0,
                    backend: str = "prm*arith", selection: str = "majority") -> dict[str, np.ndarray]:
    """Per problem, over r orderings: accuracy and samples used by best-of-n_max with early stopping, and accuracy
    of the full best-of-n_max on the same orderings. Beta criterion only (vectorised)."""
    from .replay import orderings

    if rule.criterion not in ("beta", "none"):
        raise ValueError("replay_stopping is vectorised for the beta criterion (and hopeless-only) only")
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
    if rule.criterion == "none":
        p_lead = np.zeros_like(p_lead)
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
