"""How a request's FLOPs budget is enforced, in one place, in the order a request meets it:

1. `requested_budget`: the budget the client asked for (X-TTC-Budget-* headers, else the `ttc` body), lowered to the
   server's and the API key's caps (`cap`); under a quota every request runs under an enforced budget
   (`run_limit`).
2. `effective_budget`: a token budget priced at the policy's per-token cost; the smaller limit wins.
3. Exact prompt tokens (`completion_prompt_tokens`, the worker's own tokenizer) -> the worst case of a plain request
   (`PlainRequestCost`), shrunk to fit (`max_tokens_within`); a search checks it can pay one answer
   (`check_one_answer`).
4. The quota reserves the whole budget before anything runs and settles the exact spend at the end
   (`serving/quota.py`, called by `serving/lifecycle.py` on every exit).
5. While a strategy runs, `ComputeBudget` answers "may I spend this much more?" from the live meter before every
   engine call (anytime strategies stop with their best so far).

The guarantee behind `enforce` is that nothing is sent to a worker unless its worst case (every sequence running to
max_tokens, nothing served from the prefix cache) fits what is left. That worst case is only an upper bound if the
prompt tokens are the real ones: they are counted by the policy worker's own tokenizer (`/tokenize`), never guessed
from characters (a prompt of rare code points is several tokens per character).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .errors import BudgetExceeded, InvalidParameter
from .metering import ModelShape
from .protocol.ttc import positive_figure

MODES = ("enforce", "report")


def positive(value: Any, name: str, integer: bool = False) -> float | int | None:
    """A budget figure as sent (header text, or the body's already typed number); None when absent."""
    if value is None:
        return None
    try:
        return positive_figure(value, integer)
    except ValueError as exc:
        raise InvalidParameter(f"{name} {exc}", param=name, code="invalid_value")


def cap(value: float | None, *caps: float | None) -> tuple[float | None, bool]:
    """The budget under the caps, and whether a cap lowered what was asked for."""
    limits = [c for c in caps if c is not None]
    if not limits:
        return value, False
    lowest = min(limits)
    if value is None or value > lowest:
        # No budget asked for under a cap means the cap: a client can never buy more than it.
        return lowest, value is not None
    return value, False


@dataclass
class RequestedBudget:
    flops: float | None
    tokens: int | None
    mode: str
    # True when a cap lowered what the request asked for.
    capped: bool


def requested_budget(flops: tuple[Any, str], tokens: tuple[Any, str], mode: tuple[Any, str],
                     default_flops: float | None, caps: Sequence[float | None]) -> RequestedBudget:
    """Each argument is (value as sent, the name to blame for it)."""
    budget_flops = positive(*flops)
    budget_tokens = positive(*tokens, integer=True)
    mode_value = mode[0] or "enforce"
    if mode_value not in MODES:
        raise InvalidParameter(f"{mode[1]} must be 'enforce' or 'report'", param=mode[1], code="invalid_value")
    if budget_flops is None:
        budget_flops = default_flops
    budget_flops, capped = cap(budget_flops, *caps)
    if capped:
        mode_value = "enforce"  # a cap is never merely reported
    return RequestedBudget(budget_flops, budget_tokens, mode_value, capped)  # type: ignore[arg-type]


def per_token_flops(shape: ModelShape) -> float:
    """What one generated token costs at the margin (X-TTC-Budget-Tokens is priced at this)."""
    return 2.0 * shape.non_embedding_params + shape.logits_flops(1)


def effective_budget(budget_flops: float | None, budget_tokens: int | None, shape: ModelShape) -> float | None:
    """The FLOPs limit a request runs under: its FLOPs budget and its token budget at the policy's per-token cost."""
    limits = [budget_flops] if budget_flops is not None else []
    if budget_tokens is not None:
        limits.append(budget_tokens * per_token_flops(shape))
    return min(limits) if limits else None


def run_limit(budget: float | None, enforce: bool, quota: float | None,
              caps: Sequence[float | None]) -> tuple[float | None, bool]:
    """(the budget the request runs under, whether it is enforced). Under a quota every request runs under an
    enforced budget, reserved whole and settled at the end: without one, the smallest cap (the quota at most)."""
    if quota is not None and (budget is None or not enforce):
        return min(x for x in (budget, *caps, quota) if x is not None), True
    return budget, enforce


def prompt_count(prompt: Any) -> int:
    """How many prompts a completions request carries (a list of strings or of token lists is a batch)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return len(prompt)
    return 1


def check_sequences(prompts: int, n: int, max_n: int) -> None:
    """Every prompt of a batch runs n sequences: the cap bounds them all, not only n."""
    if n > max_n:
        raise InvalidParameter(f"n must be at most {max_n}", param="n", code="invalid_value")
    if prompts * n > max_n:
        raise InvalidParameter(f"A request may run at most {max_n} sequences; {prompts} prompts x n={n} is "
                               f"{prompts * n}", param="prompt", code="invalid_value")


async def completion_prompt_tokens(prompt: Any, count_texts) -> list[int]:
    """Exact token count of each prompt of a completions request; token-id prompts are counted as given."""
    if isinstance(prompt, str):
        return list(await count_texts([prompt]))
    if prompt and isinstance(prompt[0], int):
        return [len(prompt)]
    texts = [p for p in prompt if isinstance(p, str)]
    counted = iter(await count_texts(texts)) if texts else iter(())
    return [next(counted) if isinstance(p, str) else len(p) for p in prompt]


def largest_fitting(cost: Callable[[int], float], budget: float, hi: int, lo: int = 1) -> int:
    """The largest x in [lo, hi] with cost(x) <= budget, for a cost that grows with x (bisection); lo when even
    lo does not fit (callers check lo first)."""
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) <= budget else (lo, mid - 1)
    return lo


@dataclass(frozen=True)
class PlainRequestCost:
    """The worst case of a plain (pass-through) request: its prompts, each sampled n times."""

    shape: ModelShape
    prompt_tokens: Sequence[int]
    n: int

    def worst_case(self, max_tokens: int) -> float:
        return sum(self.shape.generation_flops(p, 0, [max_tokens] * self.n) for p in self.prompt_tokens)

    def max_tokens_within(self, budget: float | None, max_tokens: int) -> int:
        """The largest max_tokens whose worst case fits the budget (the request then ends with finish_reason
        length); BudgetExceeded when not even one token fits."""
        if budget is None:
            return max_tokens
        if self.worst_case(1) > budget:
            raise BudgetExceeded(f"The FLOPs budget {budget:.3e} cannot pay for even one token of this request "
                                 f"(its {sum(self.prompt_tokens)} prompt tokens alone cost "
                                 f"{self.worst_case(1):.3e})")
        return largest_fitting(self.worst_case, budget, max_tokens)


class ComputeBudget:
    """What a request may spend while a strategy runs. `spent` reads the live meter so strategies see policy and
    reward FLOPs alike; `clock` is injectable so deadline behaviour is tested without sleeping."""

    def __init__(self, limit_flops: float | None, spent: Callable[[], float], deadline: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.limit_flops = limit_flops
        self._spent = spent
        # clock() after which nothing new may start: the search returns its best so far.
        self.deadline = deadline
        self._clock = clock

    @property
    def spent(self) -> float:
        return self._spent()

    def remaining(self) -> float:
        return float("inf") if self.limit_flops is None else max(0.0, self.limit_flops - self.spent)

    def allows(self, extra_flops: float) -> bool:
        """True if spending `extra_flops` more stays within the limit (anytime strategies ask before expanding)."""
        if self.deadline is not None and self._clock() >= self.deadline:
            return False
        return self.limit_flops is None or self.spent + extra_flops <= self.limit_flops

    def affordable(self, n: int, cost: Callable[[int], float]) -> int:
        """The largest k <= n whose cost(k) the budget allows (0 when none): how an anytime strategy shrinks its
        sample count to fit (one linear scan; cost(k) grows with k)."""
        while n > 0 and not self.allows(cost(n)):
            n -= 1
        return n

    @classmethod
    def unlimited(cls) -> "ComputeBudget":
        return cls(None, lambda: 0.0)


def check_one_answer(budget: ComputeBudget, one_answer_flops: float, max_tokens: int) -> None:
    """A search whose budget cannot pay one greedy answer of max_tokens is refused before it starts (it could
    only return nothing)."""
    if not budget.allows(one_answer_flops):
        raise BudgetExceeded(f"The FLOPs budget {budget.limit_flops:.3e} cannot pay for even one answer of up to "
                             f"{max_tokens} tokens (about {one_answer_flops:.3e} FLOPs); raise it or lower "
                             f"max_tokens")
