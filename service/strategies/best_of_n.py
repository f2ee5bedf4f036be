"""Best-of-N: N independent samples from one batched call, then majority, best or weighted selection.

Anytime: if N samples do not fit the budget, N shrinks to the largest count that does (the result says
budget_exhausted). If not even one fits, nothing is generated and the result is empty with budget_exhausted=True:
the budget is a hard limit, so there is no "one greedy sample anyway". If the samples fit but scoring them does not,
the vote falls back to majority (details["selection_used"]).
"""

from __future__ import annotations

from .base import ComputeBudget, Policy, Problem, ProgressCallback, Reward, StrategyResult
from .calls import build_result, empty_result, start_sampling
from .params import DEFAULT_STEP_DELIMITER, BestOfNParams
from .steps import split_steps
from .voting import Candidate, aggregate_scores, extract_answer, json_answer, json_equal, select_async


class BestOfN:
    name = "best_of_n"

    def __init__(self, params: BestOfNParams):
        self.params = params

    @property
    def requires_reward(self) -> bool:
        return self.params.selection != "majority"

    async def run(self, problem: Problem, policy: Policy, reward: Reward | None, budget: ComputeBudget,
                  progress: ProgressCallback | None = None) -> StrategyResult:
        p = self.params
        calls, sampling = start_sampling(p, problem, policy, reward, budget, self.requires_reward)
        n = p.n
        while n > 0 and not budget.allows(policy.estimate_flops([problem.prompt], sampling, n)):
            n -= 1
        if n == 0:
            return empty_result(calls)
        calls.exhausted = n < p.n
        out = await calls.generate([problem.prompt], sampling, n)
        if out is None:  # the meter moved between the check and the call (another request's worker time)
            return empty_result(calls)
        extract = json_answer if problem.structured else extract_answer
        candidates = [Candidate.of(c.text, 1.0, c.finish_reason, c.token_count, extract) for c in out[0]]

        selection = p.selection
        if selection != "majority":
            steps = [split_steps(c.text, DEFAULT_STEP_DELIMITER) for c in candidates]
            scores = await calls.score(problem.question, steps)
            if scores is None:
                selection = "majority"
            else:
                for candidate, row in zip(candidates, scores):
                    candidate.score = aggregate_scores(row, p.aggregation)
        choice = await select_async(candidates, selection, json_equal if problem.structured else None)
        return build_result(calls, choice, p.selection, DEFAULT_STEP_DELIMITER, len(candidates),
                            selection_used=selection, n_used=n)
