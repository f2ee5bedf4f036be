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

from .base import ComputeBudget, Policy, Problem, ProgressCallback, Reward, StrategyResult
from .calls import BudgetedCalls, inherit_scores, score_nodes, tree_result
from .params import DVTSParams, StrategyParamError, sampling_temperature
from .steps import Node, PrefixStreamer, expand, split_steps, step_params


class DVTS:
    name = "dvts"
    requires_reward = True

    def __init__(self, params: DVTSParams):
        self.params = params

    async def run(self, problem: Problem, policy: Policy, reward: Reward | None, budget: ComputeBudget,
                  progress: ProgressCallback | None = None) -> StrategyResult:
        p = self.params
        if reward is None:
            raise StrategyParamError("strategy", "dvts needs a reward model to choose steps")
        calls = BudgetedCalls(policy, reward, budget, problem.seed)
        delimiter, temperature = p.step_delimiter, sampling_temperature(p, problem.temperature)
        streamer = PrefixStreamer(progress, delimiter)
        subtrees = [Node() for _ in range(p.n // p.beam_width)]
        pool: list[Node] = []
        rounds = 0
        for round_index in range(p.max_rounds):
            if not subtrees:
                break
            last = round_index == p.max_rounds - 1
            params = step_params(subtrees, problem, temperature, delimiter, last)
            reserve = calls.reward_estimate(problem.question, [split_steps(s.text, delimiter) or [""]
                                                               for s in subtrees for _ in range(p.beam_width)])
            outputs = await calls.generate([problem.prompt + s.text for s in subtrees], params, p.beam_width, reserve)
            if outputs is None:
                break
            rounds += 1
            families = expand(subtrees, outputs, delimiter, problem, round_index, last)
            inherit_scores(families, subtrees)
            await score_nodes(calls, problem.question, [c for f in families for c in f], delimiter, p.aggregation)
            still_open = []
            for family in families:
                # max() keeps the first of equal scores: deterministic.
                best = max(family, key=lambda n: n.score or 0.0)
                if best.finished:
                    pool += [best] + [c for c in family if c is not best and c.finished]
                else:
                    still_open.append(best)
            subtrees = still_open
            if calls.exhausted:
                break
            await streamer.update([s.text for s in subtrees] + [a.text for a in pool])
        return await tree_result(calls, pool, subtrees, p.selection, delimiter, rounds=rounds,
                           subtrees=p.n // p.beam_width, streamed=streamer.sent)
