"""Rewards (step verifiers) implementing `service.strategies.base.Reward`.

`arith` is model-free (a calculator over the equations a step writes), `confidence` reads the policy's own token
log-probabilities (DeepConf); model-based PRMs live with the workers that serve them. `ProductReward` combines two.
"""

from .arithmetic import ArithmeticReward
from .combine import ProductReward
from .confidence import ConfidenceReward

__all__ = ["ArithmeticReward", "ConfidenceReward", "ProductReward"]
