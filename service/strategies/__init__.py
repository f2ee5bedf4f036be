"""Strategy registry: names the API accepts, each with its validated parameter model.

    strategy = build_strategy("beam_search", {"n": 16, "beam_width": 4}, max_n=settings.max_n)
    result = await strategy.run(problem, policy, reward, budget, progress)

Every strategy has `name`, `params` (a frozen pydantic model; `params.model_dump()` for logs and cache keys),
`requires_reward` and `run(...)`. Invalid parameters raise `StrategyParamError(param, message)`.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from .base import ComputeBudget, Policy, Problem, ProgressCallback, Reward, StrategyResult
from .beam_search import BeamSearch
from .best_of_n import BestOfN
from .dvts import DVTS
from .greedy import Greedy
from .params import (
    BeamSearchParams,
    BestOfNParams,
    DVTSParams,
    GreedyParams,
    ParticleFilteringParams,
    RebaseParams,
    RevisionsParams,
    StrategyParamError,
    validate_params,
)
from .particle_filtering import ParticleFiltering
from .rebase import Rebase
from .revisions import Revisions


class Strategy(Protocol):
    name: str
    params: Any
    requires_reward: bool

    async def run(self, problem: Problem, policy: Policy, reward: Reward | None, budget: ComputeBudget,
                  progress: ProgressCallback | None = None) -> StrategyResult: ...


STRATEGIES: dict[str, type] = {
    "greedy": Greedy,
    "best_of_n": BestOfN,
    "beam_search": BeamSearch,
    "dvts": DVTS,
    "rebase": Rebase,
    "particle_filtering": ParticleFiltering,
    "revisions": Revisions,
}

PARAMS: dict[str, type] = {
    "greedy": GreedyParams,
    "best_of_n": BestOfNParams,
    "beam_search": BeamSearchParams,
    "dvts": DVTSParams,
    "rebase": RebaseParams,
    "particle_filtering": ParticleFilteringParams,
    "revisions": RevisionsParams,
}


# Strategies built on the ones above that need what only the running gateway has (e.g. `auto` needs the calibrated
# policy table): registered by their own module (router/auto.py), built with that context as keyword arguments.
# factory(params, max_n, **context) validates its own params and raises StrategyParamError.
COMPOSITE: dict[str, Callable[..., Strategy]] = {}


def register(name: str, factory: Callable[..., Strategy]) -> None:
    COMPOSITE[name] = factory


def build_strategy(name: str, params: dict[str, Any] | None = None, max_n: int | None = None,
                   **context: Any) -> Strategy:
    """A ready strategy; `max_n` caps `n` (the gateway's limit). Raises StrategyParamError on anything invalid."""
    if name in COMPOSITE:
        return COMPOSITE[name](params or {}, max_n, **context)
    if name not in STRATEGIES:
        known = ", ".join(sorted([*STRATEGIES, *COMPOSITE]))
        raise StrategyParamError("strategy", f"unknown strategy {name!r}; known: {known}")
    return STRATEGIES[name](validate_params(PARAMS[name], params, max_n))


__all__ = ["COMPOSITE", "PARAMS", "STRATEGIES", "Strategy", "StrategyParamError", "build_strategy", "register"]
