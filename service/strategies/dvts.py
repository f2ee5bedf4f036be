"""Diverse verifier tree search (search-and-learn's extension of Snell et al.'s beam search).

n / M independent subtrees; each round every open subtree samples M candidate next steps (ONE generate call for all
subtrees, n=M) and keeps the best by the reward (ONE score call for all candidates): greedy search per subtree, the
diversity coming from the subtrees never competing with each other.

Answers: search-and-learn returns N per question, the M candidates of each subtree's last expansion, including
siblings that had not finished (partial texts with no answer). Here the pool is each subtree's final solution plus
those last-round siblings that are themselves finished solutions, so at most N complete answers; `selection`
(default weighted vote) picks among them.

Anytime and streaming as in beam search: every call is budget-checked first; when the next round does not fit,
unfinished subtrees are dropped and the vote runs over the pool (or the best open partial solution if the pool is
empty, budget_exhausted=True); `progress` only receives whole steps shared by every open subtree and every pooled
answer, which with several subtrees usually means nothing before the end.
"""

from __future__ import annotations

from typing import Any

from .base import Problem
from .calls import BudgetedCalls
from .params import DVTSParams
from .steps import Node
from .tree import Search, TreeSearch


class DVTS(TreeSearch):
    name = "dvts"
    reward_use = "choose steps"
    params: DVTSParams

    def new_search(self, calls: BudgetedCalls, problem: Problem, delimiter: str, temperature: float) -> Search:
        search = Search(calls, problem, delimiter, temperature)
        self._subtrees(search, [Node() for _ in range(self.params.n // self.params.beam_width)])
        return search

    def _subtrees(self, search: Search, open_subtrees: list[Node]) -> None:
        search.frontier = search.open_nodes = open_subtrees
        search.widths = [self.params.beam_width] * len(open_subtrees)

    def collect(self, search: Search, families: list[list[Node]], children: list[Node]) -> bool:
        still_open = []
        for family in families:
            # max() keeps the first of equal scores: deterministic.
            best = max(family, key=lambda n: n.score or 0.0)
            if best.finished:
                search.finished += [best] + [c for c in family if c is not best and c.finished]
            else:
                still_open.append(best)
        self._subtrees(search, still_open)
        return True

    def on_budget(self, search: Search, round_index: int) -> list[Node]:
        return search.frontier  # unfinished subtrees are dropped unless nothing finished

    def details(self, search: Search) -> dict[str, Any]:
        return {"subtrees": self.params.n // self.params.beam_width}
