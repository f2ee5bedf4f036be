"""REBASE, reward balanced search (Wu et al., ICLR 2025, §3.1.2 and their rebase.py).

N first steps are sampled and the budget is B = N. Every round the reward scores all new nodes (ONE score call);
nodes that finished leave the tree as answers and reduce B by one each; the open nodes, sorted by reward, get widths
W_j from softmax(reward / T_b) over the remaining B (sequential ceil, so the widths sum to exactly B) and are expanded
W_j times each in ONE batched generate call (`generate_multi` with per-node n). So exactly N answers finish unless the
depth cap or the budget intervenes. The depth cap is `max_rounds`; unlike Wu's code, which drops the open leaves
at the cap, the last round generates to the end of the answer so those samples are not thrown away. The answer is
chosen by `selection` (default weighted vote) over the finished leaves.

Anytime and streaming as in beam search: each call is budget-checked first; when the next round does not fit the
search stops and votes over the finished leaves (or returns the best open partial solution, budget_exhausted=True);
`progress` gets whole steps shared by every node that is still expanded and every finished leaf.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from .base import Problem
from .calls import BudgetedCalls
from .params import RebaseParams
from .steps import Node
from .tree import Search, TreeSearch


def rebase_widths(rewards: Sequence[float], budget: int, temperature: float) -> list[int]:
    """Children per node, aligned with `rewards`: softmax(reward / T) shares of `budget`, summing to it exactly.

    Nodes are visited best first (ties in input order); each takes ceil(left * e_j / sum of e over the nodes not yet
    visited), so every node gets at least its proportional share of what is left, higher rewards never get fewer
    children, and the last node with any weight takes the rest.
    """
    widths = [0] * len(rewards)
    if budget <= 0 or not rewards:
        return widths
    order = sorted(range(len(rewards)), key=lambda i: -rewards[i])
    top = rewards[order[0]]
    weights = [math.exp((rewards[i] - top) / temperature) for i in order]  # shifted: no overflow, best weighs 1
    suffix = weights[:]
    for pos in range(len(suffix) - 2, -1, -1):
        suffix[pos] += suffix[pos + 1]
    left = budget
    for pos, i in enumerate(order):
        if left <= 0:
            break
        share = left * weights[pos] / suffix[pos] if suffix[pos] > 0 else left
        # The epsilon absorbs float error (2.0000000001 must not become 3 and starve later nodes).
        width = min(left, math.ceil(share - 1e-9))
        widths[i] = width
        left -= width
    return widths


@dataclass
class RebaseSearch(Search):
    remaining: int = 0  # answers still to finish (Wu et al.'s B)


class Rebase(TreeSearch):
    name = "rebase"
    reward_use = "balance the tree"
    params: RebaseParams

    def new_search(self, calls: BudgetedCalls, problem: Problem, delimiter: str, temperature: float) -> Search:
        return RebaseSearch(calls, problem, delimiter, temperature, [Node()], [self.params.n], remaining=self.params.n)

    def collect(self, search: RebaseSearch, families: list[list[Node]], children: list[Node]) -> bool:
        done = [c for c in children if c.finished]
        search.finished += done
        search.remaining -= len(done)
        search.open_nodes = sorted((c for c in children if not c.finished), key=lambda n: -(n.score or 0.0))
        return search.remaining > 0 and bool(search.open_nodes)

    def next_frontier(self, search: RebaseSearch) -> None:
        widths = rebase_widths([n.score or 0.0 for n in search.open_nodes], search.remaining,
                               self.params.balance_temperature)
        search.frontier = [n for n, w in zip(search.open_nodes, widths) if w > 0]
        search.widths = [w for w in widths if w > 0]
