"""The request's test-time compute options: strategy, its parameters and the budget, from the body's `ttc` object and
the X-TTC-* headers (headers win), bounded by the server's and the API key's caps."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..api.errors import APIError
from ..config import KeyPolicy, Settings
from ..strategies import Strategy, StrategyParamError, build_strategy

NO_STRATEGY = "none"
AUTO = "auto"

# Request-level keys of the `ttc` object (everything else is a strategy parameter), with their headers.
_HEADERS = {
    "strategy": "x-ttc-strategy",
    "budget_flops": "x-ttc-budget-flops",
    "budget_tokens": "x-ttc-budget-tokens",
    "deadline_ms": "x-ttc-deadline-ms",
    "budget_mode": "x-ttc-budget-mode",
}
_HEADER_NAMES = {"x-ttc-strategy": "X-TTC-Strategy", "x-ttc-budget-flops": "X-TTC-Budget-FLOPs",
                 "x-ttc-budget-tokens": "X-TTC-Budget-Tokens", "x-ttc-deadline-ms": "X-TTC-Deadline-Ms",
                 "x-ttc-budget-mode": "X-TTC-Budget-Mode"}


@dataclass
class TTCOptions:
    strategy_name: str
    params: dict[str, Any] = field(default_factory=dict)
    budget_flops: float | None = None
    budget_tokens: int | None = None
    deadline_ms: int | None = None
    mode: str = "enforce"
    # True when a cap lowered what the request asked for.
    capped: bool = False

    @property
    def passthrough(self) -> bool:
        return self.strategy_name == NO_STRATEGY

    @property
    def enforce(self) -> bool:
        return self.mode == "enforce"


def _raw(ttc: dict[str, Any], headers: dict[str, str], key: str) -> tuple[Any, str]:
    """The value and the name to blame for it (the header wins over the body)."""
    header = _HEADERS[key]
    if header in headers:
        return headers[header], _HEADER_NAMES[header]
    return ttc.get(key), f"ttc.{key}"


def _positive(value: Any, name: str, integer: bool = False) -> float | int | None:
    if value is None:
        return None
    try:
        number = int(value) if integer and not isinstance(value, float) else float(value)
    except (TypeError, ValueError):
        kind = "a positive integer" if integer else "a positive number, e.g. 2.5e13"
        raise APIError(400, f"{name} must be {kind}", param=name, code="invalid_value")
    if isinstance(value, bool) or not number > 0 or number == float("inf"):
        raise APIError(400, f"{name} must be a positive finite number", param=name, code="invalid_value")
    return number


def _cap(value: float | None, *caps: float | None) -> tuple[float | None, bool]:
    limits = [c for c in caps if c is not None]
    if not limits:
        return value, False
    cap = min(limits)
    if value is None or value > cap:
        # No budget asked for under a cap means the cap: a client can never buy more than it.
        return cap, value is not None
    return value, False


def parse_options(ttc: dict[str, Any] | None, headers: dict[str, str], settings: Settings,
                  key_policy: KeyPolicy | None) -> TTCOptions:
    ttc = dict(ttc or {})
    name, name_src = _raw(ttc, headers, "strategy")
    name = name or settings.default_strategy
    if not isinstance(name, str):
        raise APIError(400, f"{name_src} must be a string", param=name_src, code="invalid_value")
    kp = key_policy or KeyPolicy()
    if kp.strategies is not None and name not in kp.strategies and name != NO_STRATEGY:
        raise APIError(403, f"This API key may not use strategy {name!r}; allowed: {', '.join(kp.strategies)}",
                       param=name_src, code="strategy_not_allowed")

    flops = _positive(*_raw(ttc, headers, "budget_flops"))
    tokens = _positive(*_raw(ttc, headers, "budget_tokens"), integer=True)
    deadline = _positive(*_raw(ttc, headers, "deadline_ms"), integer=True)
    mode, mode_src = _raw(ttc, headers, "budget_mode")
    mode = mode or "enforce"
    if mode not in ("enforce", "report"):
        raise APIError(400, f"{mode_src} must be 'enforce' or 'report'", param=mode_src, code="invalid_value")
    if flops is None:
        flops = kp.default_budget_flops or settings.default_budget_flops
    flops, capped = _cap(flops, settings.max_budget_flops, kp.max_budget_flops)
    if capped:
        mode = "enforce"  # a cap is never merely reported
    if deadline is None:
        deadline = settings.default_deadline_ms

    params = {k: v for k, v in ttc.items() if k not in _HEADERS}
    if name == NO_STRATEGY and params:
        raise APIError(400, f"ttc parameters {sorted(params)} need a strategy", param="ttc.strategy",
                       code="invalid_value")
    return TTCOptions(name, params, flops, tokens, deadline, mode, capped)


def make_strategy(options: TTCOptions, max_n: int) -> Strategy:
    try:
        return build_strategy(options.strategy_name, options.params, max_n=max_n)
    except StrategyParamError as exc:
        param = "ttc.strategy" if exc.param == "strategy" else f"ttc.{exc.param}"
        raise APIError(400, f"Invalid {param}: {exc.message}", param=param, code="invalid_value")
