"""What the served `auto` (router.difficulty.run_auto) does with a best-of-N policy table, replayed on the bank with
the cost of estimating difficulty included.

Per problem and ordering of its samples: when the table's probe (k samples) fits the budget, the first k samples are
the probe; their mean verifier score (last step) gives the bin; the table is looked up with the request's budget;
best-of-N then reuses the probe samples (N' = max(N, k): what BestOfN with prior samples does), so its FLOPs are
those of N' samples plus the probe's verifier calls. With early stopping the rule runs over the same ordering from
its first sample, probe samples included (served: they are BestOfN's prior samples); one difference: when it fires
inside the probe, serving votes over all k probe samples (already paid for), the replay over the prefix. When the probe does not fit, the prompt estimator (no FLOPs) gives the
bin and the whole budget is looked up. The only thing not replayed is vLLM's own cost variance.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .policy import bins_of
from .replay import BankArrays, params_signature


def auto_outcomes(table: Any, bank: BankArrays, configs: Sequence[Any], ok: np.ndarray, cost: np.ndarray,
                  order: np.ndarray, budgets: Sequence[float], rows: Sequence[int] | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(accuracy [P, B], mean FLOPs [P, B], share of orderings that used the probe [P, B]) over the problems `rows`
    (default all). ok, cost: replay_orderings' [P, R, K] for `configs`; order: its orderings."""
    from ..router.difficulty import prompt_bin

    rows = list(range(bank.correct.shape[0])) if rows is None else list(rows)
    k = int(table.probe.get("k", 4))
    backend = table.reward_backend
    index = {params_signature(c.params): j for j, c in enumerate(configs)
             if c.selection == "majority" or c.backend == backend}
    max_n = max(c.n for c in configs)
    first_k = order[rows][..., :k]                                              # [p, R, k]
    take = lambda a: np.take_along_axis(a[rows][:, None, :].repeat(order.shape[1], 1), first_k, 2)  # noqa: E731
    stat = take(bank.scores[(backend, "last")]).mean(2)                         # [p, R]
    probe_reward = take(bank.reward_flops).sum(2) if backend != "arith" else np.zeros(stat.shape)
    probe_cost = take(bank.policy_flops).sum(2) + probe_reward
    probe_bins = bins_of(stat.ravel(), table.cuts).reshape(stat.shape)
    prompt_bins = [prompt_bin(table, bank.questions[i]) if table.prompt_model else 3 for i in rows]
    charge = bank.question_charge[rows][:, None]
    out_a, out_f, used = (np.zeros((len(rows), len(budgets))) for _ in range(3))
    for j, g in enumerate(budgets):
        probe = (probe_cost + charge) <= g
        acc = np.zeros(stat.shape)
        fl = np.zeros(stat.shape)
        for pi in range(len(rows)):
            for o in range(stat.shape[1]):
                if probe[pi, o]:
                    ch = table.lookup(int(probe_bins[pi, o]), g)  # the request's budget (run_auto)
                    n = min(max(int(ch.params["n"]), k), max_n)
                else:
                    ch = table.lookup(prompt_bins[pi], g)
                    n = int(ch.params["n"])
                sel = ch.params.get("selection", "weighted")
                kk = index[params_signature(dict(ch.params, n=n))]
                acc[pi, o] = ok[rows[pi], o, kk]
                # A majority vote scores nothing itself, but the probe's samples were scored to estimate the bin.
                extra = probe_reward[pi, o] if probe[pi, o] and sel == "majority" else 0.0
                fl[pi, o] = cost[rows[pi], o, kk] + extra
        out_a[:, j], out_f[:, j], used[:, j] = acc.mean(1), fl.mean(1), probe.mean(1)
    return out_a, out_f, used
