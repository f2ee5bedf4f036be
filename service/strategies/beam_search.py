"""Beam search against a step verifier (Snell et al. §5, search-and-learn's variant).

Each round: the survivors are expanded to N children in ONE batched generate call (N / M survivors x M each; when
fewer survivors are left, N is spread over them so N beams stay live), optional lookahead rollouts run, and all new
children are scored in ONE Reward.score call. Finished children (EOS, a client stop, the final-answer phrase, or out
of tokens) are set aside; the best N / M open ones survive. The search stops when N solutions have finished (Snell's
done[:N]: later ones would never be looked at), nothing is open, or after `max_rounds` (the last round generates to
the end). The answer is chosen by `selection` (default weighted vote) over the first N finished solutions.

Lookahead k: from each open child, k more steps are rolled out at temperature 0 and the reward scores the END of the
rollout (search-and-learn scores the child's own text instead, which makes lookahead a no-op; not copied). Rollouts
only inform pruning; the child keeps its own text.

Anytime: every engine call is checked against the budget first. When the next expansion does not fit, the search
stops and votes over what has finished; with nothing finished, it returns the best open partial solution
(finish_reason "length", budget_exhausted=True). Rollouts or scoring that do not fit degrade to the child's own text
or the parent's score for that last round.

Streaming: after each round, `progress` receives the newly fixed whole steps shared by every candidate that can still
be chosen (all survivors and all finished solutions), so the final text always starts with what was streamed.
"""

from __future__ import annotations

from typing import Sequence

from .base import Problem
from .calls import BudgetedCalls, score_nodes
from .params import BeamSearchParams
from .steps import Node, first_finished, has_final_answer, step_params
from .tree import Search, TreeSearch


def spread(total: int, parts: int) -> list[int]:
    """`total` split over `parts` as evenly as possible, the remainder to the first (best) ones."""
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


class BeamSearch(TreeSearch):
    name = "beam_search"
    reward_use = "rank steps"
    params: BeamSearchParams

    async def score(self, search: Search, children: list[Node]) -> None:
        # Finished children are scored on their own text, open ones on their lookahead rollouts.
        done = [c for c in children if c.finished]
        open_nodes = [c for c in children if not c.finished]
        texts = [c.text for c in done] + await self._rollouts(search.calls, search.problem, open_nodes)
        await score_nodes(search.calls, search.problem.question, done + open_nodes, search.delimiter,
                          self.params.aggregation, texts)

    def collect(self, search: Search, families: list[list[Node]], children: list[Node]) -> bool:
        search.finished += [c for c in children if c.finished]
        search.open_nodes = [c for c in children if not c.finished]
        return len(search.finished) < self.params.n and bool(search.open_nodes)

    def next_frontier(self, search: Search) -> None:
        # Stable sort: among equal scores the earlier child survives (deterministic).
        p = self.params
        search.frontier = sorted(search.open_nodes, key=lambda n: -(n.score or 0.0))[: p.n // p.beam_width]
        search.widths = spread(p.n, len(search.frontier))

    def answers(self, search: Search) -> Sequence[Node]:
        return first_finished(search.finished, self.params.n)

    async def _rollouts(self, calls: BudgetedCalls, problem: Problem, nodes: list[Node]) -> list[str]:
        """Each node's text followed by up to `lookahead` greedy steps (batched per step across nodes)."""
        p = self.params
        texts = [n.text for n in nodes]
        if p.lookahead == 0 or not nodes:
            return texts
        tips = [Node(text=n.text, tokens=n.tokens) for n in nodes]
        active = [i for i, tip in enumerate(tips) if tip.tokens < problem.max_tokens]
        for _ in range(p.lookahead):
            if not active:
                break
            params = step_params([tips[i] for i in active], problem, 0.0, p.step_delimiter, last=False)
            outputs = await calls.generate([problem.prompt + tips[i].text for i in active], params, 1)
            if outputs is None:
                break  # the budget ends the rollouts here: score what has been rolled out
            still = []
            for i, completions in zip(active, outputs):
                tips[i] = tips[i].extend(completions[0], p.step_delimiter, problem.stop, problem.max_tokens, 0)
                if not tips[i].finished and not has_final_answer(completions[0].text):
                    still.append(i)
            active = still
        return [tip.text for tip in tips]

