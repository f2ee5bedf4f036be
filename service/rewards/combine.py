"""Combining rewards: a step is good only if both verifiers think so (e.g. a trained PRM times the calculator)."""

from __future__ import annotations

import asyncio
from typing import Sequence

from service.strategies.base import Reward


class ProductReward:
    """Step-wise product of two rewards' scores (both in [0, 1], so the product is too); named "a*b"."""

    def __init__(self, a: Reward, b: Reward):
        self.a, self.b = a, b
        self.name = f"{a.name}*{b.name}"

    async def score(self, question: str, candidates: Sequence[Sequence[str]]) -> list[list[float]]:
        scores_a, scores_b = await asyncio.gather(self.a.score(question, candidates),
                                                  self.b.score(question, candidates))
        combined = []
        for row_a, row_b in zip(scores_a, scores_b, strict=True):
            if len(row_a) != len(row_b):
                raise ValueError(f"{self.name}: rewards disagree on the number of steps ({len(row_a)} vs {len(row_b)})")
            combined.append([x * y for x, y in zip(row_a, row_b)])
        return combined

    def wrap_policy(self, policy):
        """Either side may need to see the samples (confidence reads their log-probabilities)."""
        for reward in (self.a, self.b):
            wrap = getattr(reward, "wrap_policy", None)
            policy = wrap(policy) if wrap is not None else policy
        return policy

    def estimate_flops(self, question: str, candidates: Sequence[Sequence[str]]) -> float:
        return self.a.estimate_flops(question, candidates) + self.b.estimate_flops(question, candidates)
