"""Greedy decoding: one sample at temperature 0 (the baseline every other strategy must beat)."""

from __future__ import annotations

from .base import ComputeBudget, Policy, Problem, ProgressCallback, Reward, SamplingParams, StrategyResult
from .calls import BudgetedCalls, build_result, empty_result
from .params import DEFAULT_STEP_DELIMITER, GreedyParams
from .voting import Candidate, extract_answer, json_answer, select


class Greedy:
    name = "greedy"
    requires_reward = False

    def __init__(self, params: GreedyParams):
        self.params = params

    async def run(self, problem: Problem, policy: Policy, reward: Reward | None, budget: ComputeBudget,
                  progress: ProgressCallback | None = None) -> StrategyResult:
        calls = BudgetedCalls(policy, None, budget, problem.seed)
        params = SamplingParams(max_tokens=problem.max_tokens, temperature=0.0, stop=problem.stop, seed=problem.seed)
        out = await calls.generate([problem.prompt], params, 1)
        if out is None:
            return empty_result(calls)
        completion = out[0][0]
        extract = json_answer if problem.structured else extract_answer
        candidate = Candidate.of(completion.text, 1.0, completion.finish_reason, completion.token_count, extract)
        return build_result(calls, select([candidate], "best"), "best", DEFAULT_STEP_DELIMITER, 1)
