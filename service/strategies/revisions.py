"""Sequential revisions (Snell et al. §6): n / L parallel chains of L attempts, each attempt revising the last ones.

Snell et al. fine-tune a revision model; here the base policy is asked to revise in-context. Final answer:
- weighted: within each chain, the best solution of the weighted-vote winner; then a weighted vote across chains;
- best: the best-scored attempt overall;
- majority: majority over all n answers.
Revisions often turn a right answer wrong (Snell: ~38%), which is why a selection step is needed; `details` reports
how many revisions changed the answer, and `count_correct_to_wrong` measures the harm offline against gold answers.

Anytime: the first attempts need the budget for all chains; each later revision round runs only if it fits, so
chains may end shorter (budget_exhausted=True). Streaming: nothing is fixed before the vote, so `progress` is unused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from .base import ComputeBudget, Policy, Problem, ProgressCallback, Reward, StrategyResult
from .calls import build_result, empty_result, score_candidates, start_sampling
from .params import DEFAULT_STEP_DELIMITER, RevisionsParams
from .voting import Candidate, answers_equivalent, select_async

# Snell et al. condition the revision model on the 4 most recent attempts.
MAX_ATTEMPTS_SHOWN = 4


def build_revision_prompt(
    prompt: str,
    attempts: Sequence[str],
    *,
    max_attempts: int = MAX_ATTEMPTS_SHOWN,
    header: str = "Here are my previous attempts at this problem. They may contain mistakes.",
    attempt_label: str = "Attempt {i}:",
    instruction: str = "Check every calculation, fix any mistake, and write a corrected solution that ends "
                       "with the final answer in the same format.",
    answer_label: str = "Corrected solution:",
) -> str:
    """A revision prompt: `prompt` (chat template applied, ending where the answer starts) + the recent attempts.

    The attempts and the instruction go at the start of the assistant's turn, so this works for any chat template
    without knowing its tokens; the model then continues after `answer_label`. Only the last `max_attempts` are shown.
    """
    shown = list(attempts)[-max_attempts:] if max_attempts > 0 else []
    first = len(attempts) - len(shown) + 1
    parts = [header]
    for i, attempt in enumerate(shown, start=first):
        parts.append(f"{attempt_label.format(i=i)}\n{attempt.strip()}")
    parts.append(instruction)
    return prompt + "\n\n".join(parts) + f"\n\n{answer_label}\n"


@dataclass(frozen=True)
class RevisionTransitions:
    """What revisions did to correctness (offline, against a gold answer)."""

    correct_to_wrong: int
    wrong_to_correct: int
    from_correct: int  # revisions whose previous attempt was correct
    revisions: int

    @property
    def correct_to_wrong_rate(self) -> float:
        return self.correct_to_wrong / self.from_correct if self.from_correct else 0.0


def count_correct_to_wrong(
    chains: Sequence[Sequence[str | None]],
    gold: str,
    equivalent: Callable[[str | None, str], bool] = answers_equivalent,
) -> RevisionTransitions:
    """Count revisions (consecutive attempts in a chain, given as extracted answers) that broke a correct answer."""
    c2w = w2c = from_correct = total = 0
    for chain in chains:
        verdicts = [equivalent(answer, gold) for answer in chain]
        for before, after in zip(verdicts, verdicts[1:]):
            total += 1
            from_correct += before
            c2w += before and not after
            w2c += after and not before
    return RevisionTransitions(c2w, w2c, from_correct, total)


class Revisions:
    name = "revisions"

    def __init__(self, params: RevisionsParams):
        self.params = params

    @property
    def requires_reward(self) -> bool:
        return self.params.selection != "majority"

    async def run(self, problem: Problem, policy: Policy, reward: Reward | None, budget: ComputeBudget,
                  progress: ProgressCallback | None = None) -> StrategyResult:
        p = self.params
        calls, sampling = start_sampling(p, problem, policy, reward, budget, self.requires_reward)
        n_chains = p.n // p.chain_length
        first = await calls.generate([problem.prompt], sampling, n_chains)
        if first is None:
            return empty_result(calls)
        chains = [[Candidate.of(c.text, 1.0, c.finish_reason, c.token_count)] for c in first[0]]
        for _ in range(p.chain_length - 1):
            prompts = [build_revision_prompt(problem.prompt, [a.text for a in chain]) for chain in chains]
            out = await calls.generate(prompts, sampling, 1)
            if out is None:
                break
            for chain, completions in zip(chains, out):
                c = completions[0]
                chain.append(Candidate.of(c.text, 1.0, c.finish_reason, c.token_count))

        attempts = [a for chain in chains for a in chain]
        selection = await score_candidates(calls, problem.question, attempts, p.selection, p.aggregation)
        if selection == "weighted":
            winners = [(await select_async(chain, "weighted")).candidate for chain in chains]
            choice = await select_async(winners, "weighted")
        else:
            choice = await select_async(attempts, selection)
        changes = sum(a.answer != b.answer and not answers_equivalent(a.answer, b.answer)
                      for chain in chains for a, b in zip(chain, chain[1:]))
        return build_result(
            calls, choice, p.selection, DEFAULT_STEP_DELIMITER, len(attempts),
            selection_used=selection,
            revisions=sum(len(chain) - 1 for chain in chains),
            answer_changes=changes,
            chains=[[a.answer for a in chain] for chain in chains],
        )
