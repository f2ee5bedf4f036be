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
from dataclasses import dataclass, field
from typing import Any, Sequence

from .base import Problem
from .calls import BudgetedCalls
from .params import ParticleFilteringParams
from .steps import Node
from .tree import Search, TreeSearch

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


@dataclass
class ParticleSearch(Search):
    rng: random.Random = field(default_factory=random.Random)
    ess_history: list[float] = field(default_factory=list)
    live_history: list[int] = field(default_factory=list)
    resampling_events: int = 0


class ParticleFiltering(TreeSearch):
    name = "particle_filtering"
    reward_use = "weight particles"
    params: ParticleFilteringParams

    def new_search(self, calls: BudgetedCalls, problem: Problem, delimiter: str, temperature: float) -> Search:
        # A request seed makes resampling reproducible too.
        rng = random.Random(problem.seed) if problem.seed is not None else random.Random()
        return ParticleSearch(calls, problem, delimiter, temperature, [Node()], [self.params.n], rng=rng)

    def collect(self, search: ParticleSearch, families: list[list[Node]], children: list[Node]) -> bool:
        search.finished += [c for c in children if c.finished]
        search.open_nodes = [c for c in children if not c.finished]
        return bool(search.open_nodes)

    def next_frontier(self, search: ParticleSearch) -> None:
        p, live = self.params, search.open_nodes
        weights = particle_weights([n.score or 0.0 for n in live], p.weight_temperature)
        ess = effective_sample_size(weights)
        search.ess_history.append(round(ess, 3))
        search.live_history.append(len(live))
        if p.ess_threshold >= 1.0 or ess < p.ess_threshold * len(live):
            copies = resample(weights, len(live), p.resampling, search.rng)
            search.resampling_events += 1
        else:
            copies = [1] * len(live)
        search.frontier, search.widths = group_copies(live, copies)

    def details(self, search: ParticleSearch) -> dict[str, Any]:
        return {"finished_count": len(search.finished), "resampling_events": search.resampling_events,
                "effective_sample_size": search.ess_history, "live_particles": search.live_history}
