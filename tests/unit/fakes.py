"""Deterministic in-memory Policy and Reward for fast strategy tests.

Tokens are whitespace-separated words (a word with its trailing whitespace), so max_tokens truncation keeps the text
intact. Both fakes charge a shared `FlopMeter` exactly what their `estimate_flops` would bound, so a
`ComputeBudget(limit, meter.read)` sees policy and reward spending like the real meter does.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable, Sequence

from service.strategies.base import Completion, ComputeBudget, SamplingParams

BASE_PROMPT = "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"


def tokens(text: str) -> list[str]:
    return re.findall(r"\s*\S+\s*|\s+", text)


@dataclass
class FlopMeter:
    total: float = 0.0

    def read(self) -> float:
        return self.total

    def budget(self, limit: float | None) -> ComputeBudget:
        return ComputeBudget(limit, self.read)


# continuation(prompt, rng, temperature) -> the full continuation the "model" would write (before stop strings).
Continuation = Callable[[str, random.Random, float], str]


def from_solutions(solutions: Sequence[str], base: str = BASE_PROMPT,
                   fallback: str = "The answer is 0.") -> Continuation:
    """A model that writes one of `solutions`: the rest of a random one (first one at T=0) extending the prompt."""

    def continuation(prompt: str, rng: random.Random, temperature: float) -> str:
        partial = prompt[len(base):] if prompt.startswith(base) else None
        matching = [s for s in solutions if partial is not None and s.startswith(partial)]
        if not matching:
            return fallback
        chosen = matching[0] if temperature == 0 else rng.choice(matching)
        return chosen[len(partial):]

    return continuation


def round_robin(solutions: Sequence[str], base: str = BASE_PROMPT, fallback: str = "The answer is 0.") -> Continuation:
    """Like `from_solutions`, but sampling cycles through the matching solutions (per prompt): exact diversity."""
    seen: dict[str, int] = {}

    def continuation(prompt: str, rng: random.Random, temperature: float) -> str:
        partial = prompt[len(base):] if prompt.startswith(base) else None
        matching = [s for s in solutions if partial is not None and s.startswith(partial)]
        if not matching:
            return fallback
        k = 0 if temperature == 0 else seen.get(prompt, 0)
        seen[prompt] = k + 1
        return matching[k % len(matching)][len(partial):]

    return continuation


@dataclass
class Call:
    prompts: list[str]
    params: SamplingParams
    ns: list[int]


def word_confidence(word: str) -> float:
    """Default fake token confidence (DeepConf's C, in nats): words saying "unsure" are unsure."""
    return 1.0 if "unsure" in word else 8.0


class FakePolicy:
    def __init__(self, continuation: Continuation, meter: FlopMeter | None = None, flops_per_token: float = 1.0,
                 seed: int = 0, confidence: Callable[[str], float] = word_confidence):
        self.continuation = continuation
        self.confidence = confidence
        self.meter = meter or FlopMeter()
        self.flops_per_token = flops_per_token
        self.rng = random.Random(seed)
        self.calls: list[Call] = []

    def _draw(self, prompt: str, params: SamplingParams) -> tuple[list[str], str, str | None]:
        """(tokens, finish_reason, stop_reason) of one sample, before metering."""
        full = self.continuation(prompt, self.rng, params.temperature)
        cut, stop_reason = len(full), None
        for stop in params.stop:
            at = full.find(stop)
            if 0 <= at < cut:
                cut, stop_reason = at, stop
        words = tokens(full[:cut])
        finish = "stop"
        if len(words) > params.max_tokens:
            words, finish, stop_reason = words[: params.max_tokens], "length", None
        return words, finish, stop_reason

    def _top(self, word: str, params: SamplingParams) -> list[float]:
        # k equal log-probabilities of -C give token confidence exactly C.
        return [-self.confidence(word)] * params.top_logprobs

    def _completion(self, words: list[str], finish: str, stop_reason: str | None, params: SamplingParams,
                    engine_tokens: int | None = None) -> Completion:
        completion = Completion("".join(words), finish, len(words), stop_reason, engine_tokens=engine_tokens)
        if params.top_logprobs:
            completion.top_logprobs = [self._top(w, params) for w in words]
            completion.token_offsets = [sum(len(x) for x in words[:i]) for i in range(len(words))]
        return completion

    def _one(self, prompt: str, params: SamplingParams) -> Completion:
        words, finish, stop_reason = self._draw(prompt, params)
        self.meter.total += (len(tokens(prompt)) + len(words)) * self.flops_per_token
        return self._completion(words, finish, stop_reason, params)

    async def generate(self, prompts: Sequence[str], params: SamplingParams, n: int = 1) -> list[list[Completion]]:
        self.calls.append(Call(list(prompts), params, [n] * len(prompts)))
        return [[self._one(p, params) for _ in range(n)] for p in prompts]

    def estimate_flops(self, prompts: Sequence[str], params: SamplingParams, n: int = 1) -> float:
        return sum((len(tokens(p)) + params.max_tokens) * n * self.flops_per_token for p in prompts)

    @property
    def prompts_seen(self) -> list[str]:
        return [p for call in self.calls for p in call.prompts]


class FakeMultiPolicy(FakePolicy):
    """Also implements the optional per-prompt-n `generate_multi` (one call)."""

    async def generate_multi(self, prompts: Sequence[str], params: SamplingParams,
                             ns: Sequence[int]) -> list[list[Completion]]:
        self.calls.append(Call(list(prompts), params, list(ns)))
        return [[self._one(p, params) for _ in range(n)] for p, n in zip(prompts, ns)]


class FakeStoppablePolicy(FakePolicy):
    """Also implements the optional `generate_stoppable`: each sample is asked about token by token and stops when
    told to. Like a real engine, it may decode `inflight` more tokens before the abort lands; they are metered."""

    def __init__(self, *args, inflight: int = 0, **kw):
        super().__init__(*args, **kw)
        self.inflight = inflight
        self.sample_seeds: list[int | None] = []
        self.generated = 0  # tokens decoded by generate_stoppable, in-flight ones included

    async def generate_stoppable(self, prompt: str, params: SamplingParams, n: int,
                                 should_stop: Callable[[int, Sequence[float]], bool]) -> list[Completion]:
        assert params.top_logprobs >= 1
        self.calls.append(Call([prompt], params, [n]))
        out = []
        for i in range(n):
            self.sample_seeds.append(None if params.seed is None else params.seed + i)
            words, finish, stop_reason = self._draw(prompt, params)
            at = next((j + 1 for j, w in enumerate(words) if should_stop(i, self._top(w, params))), None)
            decoded = len(words) if at is None else min(len(words), at + self.inflight)
            self.generated += decoded
            self.meter.total += (len(tokens(prompt)) + decoded) * self.flops_per_token
            if at is None:
                out.append(self._completion(words, finish, stop_reason, params))
            else:
                out.append(self._completion(words[:at], "abort", None, params, engine_tokens=decoded))
        return out


def keyword_score(step: str) -> float:
    """Default fake verdict: steps saying "good" are good, "bad" are bad, others neutral."""
    return 0.9 if "good" in step else 0.1 if "bad" in step else 0.5


class FakeReward:
    name = "fake"

    def __init__(self, step_score: Callable[[str], float] = keyword_score, meter: FlopMeter | None = None,
                 flops_per_step: float = 0.0):
        self.step_score = step_score
        self.meter = meter or FlopMeter()
        self.flops_per_step = flops_per_step
        self.calls: list[list[list[str]]] = []

    async def score(self, question: str, candidates: Sequence[Sequence[str]]) -> list[list[float]]:
        self.calls.append([list(c) for c in candidates])
        self.meter.total += self.estimate_flops(question, candidates)
        return [[self.step_score(s) for s in steps] for steps in candidates]

    def estimate_flops(self, question: str, candidates: Sequence[Sequence[str]]) -> float:
        return self.flops_per_step * sum(max(1, len(c)) for c in candidates)

    @property
    def scored_texts(self) -> list[str]:
        return ["\n".join(c) for call in self.calls for c in call]


def random_solutions(rng: random.Random, count: int = 6, depth: int = 4, answers: int = 3) -> list[str]:
    """Solutions that share random prefixes (a random tree of steps), each ending with "The answer is N."."""
    solutions = []
    for _ in range(count):
        steps = [f"step {d} option {rng.randrange(2 if d < 2 else 3)} {rng.choice(['good', 'bad', 'meh'])}"
                 for d in range(rng.randint(1, depth))]
        solutions.append("\n".join(steps + [f"The answer is {rng.randrange(answers)}."]))
    return solutions
