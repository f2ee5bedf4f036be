"""Rewards (step verifiers) implementing `service.strategies.base.Reward`.

`arith` is model-free (a calculator over the equations a step writes); model-based PRMs live with the workers that
serve them. `ProductReward` combines two.
"""

from .arithmetic import ArithmeticReward
from .combine import ProductReward

__all__ = ["ArithmeticReward", "ProductReward"]
