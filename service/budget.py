"""How a request's FLOPs budget is sized before it runs: the limits it runs under, its exact prompt tokens, the
sequences it asks for, and what a plain request may generate within the budget.

The guarantee behind `enforce` is that nothing is sent to a worker unless its worst case (every sequence running to
max_tokens, nothing served from the prefix cache) fits what is left. That worst case is only an upper bound if the
prompt tokens are the real ones: they are counted by the policy worker's own tokenizer (`/tokenize`), never guessed
from characters (a prompt of rare code points is several tokens per character).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from .metering import ModelShape


class BudgetError(Exception):
    """A request the budget or the limits cannot serve (the API layer answers 400)."""

    def __init__(self, message: str, param: str | None, code: str):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


def per_token_flops(shape: ModelShape) -> float:
    """What one generated token costs at the margin (X-TTC-Budget-Tokens is priced at this)."""
    return 2.0 * shape.non_embedding_params + shape.logits_flops(1)


def effective_budget(budget_flops: float | None, budget_tokens: int | None, shape: ModelShape) -> float | None:
    """The FLOPs limit a request runs under: its FLOPs budget and its token budget at the policy's per-token cost."""
    limits = [budget_flops] if budget_flops is not None else []
    if budget_tokens is not None:
        limits.append(budget_tokens * per_token_flops(shape))
    return min(limits) if limits else None


def prompt_count(prompt: Any) -> int:
    """How many prompts a completions request carries (a list of strings or of token lists is a batch)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return len(prompt)
    return 1


def check_sequences(prompts: int, n: int, max_n: int) -> None:
    """Every prompt of a batch runs n sequences: the cap bounds them all, not only n."""
    if n > max_n:
        raise BudgetError(f"n must be at most {max_n}", "n", "invalid_value")
    if prompts * n > max_n:
        raise BudgetError(f"A request may run at most {max_n} sequences; {prompts} prompts x n={n} is "
                          f"{prompts * n}", "prompt", "invalid_value")


async def completion_prompt_tokens(prompt: Any, count_texts) -> list[int]:
    """Exact token count of each prompt of a completions request; token-id prompts are counted as given."""
    if isinstance(prompt, str):
        return list(await count_texts([prompt]))
    if prompt and isinstance(prompt[0], int):
        return [len(prompt)]
    texts = [p for p in prompt if isinstance(p, str)]
    counted = iter(await count_texts(texts)) if texts else iter(())
    return [next(counted) if isinstance(p, str) else len(p) for p in prompt]


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
        length); BudgetError when not even one token fits."""
        if budget is None:
            return max_tokens
        if self.worst_case(1) > budget:
            raise BudgetError(f"The FLOPs budget {budget:.3e} cannot pay for even one token of this request "
                              f"(its {sum(self.prompt_tokens)} prompt tokens alone cost "
                              f"{self.worst_case(1):.3e})", "X-TTC-Budget-FLOPs", "budget_exceeded")
        lo, hi = 1, max_tokens
        while lo < hi:  # the cost grows with max_tokens: bisect for the largest that fits
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.worst_case(mid) <= budget else (lo, mid - 1)
        return lo
