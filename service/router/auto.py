"""`auto`: the compute-optimal choice per request, as a strategy the serving layer runs like any other.

It estimates the difficulty (probe or prompt estimator, as the calibrated table says; probe FLOPs count against the
budget), looks up the strategy calibrated for that difficulty bin and the remaining budget, and runs it."""

from __future__ import annotations

from typing import Any, Callable

from pydantic import BaseModel, ConfigDict

from ..strategies.base import ComputeBudget, Policy, Problem, ProgressCallback, Reward, StrategyResult
from .difficulty import run_auto
from .table import PolicyTable


class AutoParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AutoStrategy:
    name = "auto"
    requires_reward = True

    def __init__(self, table: PolicyTable, max_n: int, on_choice: Callable[[dict[str, Any]], None],
                 encoder: Any = None):
        self.table = table
        self.encoder = encoder  # router.hidden_difficulty.PromptEncoder, for a table with estimator "hidden"
        self.max_n = max_n
        self.params = AutoParams()
        self.on_choice = on_choice

    async def run(self, problem: Problem, policy: Policy, reward: Reward | None, budget: ComputeBudget,
                  progress: ProgressCallback | None = None) -> StrategyResult:
        result, info = await run_auto(problem, policy, reward, self.table, budget, self.max_n, progress,
                                      self.encoder)
        self.on_choice(info)
        result.details = dict(result.details or {}, auto=info)
        return result
