"""Best-of-N: N independent samples from one batched call, then majority, best or weighted selection.

Anytime: if N samples do not fit the budget, N shrinks to the largest count that does (the result says
budget_exhausted). If not even one fits, nothing is generated and the result is empty with budget_exhausted=True:
the budget is a hard limit, so there is no "one greedy sample anyway". If the samples fit but scoring them does not,
the vote falls back to majority (details["selection_used"]).

`selection: confidence` is DeepConf's offline mode (Fu et al. 2025): the samples come back with their top-k token
log-probabilities (same engine call, no verifier, zero reward FLOPs), each gets a trace confidence, the eta % most
confident are kept and vote weighted by confidence. The online mode's stopping threshold (from the first `warmup`
samples) is computed and reported with the tokens it would have saved (details["online"]); the samples are not
actually cut short, because one n=N vLLM request cannot abort single sequences. With `consensus` < 1, sampling is
adaptive (DeepConf's other online saving): batches of `warmup` samples until the confidence-weighted vote is
settled, so easy questions stop after a batch or two and pay only for what was drawn.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace

from service.rewards.confidence import consensus, first_stop, token_confidences, trace_confidence, warmup_threshold

from .base import Completion, ComputeBudget, Policy, Problem, ProgressCallback, Reward, StrategyResult
from .calls import build_result, empty_result, start_sampling
from .params import DEFAULT_STEP_DELIMITER, BestOfNParams
from .steps import split_steps
from .voting import (Candidate, aggregate_scores, extract_answer, group_by_answer, json_answer, json_equal,
                     select_async)


class BestOfN:
    name = "best_of_n"

    def __init__(self, params: BestOfNParams):
        self.params = params

    @property
    def requires_reward(self) -> bool:
        return self.params.selection not in ("majority", "confidence")

    async def run(self, problem: Problem, policy: Policy, reward: Reward | None, budget: ComputeBudget,
                  progress: ProgressCallback | None = None) -> StrategyResult:
        p = self.params
        calls, sampling = start_sampling(p, problem, policy, reward, budget, self.requires_reward)
        if p.selection == "confidence":
            sampling = replace(sampling, top_logprobs=max(sampling.top_logprobs, p.top_logprobs))
        n = p.n
        while n > 0 and not budget.allows(policy.estimate_flops([problem.prompt], sampling, n)):
            n -= 1
        if n == 0:
            return empty_result(calls)
        calls.exhausted = n < p.n
        adaptive = None
        if p.selection == "confidence" and p.consensus < 1.0:
            samples, adaptive = await self._adaptive(calls, problem, sampling, n)
            out = [samples] if samples else None
        else:
            out = await calls.generate([problem.prompt], sampling, n)
        if out is None:  # the meter moved between the check and the call (another request's worker time)
            return empty_result(calls)
        extract = json_answer if problem.structured else extract_answer
        candidates = [Candidate.of(c.text, 1.0, c.finish_reason, c.token_count, extract) for c in out[0]]
        if p.selection == "confidence":
            return await self._confidence_vote(calls, out[0], candidates, n, adaptive)

        selection = p.selection
        if selection != "majority":
            steps = [split_steps(c.text, DEFAULT_STEP_DELIMITER) for c in candidates]
            scores = await calls.score(problem.question, steps)
            if scores is None:
                selection = "majority"
            else:
                for candidate, row in zip(candidates, scores):
                    candidate.score = aggregate_scores(row, p.aggregation)
        choice = await select_async(candidates, selection, json_equal if problem.structured else None)
        return build_result(calls, choice, p.selection, DEFAULT_STEP_DELIMITER, len(candidates),
                            selection_used=selection, n_used=n)

    async def _adaptive(self, calls, problem: Problem, sampling, n: int) -> tuple[list[Completion], dict]:
        """DeepConf's adaptive sampling: batches of `warmup` samples until the confidence-weighted vote is settled
        (the leading answer's share >= `consensus`) or n samples are drawn. After the warm-up batch, only samples
        whose lowest group confidence reaches the warm-up threshold vote (the ones online stopping would keep)."""
        p = self.params
        samples: list[Completion] = []
        threshold, share = None, 0.0
        rng = random.Random()
        while len(samples) < n:
            # Every batch must be new samples. A seeded request gets a derived seed per call (BudgetedCalls); an
            # unseeded one gets a fresh seed here, which also keeps the gateway's sample reuse (same prompt and
            # parameters -> the same pooled samples) from handing every batch the same ones.
            params = sampling if problem.seed is not None else replace(sampling, seed=rng.randrange(2**31))
            out = await calls.generate([problem.prompt], params, min(p.warmup, n - len(samples)))
            if out is None:
                break
            samples += out[0]
            lowest = [trace_confidence(token_confidences(c), "lowest_group", p.confidence_window) for c in samples]
            if threshold is None:
                threshold = warmup_threshold(lowest, p.eta) if lowest else 0.0
            voters = [Candidate.of(c.text, conf) for k, (c, conf) in enumerate(zip(samples, lowest))
                      if k < p.warmup or conf >= threshold]
            weights = {str(g[0]): sum(voters[i].score for i in g) for g in group_by_answer(voters)}
            share = consensus(weights) if weights else 0.0
            if share >= p.consensus:
                break
        return samples, {"samples": len(samples), "consensus": round(share, 4), "settled": share >= p.consensus,
                         "batches": calls.generate_calls}

    async def _confidence_vote(self, calls, samples: list[Completion], candidates: list[Candidate],
                               n: int, adaptive: dict | None = None) -> StrategyResult:
        p = self.params
        traces = [token_confidences(c) for c in samples]
        for candidate, conf in zip(candidates, traces):
            candidate.score = trace_confidence(conf, p.confidence_metric, p.confidence_window, p.confidence_tail)
        keep = max(1, math.ceil(p.eta / 100.0 * len(candidates)))
        # Stable: among equal confidences the earlier sample is kept.
        kept = sorted(candidates, key=lambda c: -c.score)[:keep]
        choice = await select_async(kept, "weighted")
        return build_result(calls, choice, p.selection, DEFAULT_STEP_DELIMITER, len(kept), selection_used="confidence",
                            n_used=n, confidences=[round(c.score, 4) for c in candidates[:16]],
                            online=self._online(traces, samples), **({"adaptive": adaptive} if adaptive else {}))

    def _online(self, traces: list[list[float]], samples: list[Completion]) -> dict:
        """What online early termination would have done with these samples: the warm-up threshold and the tokens
        the later samples would not have generated (their running lowest group confidence fell below it)."""
        p = self.params
        warm = [trace_confidence(t, "lowest_group", p.confidence_window) for t in traces[: p.warmup] if t]
        if not warm or len(traces) <= p.warmup:
            return {"warmup": len(warm), "threshold": None}
        threshold = warmup_threshold(warm, p.eta)
        stops = [first_stop(t, p.confidence_window, threshold) for t in traces[p.warmup:]]
        saved = sum(s.token_count - k for s, k in zip(samples[p.warmup:], stops) if k is not None)
        return {"warmup": len(warm), "threshold": round(threshold, 4), "would_stop": sum(k is not None for k in stops),
                "tokens_saved_if_aborted": saved, "aborted": False}
