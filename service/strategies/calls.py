"""Engine calls under a compute budget: every policy or reward call is preceded by `budget.allows(estimate)`.

Estimates are upper bounds (every sample runs to max_tokens), so a call that is allowed can never push the meter past
the limit. A call that would not fit is not made: the method returns None and `exhausted` is set, and the strategy
returns the best it has (anytime behaviour).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import replace
from typing import Any, Sequence

from .base import Completion, ComputeBudget, Policy, Reward, SamplingParams, StopCheck, StrategyResult
from .params import DEFAULT_STEP_DELIMITER
from .steps import Node, split_steps
from .voting import Candidate, Choice, aggregate_scores, select, select_async


class BudgetedCalls:
    def __init__(self, policy: Policy, reward: Reward | None, budget: ComputeBudget, seed: int | None = None):
        # A reward that reads the samples themselves (confidence: their log-probabilities) sees every call made here.
        wrap = getattr(reward, "wrap_policy", None)
        self.policy = wrap(policy) if wrap is not None else policy
        self.reward = reward
        self.budget = budget
        self.exhausted = False
        self.generate_calls = 0
        self.score_calls = 0
        # Per Reward.score call: what it added to the meter, and the estimate it was allowed on (the learned PRM's:
        # a whole re-encode of every candidate). A tree search's reward FLOPs per round.
        self.score_flops: list[float] = []
        self.score_bounds: list[float] = []
        self.generated_tokens = 0
        self.samples = 0
        self._seed = seed

    def reward_estimate(self, question: str, candidates: Sequence[Sequence[str]]) -> float:
        return self.reward.estimate_flops(question, candidates) if self.reward is not None and candidates else 0.0

    def _params(self, params: SamplingParams) -> SamplingParams:
        # A request seed makes the whole search reproducible; each call gets its own derived seed so that a prompt
        # sampled again in a later call does not repeat its earlier samples.
        if self._seed is None:
            return params
        return replace(params, seed=(self._seed + 7919 * self.generate_calls) % (2**63))

    def generation_estimate(self, prompts: Sequence[str], params: SamplingParams, ns: Sequence[int]) -> float:
        groups: dict[int, list[str]] = defaultdict(list)
        for prompt, n in zip(prompts, ns, strict=True):
            if n > 0:
                groups[n].append(prompt)
        return sum(self.policy.estimate_flops(group, params, n) for n, group in groups.items())

    async def count_prompt_tokens(self, prompts: Sequence[str]) -> None:
        """Exact prompt tokens for the policy's estimates (before that they are a byte-level upper bound, which
        would size a sample count far too small)."""
        if prompts and hasattr(self.policy, "count_prompt_tokens"):
            await self.policy.count_prompt_tokens(list(prompts))

    def affordable(self, prompt: str, params: SamplingParams, n: int) -> int:
        """The largest count <= n of samples of `prompt` whose worst-case cost fits the budget (anytime N; the
        budget's one shrink rule). Await `count_prompt_tokens([prompt])` first, or the count is sized on the bound."""
        return self.budget.affordable(n, lambda k: self.policy.estimate_flops([prompt], params, k))

    def fits(self, flops: float) -> bool:
        if self.budget.allows(flops):
            return True
        self.exhausted = True
        return False

    async def generate(
        self, prompts: Sequence[str], params: SamplingParams, ns: Sequence[int] | int = 1, reserve: float = 0.0
    ) -> list[list[Completion]] | None:
        """`ns[i]` continuations of `prompts[i]` (one engine call when possible), or None if it would not fit.

        `reserve`: FLOPs that must remain afterwards (e.g. scoring the results), so generation is not wasted.
        """
        counts = [ns] * len(prompts) if isinstance(ns, int) else list(ns)
        # Exact prompt tokens first, so the worst case below is a true upper bound whatever the text.
        await self.count_prompt_tokens([p for p, n in zip(prompts, counts) if n > 0])
        if not prompts or not self.fits(self.generation_estimate(prompts, params, counts) + reserve):
            return None
        params = self._params(params)
        self.generate_calls += 1
        if len(set(counts)) == 1:
            out = await self.policy.generate(prompts, params, counts[0])
        elif hasattr(self.policy, "generate_multi"):
            out = await self.policy.generate_multi(prompts, params, counts)
        else:
            out = await self._grouped(prompts, params, counts)
        for completions in out:
            self._count(completions)
        return out

    def _count(self, completions: Sequence[Completion]) -> None:
        self.samples += len(completions)
        self.generated_tokens += sum(c.spent_tokens for c in completions)

    def separate_estimate(self, prompt: str, params: SamplingParams, n: int) -> float:
        """Worst case of n samples sent as n requests: each may prefill the prompt again (one n=N request
        prefills it once, which is all `estimate_flops(..., n)` counts)."""
        return n * self.policy.estimate_flops([prompt], params, 1)

    def affordable_separate(self, prompt: str, params: SamplingParams, n: int) -> int:
        """`affordable` for samples sent as separate requests (generate_stoppable)."""
        while n > 0 and not self.budget.allows(self.separate_estimate(prompt, params, n)):
            n -= 1
        return n

    @property
    def can_stop(self) -> bool:
        """Whether the policy can abort single samples (the optional Policy.generate_stoppable)."""
        return hasattr(self.policy, "generate_stoppable")

    async def generate_stoppable(self, prompt: str, params: SamplingParams, n: int, should_stop: StopCheck,
                                 first_sample: int | None = None) -> list[Completion] | None:
        """`n` individually stoppable samples of `prompt`, or None if their worst case (all n run to max_tokens, as
        if none were stopped) does not fit. The meter settles with what they really generated.

        `first_sample`: with a request seed, sample i gets the seed of sample `first_sample + i` of the request's
        first call (vLLM seeds the children of an n>1 request seed + i), so these samples continue that call's draws
        instead of starting from a derived seed."""
        await self.count_prompt_tokens([prompt])
        if n <= 0 or not self.fits(self.separate_estimate(prompt, params, n)):
            return None
        if self._seed is not None and first_sample is not None:
            params = replace(params, seed=(self._seed + first_sample) % (2**63))
        else:
            params = self._params(params)
        self.generate_calls += 1
        out = await self.policy.generate_stoppable(prompt, params, n, should_stop)
        self._count(out)
        return out

    async def _grouped(self, prompts: Sequence[str], params: SamplingParams, ns: list[int]) -> list[list[Completion]]:
        """Fallback without generate_multi: one concurrent `generate` call per distinct n."""
        groups: dict[int, list[int]] = defaultdict(list)
        for i, n in enumerate(ns):
            groups[n].append(i)
        results = await asyncio.gather(*(self.policy.generate([prompts[i] for i in idx], params, n)
                                         for n, idx in groups.items() if n > 0))
        out: list[list[Completion]] = [[] for _ in prompts]
        for idx, result in zip((idx for n, idx in groups.items() if n > 0), results):
            for i, completions in zip(idx, result):
                out[i] = completions
        return out

    async def score(self, question: str, candidates: Sequence[Sequence[str]]) -> list[list[float]] | None:
        """Step scores for each candidate in one Reward.score call, or None without a reward or budget."""
        if self.reward is None or not candidates:
            return None
        bound = self.reward.estimate_flops(question, candidates)
        if not self.fits(bound):
            return None
        self.score_calls += 1
        spent = self.budget.spent
        scores = await self.reward.score(question, candidates)
        self.score_flops.append(self.budget.spent - spent)
        self.score_bounds.append(bound)
        # Scores are probabilities; clamping keeps a misbehaving reward from breaking weighted votes.
        return [[min(1.0, max(0.0, float(s))) for s in row] for row in scores]


async def score_candidates(calls: BudgetedCalls, question: str, candidates: Sequence[Candidate], selection: str,
                           aggregation: str, delimiter: str = DEFAULT_STEP_DELIMITER) -> str:
    """Scores whole-answer candidates for a verifier vote (one Reward.score call) and returns the selection that
    can run: the asked one, or "majority" when it needs no scores or the budget does not allow scoring them."""
    if selection == "majority" or not candidates:
        return selection
    rows = await calls.score(question, [split_steps(c.text, delimiter) for c in candidates])
    if rows is None:
        return "majority"
    for candidate, row in zip(candidates, rows, strict=True):
        candidate.score = aggregate_scores(row, aggregation)  # type: ignore[arg-type]
    return selection


def empty_result(calls: BudgetedCalls, reason: str = "the budget does not allow a single generation") -> StrategyResult:
    """Nothing could be generated within the budget: an empty, budget-exhausted answer (caller picks the status)."""
    return StrategyResult(text="", finish_reason="length", budget_exhausted=True, samples=calls.samples,
                          completion_tokens=calls.generated_tokens, details={"reason": reason})


def build_result(calls: BudgetedCalls, choice: Choice, selection: str, delimiter: str, candidates: int,
                 **details: Any) -> StrategyResult:
    chosen = choice.candidate
    return StrategyResult(
        text=chosen.text,
        finish_reason=chosen.finish_reason,
        answer=chosen.answer,
        score=choice.score,
        samples=calls.samples,
        steps=len(split_steps(chosen.text, delimiter)),
        completion_tokens=calls.generated_tokens,
        budget_exhausted=calls.exhausted,
        details={
            "selection": selection,
            "vote_share": choice.vote_share,
            "candidate_score": chosen.score,
            "candidates": candidates,
            "tally": choice.tally[:8],
            "generate_calls": calls.generate_calls,
            "score_calls": calls.score_calls,
            "score_flops": [float(f"{f:.4g}") for f in calls.score_flops],
            "score_bound_flops": [float(f"{f:.4g}") for f in calls.score_bounds],
            **details,
        },
    )


async def score_nodes(calls: BudgetedCalls, question: str, nodes: Sequence[Node], delimiter: str, aggregation: str,
                      texts: Sequence[str] | None = None) -> bool:
    """Score `nodes` in one Reward.score call (on `texts` instead when given: lookahead rollouts).

    Returns False when the budget did not allow it; the nodes then keep the score they inherited from their parent.
    """
    if not nodes:
        return True
    scored = texts if texts is not None else [node.text for node in nodes]
    rows = await calls.score(question, [split_steps(text, delimiter) for text in scored])
    if rows is None:
        return False
    for node, row in zip(nodes, rows, strict=True):
        node.step_scores = row
        node.score = aggregate_scores(row, aggregation)  # type: ignore[arg-type]
    return True


def inherit_scores(families: Sequence[Sequence[Node]], parents: Sequence[Node]) -> None:
    for parent, children in zip(parents, families):
        for child in children:
            child.score = parent.score if parent.score is not None else 0.0


async def tree_result(calls: BudgetedCalls, finished: Sequence[Node], open_nodes: Sequence[Node], selection: str,
                delimiter: str, **details: Any) -> StrategyResult:
    """Vote over finished solutions; with none (budget ran out), the best-scored open partial solution."""
    if finished:
        candidates = [Candidate.of(n.text, n.score or 0.0, n.finish_reason, n.tokens) for n in finished]
        return build_result(calls, await select_async(candidates, selection), selection, delimiter, len(candidates), **details)
    if not open_nodes:
        return empty_result(calls)
    best = max(open_nodes, key=lambda n: n.score or 0.0)
    partial = Candidate.of(best.text, best.score or 0.0, "length", best.tokens)
    result = build_result(calls, select([partial], "best"), selection, delimiter, 0, partial=True, **details)
    result.budget_exhausted = True
    return result


def start_sampling(params: Any, problem: Any, policy: Policy, reward: Reward | None, budget: ComputeBudget,
                   requires_reward: bool) -> tuple[BudgetedCalls, SamplingParams]:
    """Set-up shared by the strategies that sample whole answers (best-of-N, revisions): the reward check, the
    budgeted call wrapper and the sampling parameters."""
    from .params import StrategyParamError, sampling_temperature

    if requires_reward and reward is None:
        raise StrategyParamError("selection", f"{params.selection!r} needs a reward model; use 'majority'")
    calls = BudgetedCalls(policy, reward, budget, problem.seed)
    temperature = sampling_temperature(params, problem.temperature)
    sampling = SamplingParams(max_tokens=problem.max_tokens, temperature=temperature, top_p=problem.top_p,
                              stop=problem.stop)
    return calls, sampling
