"""Particle filtering over partial solutions (Puri et al. 2025, arXiv 2502.01618; its_hub's particle filtering).

N particles start from the empty answer. Each round every live particle is extended by one step (ONE batched
generate call), the new steps are scored by the verifier (ONE score call), and each live particle gets the weight
    w_i = softmax(logit(score_i) / weight_temperature)
(the verifier's score read as a probability, turned back into its logit: a PRM's 0.99 and 0.999 are far apart, which
a softmax over raw scores in [0, 1] would flatten). The live particles are then resampled in proportion to the
weights, multinomially or systematically (`resampling`); with `ess_threshold` < 1 only when the effective sample size
1 / sum(w^2) falls below that share of them. Particles that finished this round (EOS, a client stop, the final-answer
phrase, out of tokens) leave the population and keep their verifier score as their weight in the final vote, so the
population shrinks by one per finished particle and exactly N answers finish unless the budget or `max_rounds`
intervenes (the last round generates to the end of the answer, as in REBASE). The answer is chosen by `selection`
(default weighted vote) over the finished particles.

Resampled duplicates are one prompt with n = copies (`generate_multi`): the worker prefills the shared prefix once,
and the PRM's step-score cache never rescores a prefix it has seen (identical candidates in a round are sent once).

Anytime and streaming as in the other tree searches: each engine call is budget-checked first (worst case: every
sample runs to its token limit), and when the next round does not fit the search stops and votes over the finished
particles (or returns the best open partial solution, budget_exhausted=True); `progress` receives whole steps shared
by every live particle and every finished one.
"""

from __future__ import annotations

import bisect
import math
import random
from typing import Sequence

from .base import ComputeBudget, Policy, Problem, ProgressCallback, Reward, StrategyResult
from .calls import BudgetedCalls, inherit_scores, score_nodes, tree_result
from .params import ParticleFilteringParams, StrategyParamError, sampling_temperature
from .steps import Node, PrefixStreamer, expand, split_steps, step_params

# Scores of exactly 0 or 1 would have infinite logits; clamping keeps one verdict from taking every particle.
_EPS = 1e-4


def logit(score: float) -> float:
    s = min(1.0 - _EPS, max(_EPS, float(score)))
    return math.log(s / (1.0 - s))


def particle_weights(scores: Sequence[float], temperature: float) -> list[float]:
    """softmax(logit(score) / temperature), summing to 1."""
    if not scores:
        return []
    z = [logit(s) / temperature for s in scores]
    top = max(z)
    e = [math.exp(v - top) for v in z]
    total = sum(e)
    return [v / total for v in e]


def effective_sample_size(weights: Sequence[float]) -> float:
    total = sum(weights)
    return total * total / sum(w * w for w in weights) if total > 0 else 0.0


def resample(weights: Sequence[float], count: int, method: str, rng: random.Random) -> list[int]:
    """Copies of each particle, summing to `count`, drawn in proportion to `weights`.

    multinomial: `count` independent draws. systematic: one uniform offset and `count` evenly spaced points on the
    cumulative weights (lower variance: a particle of weight w gets floor(count * w) or that plus one copies).
    """
    copies = [0] * len(weights)
    if count <= 0 or not weights:
        return copies
    total = sum(weights)
    cumulative, acc = [], 0.0
    for w in weights:
        acc += w / total
        cumulative.append(acc)
    cumulative[-1] = 1.0  # float error must not let a draw fall past the last particle
    if method == "systematic":
        u = rng.random()
        points = [(u + i) / count for i in range(count)]
    elif method == "multinomial":
        points = [rng.random() for _ in range(count)]
    else:
        raise ValueError(f"unknown resampling {method!r}")
    for x in points:
        copies[min(len(weights) - 1, bisect.bisect_right(cumulative, x))] += 1
    return copies


def group_copies(particles: Sequence[Node], copies: Sequence[int]) -> tuple[list[Node], list[int]]:
    """One entry per distinct text with the total copies: identical prompts go out once with n = copies."""
    index: dict[str, int] = {}
    frontier: list[Node] = []
    widths: list[int] = []
    for node, k in zip(particles, copies):
        if k <= 0:
            continue
        if node.text in index:
            widths[index[node.text]] += k
        else:
            index[node.text] = len(frontier)
            frontier.append(node)
            widths.append(k)
    return frontier, widths


class ParticleFiltering:
    name = "particle_filtering"
    requires_reward = True

    def __init__(self, params: ParticleFilteringParams):
        self.params = params

    async def run(self, problem: Problem, policy: Policy, reward: Reward | None, budget: ComputeBudget,
                  progress: ProgressCallback | None = None) -> StrategyResult:
        p = self.params
        if reward is None:
            raise StrategyParamError("strategy", "particle_filtering needs a reward model to weight particles")
        calls = BudgetedCalls(policy, reward, budget, problem.seed)
        # A request seed makes resampling reproducible too.
        rng = random.Random(problem.seed) if problem.seed is not None else random.Random()
        delimiter, temperature = p.step_delimiter, sampling_temperature(p, problem.temperature)
        streamer = PrefixStreamer(progress, delimiter)
        frontier, widths = [Node()], [p.n]
        open_nodes: list[Node] = []
        finished: list[Node] = []
        ess_history: list[float] = []
        live_history: list[int] = []
        resampling_events = rounds = 0
        for round_index in range(p.max_rounds):
            last = round_index == p.max_rounds - 1
            params = step_params(frontier, problem, temperature, delimiter, last)
            reserve = calls.reward_estimate(problem.question, [split_steps(f.text, delimiter) or [""]
                                                               for f, w in zip(frontier, widths) for _ in range(w)])
            outputs = await calls.generate([problem.prompt + f.text for f in frontier], params, widths, reserve)
            if outputs is None:
                # Only the frontier was eligible when we last streamed; particles not resampled must not come back.
                open_nodes = frontier if round_index else []
                break
            rounds += 1
            families = expand(frontier, outputs, delimiter, problem, round_index, last)
            inherit_scores(families, frontier)
            children = [c for family in families for c in family]
            await score_nodes(calls, problem.question, children, delimiter, p.aggregation)
            finished += [c for c in children if c.finished]
            open_nodes = [c for c in children if not c.finished]
            if not open_nodes or calls.exhausted:
                break
            weights = particle_weights([n.score or 0.0 for n in open_nodes], p.weight_temperature)
            ess = effective_sample_size(weights)
            ess_history.append(round(ess, 3))
            live_history.append(len(open_nodes))
            if p.ess_threshold >= 1.0 or ess < p.ess_threshold * len(open_nodes):
                copies = resample(weights, len(open_nodes), p.resampling, rng)
                resampling_events += 1
            else:
                copies = [1] * len(open_nodes)
            frontier, widths = group_copies(open_nodes, copies)
            await streamer.update([f.text for f in frontier] + [f.text for f in finished])
        return await tree_result(calls, finished, open_nodes, p.selection, delimiter, rounds=rounds,
                                 finished_count=len(finished), resampling_events=resampling_events,
                                 effective_sample_size=ess_history, live_particles=live_history,
                                 streamed=streamer.sent)
