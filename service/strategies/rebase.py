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
from typing import Sequence

from .base import ComputeBudget, Policy, Problem, ProgressCallback, Reward, StrategyResult
from .calls import BudgetedCalls, inherit_scores, score_nodes, tree_result
from .params import RebaseParams, StrategyParamError, sampling_temperature
from .steps import Node, PrefixStreamer, expand, split_steps, step_params


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


class Rebase:
    name = "rebase"
    requires_reward = True

    def __init__(self, params: RebaseParams):
        self.params = params

    async def run(self, problem: Problem, policy: Policy, reward: Reward | None, budget: ComputeBudget,
                  progress: ProgressCallback | None = None) -> StrategyResult:
        p = self.params
        if reward is None:
            raise StrategyParamError("strategy", "rebase needs a reward model to balance the tree")
        calls = BudgetedCalls(policy, reward, budget, problem.seed)
        delimiter, temperature = p.step_delimiter, sampling_temperature(p, problem.temperature)
        streamer = PrefixStreamer(progress, delimiter)
        frontier, widths = [Node()], [p.n]
        remaining = p.n
        open_nodes: list[Node] = []
        finished: list[Node] = []
        rounds = 0
        for round_index in range(p.max_rounds):
            last = round_index == p.max_rounds - 1
            params = step_params(frontier, problem, temperature, delimiter, last)
            reserve = calls.reward_estimate(problem.question, [split_steps(f.text, delimiter) or [""]
                                                               for f, w in zip(frontier, widths) for _ in range(w)])
            outputs = await calls.generate([problem.prompt + f.text for f in frontier], params, widths, reserve)
            if outputs is None:
                # Only the expanded frontier was eligible when we last streamed; pruned nodes must not come back.
                open_nodes = frontier if round_index else []
                break
            rounds += 1
            families = expand(frontier, outputs, delimiter, problem, round_index, last)
            inherit_scores(families, frontier)
            children = [c for family in families for c in family]
            await score_nodes(calls, problem.question, children, delimiter, p.aggregation)
            done = [c for c in children if c.finished]
            finished += done
            remaining -= len(done)
            open_nodes = sorted((c for c in children if not c.finished), key=lambda n: -(n.score or 0.0))
            if remaining <= 0 or not open_nodes or calls.exhausted:
                break
            all_widths = rebase_widths([n.score or 0.0 for n in open_nodes], remaining, p.balance_temperature)
            frontier = [n for n, w in zip(open_nodes, all_widths) if w > 0]
            widths = [w for w in all_widths if w > 0]
            await streamer.update([f.text for f in frontier] + [f.text for f in finished])
        return await tree_result(calls, finished, open_nodes, p.selection, delimiter, rounds=rounds,
                           finished_count=len(finished), streamed=streamer.sent)
