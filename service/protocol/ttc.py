"""The request's `ttc` extension (the openai client's `extra_body={"ttc": {...}}`): the strategy, the budget and the
deadline, typed here, and the strategy's parameters as extra keys (the strategy registry validates those).

A bad value is a 400 naming the field (`ttc.budget_flops`), like any other field of the request. The X-TTC-* headers
carry the same figures as text and win over the body (serving/options.py); `positive_figure` is the one rule for a
budget figure either way.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import ConfigDict, field_validator
from pydantic_core import PydanticCustomError

from .strict import StrictModel

# The keys of the extension that are the request's own (everything else is a strategy parameter).
REQUEST_KEYS = ("strategy", "budget_flops", "budget_tokens", "deadline_ms", "budget_mode")


def positive_figure(value: Any, integer: bool = False) -> float | int:
    """A budget figure as sent (header text or JSON number) as a number; ValueError saying what it must be."""
    kind = "a positive integer" if integer else "a positive number, e.g. 2.5e13"
    if isinstance(value, bool):
        raise ValueError("must be a positive finite number")
    try:
        number = int(value) if integer and not isinstance(value, float) else float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"must be {kind}") from None
    if not number > 0 or number == math.inf:
        raise ValueError("must be a positive finite number")
    if integer and isinstance(number, float):
        if not number.is_integer():
            raise ValueError(f"must be {kind}")
        number = int(number)
    return number


class TTCExtension(StrictModel):
    model_config = ConfigDict(extra="allow")

    strategy: str | None = None
    budget_flops: float | None = None
    budget_tokens: int | None = None
    deadline_ms: int | None = None
    budget_mode: Literal["enforce", "report"] | None = None

    @field_validator("budget_flops", mode="before")
    @classmethod
    def _flops(cls, v: Any) -> Any:
        return _figure(v, integer=False)

    @field_validator("budget_tokens", "deadline_ms", mode="before")
    @classmethod
    def _count(cls, v: Any) -> Any:
        return _figure(v, integer=True)

    @property
    def params(self) -> dict[str, Any]:
        """The strategy's parameters: every key that is not one of the request's own."""
        return dict(self.model_extra or {})


def _figure(v: Any, integer: bool) -> Any:
    if v is None:
        return None
    try:
        return positive_figure(v, integer)
    except ValueError as exc:
        # A custom error type keeps pydantic's "Value error, " prefix out of the OpenAI message.
        raise PydanticCustomError("invalid_value", str(exc)) from None
