"""The request's test-time compute options: strategy and parameters from the body's `ttc` object and X-TTC-* headers
(headers win), validated into a ready strategy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..api.errors import APIError
from ..strategies import Strategy, StrategyParamError, build_strategy

NO_STRATEGY = "none"
# Keys of the `ttc` object that are not strategy parameters.
_REQUEST_KEYS = {"strategy", "budget_flops"}


@dataclass
class TTCOptions:
    strategy_name: str
    params: dict[str, Any] = field(default_factory=dict)
    budget_flops: float | None = None

    @property
    def passthrough(self) -> bool:
        return self.strategy_name == NO_STRATEGY


def _flops(value: Any, param: str) -> float:
    try:
        flops = float(value)
    except (TypeError, ValueError):
        raise APIError(400, f"{param} must be a number of FLOPs, e.g. 2.5e13", param=param, code="invalid_value")
    if not flops > 0 or flops == float("inf"):
        raise APIError(400, f"{param} must be a positive finite number", param=param, code="invalid_value")
    return flops


def parse_options(ttc: dict[str, Any] | None, headers: dict[str, str], default_strategy: str) -> TTCOptions:
    ttc = dict(ttc or {})
    name = headers.get("x-ttc-strategy") or ttc.get("strategy") or default_strategy
    if not isinstance(name, str):
        raise APIError(400, "ttc.strategy must be a string", param="ttc.strategy", code="invalid_value")
    budget = None
    if "x-ttc-budget-flops" in headers:
        budget = _flops(headers["x-ttc-budget-flops"], "X-TTC-Budget-FLOPs")
    elif ttc.get("budget_flops") is not None:
        budget = _flops(ttc["budget_flops"], "ttc.budget_flops")
    params = {k: v for k, v in ttc.items() if k not in _REQUEST_KEYS}
    if name == NO_STRATEGY and params:
        raise APIError(400, f"ttc parameters {sorted(params)} need a strategy", param="ttc.strategy",
                       code="invalid_value")
    return TTCOptions(name, params, budget)


def make_strategy(options: TTCOptions, max_n: int) -> Strategy:
    try:
        return build_strategy(options.strategy_name, options.params, max_n=max_n)
    except StrategyParamError as exc:
        param = "ttc.strategy" if exc.param == "strategy" else f"ttc.{exc.param}"
        raise APIError(400, f"Invalid {param}: {exc.message}", param=param, code="invalid_value")
