"""DeepConf (Fu et al. 2025, arXiv 2508.15260): the policy's own confidence as a verifier that costs no FLOPs.

The confidence measures themselves (token, group, lowest group, bottom 10%, tail, mean) are defined in
service/strategies/confidence.py, where best-of-N uses them too.

As a `Reward`: the score of step j is the chosen metric over the trace's tokens up to the end of step j, squashed
into [0, 1) by C / (C + scale) (monotone, so rankings and votes only depend on C). Tokens come from a per-request
`ConfidenceLedger` that the strategy's policy calls fill (`wrap_policy`), so scoring needs no engine call at all.
A step the ledger never saw (a text no recorded completion contains) scores a neutral 0.5 and is counted in `misses`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from service.strategies.base import Completion, SamplingParams, StopCheck
from service.strategies.confidence import (METRICS, Metric, consensus, first_stop, group_confidences,  # noqa: F401
                                           squash, token_confidence, token_confidences, trace_confidence,
                                           warmup_threshold)

# --- the ledger: which tokens (and confidences) produced which text ---------------------------------------------

@dataclass
class _Entry:
    context: str
    text: str
    conf: list[float]
    offsets: list[int]

    def span(self, start: int, end: int) -> list[float]:
        """Confidences of the tokens that overlap characters [start, end) of the text."""
        return [c for k, (c, o) in enumerate(zip(self.conf, self.offsets))
                if o < end and (self.offsets[k + 1] if k + 1 < len(self.offsets) else len(self.text)) > start]


def _offsets(completion: Completion, count: int) -> list[int]:
    offsets = list(completion.token_offsets or [])
    if len(offsets) == count:
        return offsets
    # No usable offsets: spread the tokens evenly over the text (only the step-to-token mapping gets coarser).
    return [round(i * len(completion.text) / max(1, count)) for i in range(count)]


class ConfidenceLedger:
    """Per request: every completion generated (its prompt, text and per-token confidences), indexed by its lines."""

    def __init__(self) -> None:
        self.entries: list[_Entry] = []
        self._by_line: dict[str, list[_Entry]] = {}

    def record(self, prompt: str, completion: Completion) -> None:
        conf = token_confidences(completion)
        if not conf or not completion.text.strip():
            return
        entry = _Entry(prompt, completion.text, conf, _offsets(completion, len(conf)))
        self.entries.append(entry)
        for line in {ln.strip() for ln in completion.text.splitlines() if ln.strip()}:
            self._by_line.setdefault(line, []).append(entry)

    def step_tokens(self, steps: Sequence[str]) -> list[list[float] | None]:
        """Per step, the confidences of its tokens (None when no recorded completion wrote it)."""
        out: list[list[float] | None] = []
        for j, step in enumerate(steps):
            body = step.strip()
            first = next((ln.strip() for ln in body.splitlines() if ln.strip()), "")
            found = [e for e in self._by_line.get(first, []) if body in e.text]
            if not found:
                out.append(None)
                continue
            # Identical text can come from different contexts (other particles); prefer the entry whose context
            # ends with this candidate's own previous steps, scanned backwards.
            entry = max(found, key=lambda e: _context_match(e, steps[:j], body))
            start = entry.text.find(body)
            out.append(entry.span(start, start + len(body)))
        return out


def _context_match(entry: _Entry, previous: Sequence[str], body: str) -> int:
    """How many of the candidate's previous steps (last first) the entry's context ends with."""
    context = (entry.context + entry.text[: entry.text.find(body)]).rstrip()
    matched = 0
    for step in reversed(previous):
        s = step.strip()
        if not s or not context.endswith(s):
            break
        context, matched = context[: -len(s)].rstrip(), matched + 1
    return matched


class RecordingPolicy:
    """Wraps a request's Policy: asks for top-k log-probabilities with every sample and records them in the ledger.
    The log-probabilities come back with the samples: no extra engine call and nothing extra to meter."""

    def __init__(self, inner, ledger: ConfidenceLedger, top_k: int):
        self.inner, self.ledger, self.top_k = inner, ledger, top_k
        # The optional methods exist exactly when the inner policy has them (strategies test with hasattr); they
        # must be defined here, or `__getattr__` would hand out the inner ones, which bypass the ledger.
        if hasattr(inner, "generate_multi"):
            self.generate_multi = self._generate_multi
        if hasattr(inner, "generate_stoppable"):
            self.generate_stoppable = self._generate_stoppable

    def __getattr__(self, name: str):  # counters such as `reused` of the sample-reusing policy
        return getattr(self.inner, name)

    def _params(self, params: SamplingParams) -> SamplingParams:
        return params if params.top_logprobs >= self.top_k else replace(params, top_logprobs=self.top_k)

    def estimate_flops(self, prompts: Sequence[str], params: SamplingParams, n: int = 1) -> float:
        return self.inner.estimate_flops(prompts, params, n)

    def _record(self, prompts: Sequence[str], out: list[list[Completion]]) -> list[list[Completion]]:
        for prompt, completions in zip(prompts, out):
            for completion in completions:
                self.ledger.record(prompt, completion)
        return out

    async def generate(self, prompts: Sequence[str], params: SamplingParams, n: int = 1) -> list[list[Completion]]:
        return self._record(prompts, await self.inner.generate(prompts, self._params(params), n))

    async def _generate_multi(self, prompts: Sequence[str], params: SamplingParams,
                              ns: Sequence[int]) -> list[list[Completion]]:
        return self._record(prompts, await self.inner.generate_multi(prompts, self._params(params), ns))


    async def _generate_stoppable(self, prompt: str, params: SamplingParams, n: int,
                                  should_stop: StopCheck) -> list[Completion]:
        out = await self.inner.generate_stoppable(prompt, self._params(params), n, should_stop)
        self._record([prompt], [out])
        return out


class ConfidenceReward:
    """Reward protocol implementation "confidence": step scores from the policy's own token confidence (no FLOPs)."""

    name = "confidence"

    def __init__(self, metric: str = "lowest_group", window: int = 32, tail: int = 32, top_k: int = 20,
                 scale: float = 5.0):
        if metric not in METRICS:
            raise ValueError(f"unknown confidence metric {metric!r}; known: {', '.join(METRICS)}")
        self.metric, self.window, self.tail, self.top_k, self.scale = metric, window, tail, top_k, scale
        self.ledger = ConfidenceLedger()
        self.misses = 0

    def wrap_policy(self, policy):
        """The policy the strategy must generate through so that this reward sees the samples' log-probabilities."""
        return policy if isinstance(policy, RecordingPolicy) and policy.ledger is self.ledger \
            else RecordingPolicy(policy, self.ledger, self.top_k)

    def score_steps(self, steps: Sequence[str]) -> list[float]:
        trace: list[float] = []
        scores = []
        for tokens in self.ledger.step_tokens(steps):
            if tokens is None:
                self.misses += 1
            else:
                trace += tokens
            scores.append(squash(trace_confidence(trace, self.metric, self.window, self.tail), self.scale)
                          if trace else 0.5)
        return scores

    async def score(self, question: str, candidates: Sequence[Sequence[str]]) -> list[list[float]]:
        return [self.score_steps(steps) for steps in candidates]

    def estimate_flops(self, question: str, candidates: Sequence[Sequence[str]]) -> float:
        return 0.0
