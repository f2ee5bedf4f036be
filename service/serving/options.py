"""The request's test-time compute options: strategy, its parameters and the budget, from the body's `ttc` object and
the X-TTC-* headers (headers win), bounded by the server's and the API key's caps."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..budget import positive, requested_budget
from ..config import KeyPolicy, Settings
from ..errors import InvalidParameter, NotAllowed
from ..protocol.ttc import REQUEST_KEYS, TTCExtension
from ..router import auto as _auto  # noqa: F401  (registers the `auto` strategy)
from ..strategies import Strategy, StrategyParamError, build_strategy

NO_STRATEGY = "none"
AUTO = "auto"

# The header of each of the `ttc` extension's own keys (protocol/ttc.py types the body's; headers win over it).
_HEADERS = {key: "x-ttc-" + key.replace("_", "-") for key in REQUEST_KEYS}
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


def _raw(ttc: TTCExtension, headers: dict[str, str], key: str) -> tuple[Any, str]:
    """The value and the name to blame for it (the header's text wins over the body's typed value)."""
    header = _HEADERS[key]
    if header in headers:
        return headers[header], _HEADER_NAMES[header]
    return getattr(ttc, key), f"ttc.{key}"


def parse_options(ttc: TTCExtension | None, headers: dict[str, str], settings: Settings,
                  key_policy: KeyPolicy | None) -> TTCOptions:
    """The body's types are checked where it is parsed (TTCExtension); here the headers, their precedence, the
    defaults and the caps."""
    ttc = ttc or TTCExtension()
    name, name_src = _raw(ttc, headers, "strategy")
    name = name or settings.default_strategy
    kp = key_policy or KeyPolicy()
    if kp.strategies is not None and name not in kp.strategies and name != NO_STRATEGY:
        raise NotAllowed(f"This API key may not use strategy {name!r}; allowed: {', '.join(kp.strategies)}",
                         param=name_src, code="strategy_not_allowed")

    budget = requested_budget(_raw(ttc, headers, "budget_flops"), _raw(ttc, headers, "budget_tokens"),
                              _raw(ttc, headers, "budget_mode"), kp.default_budget_flops or settings.default_budget_flops,
                              (settings.max_budget_flops, kp.max_budget_flops))
    deadline = positive(*_raw(ttc, headers, "deadline_ms"), integer=True)
    if deadline is None:
        deadline = settings.default_deadline_ms

    params = ttc.params
    if name == NO_STRATEGY and params:
        raise InvalidParameter(f"ttc parameters {sorted(params)} need a strategy", param="ttc.strategy",
                               code="invalid_value")
    return TTCOptions(name, params, budget.flops, budget.tokens, deadline, budget.mode, budget.capped)


def make_strategy(options: TTCOptions, max_n: int, **context: Any) -> Strategy:
    """The request's strategy from the registry (`auto` included: `context` carries what it needs)."""
    try:
        return build_strategy(options.strategy_name, options.params, max_n=max_n, **context)
    except StrategyParamError as exc:
        param = "ttc.strategy" if exc.param == "strategy" else f"ttc.{exc.param}"
        raise InvalidParameter(f"Invalid {param}: {exc.message}", param=param, code="invalid_value")
