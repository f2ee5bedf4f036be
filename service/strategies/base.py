"""The small interfaces every strategy is written against.

Strategies are pure algorithms: they receive a `Policy` (generates continuations), a `Reward` (scores steps) and a
`ComputeBudget` (what has been spent, what may still be spent). They never see HTTP, workers or the meter directly,
which keeps them testable in milliseconds against in-memory fakes and reusable by calibrate/bench unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol, Sequence

from ..budget import ComputeBudget  # noqa: F401  (its home is budget.py; strategies import it from here)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.8
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # Ask for the log-probability of each sampled token (Completion.token_logprobs).
    logprobs: bool = False
    # Ask for the top-k log-probabilities at every sampled position (Completion.top_logprobs): DeepConf's confidence.
    top_logprobs: int = 0


@dataclass
class Completion:
    """One continuation of one prompt."""

    text: str
    # "stop" (EOS or a stop string), "length" (max_tokens), "abort"
    finish_reason: str
    token_count: int
    # The stop string that ended it, when a stop string did (it is not part of `text`).
    stop_reason: str | None = None
    token_logprobs: list[float] | None = None
    # With SamplingParams.top_logprobs = k: per generated token its k largest log-probabilities (descending), and
    # where the token starts in `text` (character offset), so a step of the text can be mapped back to its tokens.
    top_logprobs: list[list[float]] | None = None
    token_offsets: list[int] | None = None
    # A sample stopped mid-stream (finish_reason "abort") ends at the token that stopped it, but the engine generated
    # more: tokens in the same chunk and the ones in flight while its request was aborted. This is that count (an
    # upper bound), what was metered; None: token_count.
    engine_tokens: int | None = None

    @property
    def hit_eos(self) -> bool:
        return self.finish_reason == "stop" and self.stop_reason is None

    @property
    def spent_tokens(self) -> int:
        """The tokens this sample cost (metered and reported in usage)."""
        return max(self.token_count, self.engine_tokens or 0)


# should_stop(i, top): called after every token of sample i with that token's top-k log-probabilities; True stops
# (aborts) sample i at that token.
StopCheck = Callable[[int, Sequence[float]], bool]


class Policy(Protocol):
    """Generates continuations of raw prompt strings (the chat template is already applied)."""

    async def generate(
        self, prompts: Sequence[str], params: SamplingParams, n: int = 1
    ) -> list[list[Completion]]:
        """One batched engine call: `n` continuations for each prompt, in prompt order."""
        ...

    async def generate_multi(
        self, prompts: Sequence[str], params: SamplingParams, ns: Sequence[int]
    ) -> list[list[Completion]]:
        """Like `generate`, but `ns[i]` continuations of `prompts[i]`, as ONE batched engine call (REBASE widths).

        Optional: strategies fall back to one `generate` call per distinct n (run concurrently) when a policy lacks it.
        With `params.seed` set, the samples of one prompt must still differ (vLLM offsets the seed per child of n>1;
        repeating a prompt as separate requests with one seed would repeat the same sample).
        """
        ...

    async def generate_stoppable(
        self, prompt: str, params: SamplingParams, n: int, should_stop: StopCheck
    ) -> list[Completion]:
        """`n` samples of one prompt that can be stopped one by one (DeepConf's online early termination): each is its
        own streamed request, `should_stop` is asked after every token, and True aborts that request in the engine.

        Optional: without it, best-of-N's online mode only reports what stopping would have saved. Needs
        `params.top_logprobs` >= 1. A stopped sample ends with the token that stopped it (finish_reason "abort",
        `engine_tokens` = what the engine generated, metered). With `params.seed` set, sample i is seeded
        `seed + i`, as vLLM seeds the children of one n>1 request: distinct and reproducible.
        """
        ...

    def estimate_flops(self, prompts: Sequence[str], params: SamplingParams, n: int = 1) -> float:
        """Upper estimate of what `generate` would cost (all samples running to max_tokens), for anytime budgets.

        Optional companion: `async count_prompt_tokens(prompts)`, awaited before every budgeted call, lets a policy
        count the prompts' real tokens first so that this estimate is exact rather than a loose bound.
        """
        ...


class Reward(Protocol):
    """Scores the steps of candidate solutions of one question; scores lie in [0, 1], higher is better.

    Optional hook: `wrap_policy(policy) -> Policy`. A reward that reads the samples themselves (confidence: their
    token log-probabilities) returns a policy that asks for what it needs and records it; BudgetedCalls applies it,
    so every strategy's engine calls go through it.
    """

    name: str

    async def score(self, question: str, candidates: Sequence[Sequence[str]]) -> list[list[float]]:
        """For each candidate (a list of step texts), one score per step, in order."""
        ...

    def estimate_flops(self, question: str, candidates: Sequence[Sequence[str]]) -> float:
        ...


@dataclass
class Problem:
    """One request as strategies see it."""

    # Prompt text up to where the assistant's answer starts (chat template applied).
    prompt: str
    # The user's question alone, for the reward model.
    question: str
    max_tokens: int
    temperature: float = 0.8
    top_p: float = 1.0
    seed: int | None = None
    # Stop strings the client asked for (end the answer).
    stop: tuple[str, ...] = ()
    # The answer is a JSON value (every call is under the same guided decoding): candidates vote over parsed values.
    structured: bool = False


# Called with text that every live candidate already shares and that will not change (for streaming).
ProgressCallback = Callable[[str], Awaitable[None]]


@dataclass
class StrategyResult:
    text: str
    finish_reason: str
    # Extracted final answer (None when none was found) and the score that chose it.
    answer: str | None = None
    score: float | None = None
    samples: int = 0
    steps: int = 0
    completion_tokens: int = 0
    # True when the budget stopped the search early (anytime result).
    budget_exhausted: bool = False
    details: dict[str, Any] = field(default_factory=dict)
