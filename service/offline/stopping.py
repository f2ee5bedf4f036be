"""Early stopping for best-of-N evaluated by replaying the sample bank. The rules themselves live with the strategy
(strategies/stopping.py, re-exported here): served best-of-N and this replay decide with the same functions."""

from __future__ import annotations

from typing import Any

import numpy as np

from .replay import BonConfig, orderings, replay_orderings, stop_points  # noqa: F401 (stop_points re-exported)

from ..strategies.stopping import (StoppingRule, beta_leader_probability, betainc,  # noqa: F401 (re-exported)
                                   dirichlet_leader_probability, leader_probability, rule_of, stop_reason)


# ---- replay on the bank --------------------------------------------------------------------------------------------

def replay_stopping(bank: Any, rule: StoppingRule, n_max: int = 16, r: int = 128, seed: int = 0,
                    backend: str = "prm*arith", selection: str = "majority",
                    aggregation: str = "last") -> dict[str, np.ndarray]:
    """Per problem, over r orderings: accuracy, samples used and FLOPs of best-of-n_max with early stopping, and
    accuracy of the full best-of-n_max on the same orderings. The vote is replay's (strategies.voting.select's)."""

    P, S = bank.correct.shape
    stopped = BonConfig(n_max, selection, aggregation, backend, rule)
    ok, fl, _ = replay_orderings(bank, [stopped, BonConfig(n_max, selection, aggregation, backend)], r, seed)
    order = orderings(P, S, r, seed)[..., :n_max]
    take = lambda a: np.take_along_axis(a[:, None, :].repeat(r, 1), order, 2)  # noqa: E731
    used, hopeless = stop_points(take(bank.group), take(bank.scores[(backend, aggregation)]), rule,
                                 bank.group_correct.shape[1])
    return {"accuracy": ok[..., 0].mean(1), "samples": used.mean(1), "flops": fl[..., 0].mean(1),
            "full_accuracy": ok[..., 1].mean(1), "hopeless_share": hopeless.mean(1)}
