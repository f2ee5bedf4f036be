"""Best-of-N: N independent samples from one batched call, then majority, best or weighted selection.

Anytime: if N samples do not fit the budget, N shrinks to the largest count that does (the result says
budget_exhausted). If not even one fits, nothing is generated and the result is empty with budget_exhausted=True:
the budget is a hard limit, so there is no "one greedy sample anyway". If the samples fit but scoring them does not,
the vote falls back to majority (details["selection_used"]).

Early stopping (`stopping`, `hopeless_k`): samples come in rounds of `round_size`, each round budget-checked like
the single call, and the rule of strategies/stopping.py is applied after every sample in draw order (exactly as the
bank replay applies it); sampling stops at the end of the round in which it fires. details["early_stopping"] says
how many rounds and samples it took and why it stopped: settled, hopeless, n (all N drawn) or budget.

Prior samples (`run(..., prior=Prior(...))`: `auto`'s probe samples, already paid for and maybe scored) count towards
N: only the missing ones are drawn and scored, and the vote runs over all of them.

`selection: confidence` is DeepConf's offline mode (Fu et al. 2025): the samples come back with their top-k token
log-probabilities (same engine call, no verifier, zero reward FLOPs), each gets a trace confidence, the eta % most
confident are kept and vote weighted by confidence. The online mode's stopping threshold (the first `warmup` samples'
lowest group confidences at the (100 - eta)th percentile) is always computed. Without `online`, it is only reported
with the tokens it would have saved (details["online"], aborted False): one n=N request cannot abort single
sequences. With `online` (and a policy that has the optional `generate_stoppable`), the warm-up is one batched call
and every later sample is its own streamed request, aborted in the engine at the first token where its running
group confidence falls below the threshold; the warm-up samples and the samples that ran to the end vote, weighted by
confidence (aborted ones do not), and each sample is metered for what it generated. A seeded request gives sample k
the seed vLLM gives child k of the one n=N call (distinct, reproducible; vLLM-CPU's samples also depend on the batch
they run in, so the online and report-only modes do not draw identical traces: measured, README). With
`consensus` < 1, sampling is adaptive (DeepConf's other online saving): batches of `warmup` samples until the
confidence-weighted vote is settled, so easy questions stop after a batch or two and pay only for what was drawn
(with `online`, the batches after the first are stoppable too).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Sequence

from .confidence import (OnlineStop, consensus, first_stop, token_confidence, token_confidences, trace_confidence,
                         warmup_threshold)

from .base import Completion, ComputeBudget, Policy, Problem, ProgressCallback, Reward, SamplingParams, StrategyResult
from .calls import BudgetedCalls, build_result, empty_result, score_candidates, start_sampling
from .steps import split_steps
from .params import DEFAULT_STEP_DELIMITER, BestOfNParams
from .stopping import StoppingRule, leader_probability, rule_of, stop_reason
from .voting import (Candidate, aggregate_scores, extract_answer, group_by_answer, group_by_answer_async,
                     json_answer, json_equal, select_async)


@dataclass
class Prior:
    """Samples drawn before this best-of-N ran, and their step scores (None: not scored)."""

    samples: Sequence[Completion]
    scores: Sequence[Sequence[float]] | None = None


class BestOfN:
    name = "best_of_n"

    def __init__(self, params: BestOfNParams):
        self.params = params

    @property
    def requires_reward(self) -> bool:
        return self.params.selection not in ("majority", "confidence")

    async def run(self, problem: Problem, policy: Policy, reward: Reward | None, budget: ComputeBudget,
                  progress: ProgressCallback | None = None, prior: Prior | None = None) -> StrategyResult:
        p = self.params
        if prior is not None and p.selection == "confidence":
            raise ValueError("prior samples carry no token log-probabilities: not with selection 'confidence'")
        if prior is not None and problem.seed is not None:
            # The prior samples were drawn with this seed's first derived seed: new ones must not repeat them.
            problem = replace(problem, seed=problem.seed + 1)
        calls, sampling = start_sampling(p, problem, policy, reward, budget, self.requires_reward)
        extract = json_answer if problem.structured else extract_answer
        await calls.count_prompt_tokens([problem.prompt])
        old = self._prior_candidates(prior, extract)
        rule = rule_of(p)
        if rule is not None:
            return await self._rounds(calls, problem, sampling, rule, prior, old, extract)
        if p.selection == "confidence":
            sampling = replace(sampling, top_logprobs=max(sampling.top_logprobs, p.top_logprobs))
        n = calls.affordable(problem.prompt, sampling, max(0, p.n - len(old)))
        if n == 0 and not old:
            return empty_result(calls)
        calls.exhausted = len(old) + n < p.n
        adaptive = online = None
        if p.selection == "confidence" and p.consensus < 1.0:
            samples, adaptive, online = await self._adaptive(calls, problem, sampling, n)
            out = [samples] if samples else None
        elif p.online and calls.can_stop and n > p.warmup:
            samples, online = await self._stoppable(calls, problem, sampling, n)
            out = [samples] if samples else None
        else:
            out = await calls.generate([problem.prompt], sampling, n) if n else [[]]
        if out is None:  # the meter moved between the check and the call (another request's worker time)
            if not old:
                return empty_result(calls)
            out = [[]]  # the prior samples still vote
        new = [Candidate.of(c.text, 1.0, c.finish_reason, c.token_count, extract) for c in out[0]]
        if p.selection == "confidence":
            return await self._confidence_vote(calls, out[0], new, n, adaptive, online)
        selection = await score_candidates(calls, problem.question, new, p.selection, p.aggregation)
        if prior is not None and prior.scores is None:
            selection = "majority"
        details = {}
        if p.top_up and out[0] and len(old) + len(new) < p.n:
            rounds = await self._top_up(calls, problem, sampling, new, p.n - len(old), selection, extract)
            details["top_up"] = {"rounds": len(rounds), "samples": [len(out[0])] + rounds}
            calls.exhausted = len(old) + len(new) < p.n
        return await self._vote(calls, problem, old + new, selection, prior, **details)

    async def _top_up(self, calls: BudgetedCalls, problem: Problem, sampling: SamplingParams, candidates: list[Candidate],
                      want: int, selection: str, extract) -> list[int]:
        """Draw again while the budget pays for more of the N samples. The first call was sized on the worst case
        (every sample running to max_tokens); once it has been metered for what it really cost, the rest of the
        budget usually pays for more. Each round keeps the scoring of its own samples reserved (at the costliest
        scoring seen so far per sample), so what it draws can vote the same way; a round whose scoring still does not
        fit is left out of the vote. Extends `candidates` in place; returns the sizes of the extra rounds."""
        p = self.params
        scored = selection != "majority"
        per_sample = max((calls.reward_estimate(problem.question, [split_steps(c.text, DEFAULT_STEP_DELIMITER)])
                          for c in candidates), default=0.0) if scored else 0.0
        rng, rounds = random.Random(), []
        while len(candidates) < want:
            size = calls.budget.affordable(
                want - len(candidates),
                lambda k: calls.policy.estimate_flops([problem.prompt], sampling, k) + k * per_sample)
            if size == 0:
                break
            # Fresh seeds per round (a seeded request gets a derived seed per call in BudgetedCalls): the gateway's
            # sample reuse would otherwise hand this round the samples the first call already voted with.
            params = sampling if problem.seed is not None else replace(sampling, seed=rng.randrange(2**31))
            out = await calls.generate([problem.prompt], params, size, reserve=size * per_sample)
            if out is None or not out[0]:
                break
            batch = [Candidate.of(c.text, 1.0, c.finish_reason, c.token_count, extract) for c in out[0]]
            if scored:
                if await score_candidates(calls, problem.question, batch, selection, p.aggregation) == "majority":
                    break
                per_sample = max([per_sample] + [calls.reward_estimate(
                    problem.question, [split_steps(c.text, DEFAULT_STEP_DELIMITER)]) for c in batch])
            candidates += batch
            rounds.append(len(batch))
        return rounds

    def _prior_candidates(self, prior: Prior | None, extract) -> list[Candidate]:
        if prior is None:
            return []
        out = [Candidate.of(c.text, 1.0, c.finish_reason, c.token_count, extract) for c in prior.samples]
        if prior.scores is not None and self.params.selection != "majority":
            for candidate, row in zip(out, prior.scores, strict=True):
                candidate.score = aggregate_scores(row, self.params.aggregation)
        return out

    async def _vote(self, calls: BudgetedCalls, problem: Problem, candidates: list[Candidate], selection: str,
                    prior: Prior | None, **details) -> StrategyResult:
        choice = await select_async(candidates, selection, json_equal if problem.structured else None)
        if prior is not None:
            details["prior_samples"] = len(prior.samples)
        return build_result(calls, choice, self.params.selection, DEFAULT_STEP_DELIMITER, len(candidates),
                            selection_used=selection, n_used=len(candidates), **details)

    async def _rounds(self, calls: BudgetedCalls, problem: Problem, sampling: SamplingParams, rule: StoppingRule,
                      prior: Prior | None, old: list[Candidate], extract) -> StrategyResult:
        """Sampling in rounds until the stopping rule fires, N samples are drawn or the budget is spent."""
        p = self.params
        candidates, scored = list(old), len(old)
        selection = "majority" if prior is not None and prior.scores is None else p.selection
        if selection == "majority":
            rule = replace(rule, hopeless_k=None)  # "every verifier score is low" cannot be judged without scores
        checked, rounds, why, at = 0, 0, None, None
        groups: list[int | None] = []
        rng = random.Random()
        while True:
            groups = await self._answer_groups(candidates, problem.structured)
            scores = [c.score for c in candidates] if selection != "majority" else []
            for m in range(checked + 1, len(candidates) + 1):
                why = stop_reason(groups[:m], scores[:m], rule)
                if why:
                    at = m
                    break
            checked = len(candidates)
            if why:
                break
            if len(candidates) >= p.n:
                why = "n"
                break
            size = calls.affordable(problem.prompt, sampling, min(p.round_size, p.n - len(candidates)))
            # Unseeded rounds get fresh seeds (a seeded request gets a derived seed per call in BudgetedCalls), or
            # the gateway's sample reuse would hand every round the same pooled samples; the first round may reuse.
            params = sampling if problem.seed is not None or (rounds == 0 and not old) else \
                replace(sampling, seed=rng.randrange(2**31))
            out = await calls.generate([problem.prompt], params, size) if size else None
            if out is None:
                calls.exhausted, why = True, "budget"
                break
            rounds += 1
            new = [Candidate.of(c.text, 1.0, c.finish_reason, c.token_count, extract) for c in out[0]]
            candidates += new
            if selection != "majority":
                if await score_candidates(calls, problem.question, new, selection, p.aggregation) == "majority":
                    why = "budget"  # a vote on verifier scores leaves this round's unscored samples out
                    break
                scored = len(candidates)
        if not candidates:
            return empty_result(calls)
        voters = candidates
        if selection != "majority" and scored < len(candidates):
            voters, selection = (candidates[:scored], selection) if scored else (candidates, "majority")
        if len(groups) < len(voters):  # the last round's samples were never grouped (its scoring did not fit)
            groups = await self._answer_groups(voters, problem.structured)
        info = {"rule": rule.name, "rounds": rounds, "samples": len(candidates) - len(old), "stopped": why,
                "at_sample": at, "leader_probability": round(leader_probability(groups[:len(voters)], rule), 4)}
        return await self._vote(calls, problem, voters, selection, prior, early_stopping=info)

    @staticmethod
    async def _answer_groups(candidates: list[Candidate], structured: bool) -> list[int | None]:
        """Each candidate's answer group (first-occurrence order, None without an answer): the canonical answers
        the rule counts, under the same equivalence as the vote. A prefix's groups do not depend on later ones."""
        index: list[int | None] = [None] * len(candidates)
        for g, members in enumerate(await group_by_answer_async(candidates, json_equal if structured else None)):
            for i in members:
                index[i] = g
        return index

    async def _adaptive(self, calls, problem: Problem, sampling, n: int) -> tuple[list[Completion], dict, dict | None]:
        """DeepConf's adaptive sampling: batches of `warmup` samples until the confidence-weighted vote is settled
        (the leading answer's share >= `consensus`) or n samples are drawn. After the warm-up batch, only samples
        whose lowest group confidence reaches the warm-up threshold vote (the ones online stopping would keep); with
        `online`, those batches are stoppable and the others are aborted in the engine."""
        p = self.params
        samples: list[Completion] = []
        threshold, share = None, 0.0
        stoppable = p.online and calls.can_stop
        rng = random.Random()
        while len(samples) < n:
            # Every batch must be new samples. A seeded request gets a derived seed per call (BudgetedCalls); an
            # unseeded one gets a fresh seed here, which also keeps the gateway's sample reuse (same prompt and
            # parameters -> the same pooled samples) from handing every batch the same ones.
            params = sampling if problem.seed is not None else replace(sampling, seed=rng.randrange(2**31))
            size = min(p.warmup, n - len(samples))
            if stoppable and threshold is not None:
                fitting = calls.affordable_separate(problem.prompt, params, size)
                calls.exhausted = calls.exhausted or fitting < size
                batch = await calls.generate_stoppable(problem.prompt, params, fitting,
                                                       self._stop_check(threshold)) if fitting else None
            else:
                out = await calls.generate([problem.prompt], params, size)
                batch = out[0] if out is not None else None
            if batch is None:
                break
            samples += batch
            lowest = [trace_confidence(token_confidences(c), "lowest_group", p.confidence_window) for c in samples]
            if threshold is None:
                threshold = warmup_threshold(lowest, p.eta) if lowest else 0.0
            # Stoppable: the samples that were not stopped (as in the final vote); else the ones that would not be.
            voters = [Candidate.of(c.text, conf) for k, (c, conf) in enumerate(zip(samples, lowest))
                      if k < p.warmup or (c.finish_reason != "abort" if stoppable else conf >= threshold)]
            weights = {str(g[0]): sum(voters[i].score for i in g) for g in group_by_answer(voters)}
            share = consensus(weights) if weights else 0.0
            if share >= p.consensus:
                break
        online = self._online_report(samples, threshold, sampling.max_tokens) if stoppable and samples else None
        return samples, {"samples": len(samples), "consensus": round(share, 4), "settled": share >= p.consensus,
                         "batches": calls.generate_calls}, online

    def _stop_check(self, threshold: float):
        """should_stop for Policy.generate_stoppable: one running window per sample."""
        window = self.params.confidence_window
        monitors: dict[int, OnlineStop] = {}

        def should_stop(i: int, top) -> bool:
            monitor = monitors.get(i)
            if monitor is None:
                monitor = monitors[i] = OnlineStop(window, threshold)
            return monitor.push(token_confidence(top))

        return should_stop

    async def _stoppable(self, calls, problem: Problem, sampling, n: int) -> tuple[list[Completion], dict | None]:
        """DeepConf online: the warm-up batch sets the threshold, the other n - warmup samples are stoppable."""
        p = self.params
        out = await calls.generate([problem.prompt], sampling, p.warmup)
        if out is None:
            return [], None
        warm = out[0]
        lowest = [trace_confidence(token_confidences(c), "lowest_group", p.confidence_window) for c in warm]
        lowest = [x for x, c in zip(lowest, warm) if c.top_logprobs]
        if not lowest:  # no log-probabilities came back: nothing to stop on, the rest is drawn as usual
            more = await calls.generate([problem.prompt], sampling, n - len(warm))
            return warm + (more[0] if more is not None else []), None
        threshold = warmup_threshold(lowest, p.eta)
        # Separate requests may each prefill the prompt: fewer of them may fit than the batched estimate said.
        size = calls.affordable_separate(problem.prompt, sampling, n - len(warm))
        calls.exhausted = calls.exhausted or size < n - len(warm)
        # Seeded: sample k gets the seed it has in the one n=N call of the report-only mode.
        rest = await calls.generate_stoppable(problem.prompt, sampling, size, self._stop_check(threshold),
                                              first_sample=len(warm)) if size else []
        samples = warm + (rest or [])
        return samples, self._online_report(samples, threshold, sampling.max_tokens)

    def _online_report(self, samples: list[Completion], threshold: float | None, max_tokens: int) -> dict:
        aborted = [c for c in samples if c.finish_reason == "abort"]
        generated = sum(c.spent_tokens for c in samples)
        return {"warmup": min(self.params.warmup, len(samples)),
                "threshold": round(threshold, 4) if threshold is not None else None, "aborted": True,
                "samples_aborted": len(aborted), "aborted_at": [c.token_count for c in aborted[:16]],
                "tokens_generated": generated,
                # An aborted sample would have run on for an unknown number of tokens: at most to max_tokens.
                "tokens_without_abort_at_most": generated + sum(max(0, max_tokens - c.spent_tokens) for c in aborted)}

    async def _confidence_vote(self, calls, samples: list[Completion], candidates: list[Candidate],
                               n: int, adaptive: dict | None = None, online: dict | None = None) -> StrategyResult:
        p = self.params
        traces = [token_confidences(c) for c in samples]
        for candidate, conf in zip(candidates, traces):
            candidate.score = trace_confidence(conf, p.confidence_metric, p.confidence_window, p.confidence_tail)
        if online is not None:
            # DeepConf online: the threshold already filtered; the samples it did not stop vote (all warm-up ones).
            kept = [c for c, s in zip(candidates, samples) if s.finish_reason != "abort"]
        else:
            keep = max(1, math.ceil(p.eta / 100.0 * len(candidates)))
            # Stable: among equal confidences the earlier sample is kept.
            kept = sorted(candidates, key=lambda c: -c.score)[:keep]
            online = self._online(traces, samples)
            if p.online:
                online["reason"] = ("the policy cannot abort single samples" if not calls.can_stop else
                                    "nothing to stop: no sample after the warm-up or no log-probabilities")
        choice = await select_async(kept, "weighted")
        return build_result(calls, choice, p.selection, DEFAULT_STEP_DELIMITER, len(kept), selection_used="confidence",
                            n_used=n, confidences=[round(c.score, 4) for c in candidates[:16]],
                            online=online, **({"adaptive": adaptive} if adaptive else {}))

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
