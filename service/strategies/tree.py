"""The round loop that the step-level tree searches share (beam search, DVTS, REBASE, particle filtering).

Every round: the frontier is expanded in ONE batched generate call (`widths[i]` children of `frontier[i]`, with room
kept to score them), the children inherit their parent's score, are scored (ONE Reward.score call), and the
algorithm collects what finished and picks the next frontier. The last round (`max_rounds`) generates to the end of
the answer. A search is a subclass that says only what differs: its first frontier, how it scores, what it keeps.

Anytime: when the next expansion does not fit the budget, the loop stops and votes over the finished solutions; with
none, it returns the best open partial solution (tree_result). Streaming: after each round, `progress` gets the
whole steps shared by every candidate still eligible (the frontier and the finished solutions).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from .base import ComputeBudget, Policy, Problem, ProgressCallback, Reward, StrategyResult
from .calls import BudgetedCalls, inherit_scores, score_nodes, tree_result
from .params import StrategyParamError, sampling_temperature
from .steps import Node, PrefixStreamer, expand, split_steps, step_params


@dataclass
class Search:
    """One run's state: the loop's, and what an algorithm keeps between rounds (subclass it for more)."""

    calls: BudgetedCalls
    problem: Problem
    delimiter: str
    temperature: float
    frontier: list[Node] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    # Open candidates the result falls back to (the best partial solution) when nothing finished.
    open_nodes: list[Node] = field(default_factory=list)
    finished: list[Node] = field(default_factory=list)
    rounds: int = 0


class TreeSearch:
    name = "tree_search"
    requires_reward = True
    # What the reward model is for (the error without one says it).
    reward_use = "score steps"

    def __init__(self, params: Any):
        self.params = params

    # ---- the algorithm ----------------------------------------------------------------------------------------
    def new_search(self, calls: BudgetedCalls, problem: Problem, delimiter: str, temperature: float) -> Search:
        search = Search(calls, problem, delimiter, temperature)
        search.frontier, search.widths = [Node()], [self.params.n]
        return search

    async def score(self, search: Search, children: list[Node]) -> None:
        await score_nodes(search.calls, search.problem.question, children, search.delimiter, self.params.aggregation)

    def collect(self, search: Search, families: list[list[Node]], children: list[Node]) -> bool:
        """Takes in one round's scored children (finished ones, open ones); False ends the search."""
        raise NotImplementedError

    def next_frontier(self, search: Search) -> None:
        """Sets the frontier and widths of the next round (after `collect`, unless the search ended)."""

    def on_budget(self, search: Search, round_index: int) -> list[Node]:
        # Only the frontier was eligible when we last streamed; pruned candidates must not come back.
        return search.frontier if round_index else []

    def answers(self, search: Search) -> Sequence[Node]:
        return search.finished

    def details(self, search: Search) -> dict[str, Any]:
        return {"finished_count": len(search.finished)}

    # ---- the loop ---------------------------------------------------------------------------------------------
    async def run(self, problem: Problem, policy: Policy, reward: Reward | None, budget: ComputeBudget,
                  progress: ProgressCallback | None = None) -> StrategyResult:
        p = self.params
        if reward is None:
            raise StrategyParamError("strategy", f"{self.name} needs a reward model to {self.reward_use}")
        calls = BudgetedCalls(policy, reward, budget, problem.seed)
        search = self.new_search(calls, problem, p.step_delimiter, sampling_temperature(p, problem.temperature))
        delimiter = search.delimiter
        streamer = PrefixStreamer(progress, delimiter)
        for round_index in range(p.max_rounds):
            if not search.frontier:
                break
            last = round_index == p.max_rounds - 1
            frontier, widths = search.frontier, search.widths
            params = step_params(frontier, problem, search.temperature, delimiter, last)
            # Keep room to score the children (at least what scoring their parents would cost).
            reserve = calls.reward_estimate(problem.question, [split_steps(f.text, delimiter) or [""]
                                                               for f, w in zip(frontier, widths) for _ in range(w)])
            outputs = await calls.generate([problem.prompt + f.text for f in frontier], params, widths, reserve)
            if outputs is None:
                search.open_nodes = self.on_budget(search, round_index)
                break
            search.rounds += 1
            families = expand(frontier, outputs, delimiter, problem, round_index, last)
            inherit_scores(families, frontier)
            children = [child for family in families for child in family]
            await self.score(search, children)
            if not self.collect(search, families, children) or calls.exhausted:
                break
            self.next_frontier(search)
            await streamer.update([f.text for f in search.frontier] + [f.text for f in search.finished])
        return await tree_result(calls, self.answers(search), search.open_nodes, p.selection, delimiter,
                                 rounds=search.rounds, **self.details(search), streamed=streamer.sent)
