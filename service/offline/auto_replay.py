"""What the served `auto` (router.difficulty.run_auto) does with a best-of-N policy table, replayed on the bank with
the cost of estimating difficulty included.

Per problem and ordering of its samples: when the table's probe (k samples) fits the budget, the first k samples are
the probe; their mean verifier score (last step) gives the bin; the table is looked up with the request's budget;
best-of-N then reuses the probe samples (N' = max(N, k): what BestOfN with prior samples does), so its FLOPs are
those of N' samples plus the probe's verifier calls. With early stopping the rule runs over the same ordering from
its first sample, probe samples included (served: they are BestOfN's prior samples); one difference: when it fires
inside the probe, serving votes over all k probe samples (already paid for), the replay over the prefix. When the
probe does not fit, the prompt estimator (no FLOPs) gives the bin and the whole budget is looked up.

`hidden_auto_outcomes` replays the zero-decode head instead of the probe. Both hold every request to its budget
(policy.served_config: N shrinks to what the budget pays, with the sample's realized FLOPs), as serving does.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .policy import bins_of, config_index, served_config
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
    index = config_index(configs, backend)
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
                # A majority vote scores nothing itself, but the probe's samples were scored to estimate the bin.
                extra = probe_reward[pi, o] if probe[pi, o] and sel == "majority" else 0.0
                # The probe's samples are drawn: N shrinks to what the budget pays, never below them.
                kk = served_config(dict(ch.params, n=n), index, cost[rows[pi], o], g - extra,
                                   floor=k if probe[pi, o] else 1)
                if kk is None:  # not even one sample fits: no answer, nothing spent
                    continue
                acc[pi, o] = ok[rows[pi], o, kk]
                fl[pi, o] = cost[rows[pi], o, kk] + extra
        out_a[:, j], out_f[:, j], used[:, j] = acc.mean(1), fl.mean(1), probe.mean(1)
    return out_a, out_f, used


def hidden_auto_outcomes(table: Any, acc: np.ndarray, flops: np.ndarray, configs: Sequence[Any], stat: np.ndarray,
                         encode: np.ndarray, budgets: Sequence[float], questions: Sequence[str]
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Per problem and budget, what run_auto does with estimator "hidden" (the same routing rule, table.choose): the
    head's prefill is paid when one answer still fits after it (the head's bin), else the prompt estimator's bin
    (no FLOPs); the table's entry for the whole budget (its levels include the head's mean prefill), run in what
    the prefill left."""
    from ..router.difficulty import prompt_bin
    from ..router.table import choose

    index = config_index(configs, table.reward_backend)
    one = index[params_signature({"n": 1, "selection": "majority"})]
    bins = bins_of(stat, table.cuts)
    out_a, out_f = np.zeros((acc.shape[0], len(budgets))), np.zeros((acc.shape[0], len(budgets)))
    for i in range(acc.shape[0]):
        for j, g in enumerate(budgets):
            paid = encode[i] + flops[i, one] <= g
            no_head_bin = prompt_bin(table, questions[i]) if not paid and table.prompt_model else None
            _, _, ch = choose(table, g, None, no_head_bin, int(bins[i]) if paid else None)  # the request's budget
            spent = encode[i] if paid else 0.0
            k = served_config(ch.params, index, flops[i], g - spent)
            out_a[i, j] = acc[i, k] if k is not None else 0.0
            out_f[i, j] = (flops[i, k] if k is not None else 0.0) + spent
    return out_a, out_f
