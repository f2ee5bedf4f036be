import re

import pytest

from service.rewards import ArithmeticReward
from service.strategies import build_strategy
from service.strategies.base import Problem
from service.strategies.revisions import build_revision_prompt, count_correct_to_wrong
from tests.unit.fakes import BASE_PROMPT, FakePolicy, FakeReward, FlopMeter

PROBLEM = Problem(prompt=BASE_PROMPT, question="Q", max_tokens=40)


def test_revision_prompt_shows_at_most_the_four_latest_attempts():
    attempts = [f"attempt text {i}" for i in range(1, 7)]
    prompt = build_revision_prompt(BASE_PROMPT, attempts)
    assert prompt.startswith(BASE_PROMPT) and prompt.endswith("Corrected solution:\n")
    assert "attempt text 1\n" not in prompt and "attempt text 2\n" not in prompt
    assert all(f"Attempt {i}:\nattempt text {i}" in prompt for i in range(3, 7))
    custom = build_revision_prompt("P", ["x"], max_attempts=1, header="H", attempt_label="#{i}", instruction="I",
                                   answer_label="A:")
    assert custom == "PH\n\n#1\nx\n\nI\n\nA:\n"
    assert build_revision_prompt("P", attempts) == build_revision_prompt("P", attempts)  # pure


def test_count_correct_to_wrong():
    chains = [["7", "7", "8"], ["8", "7", None], ["0.5", "1/2"]]
    counts = count_correct_to_wrong(chains, "7")
    assert (counts.correct_to_wrong, counts.wrong_to_correct, counts.from_correct, counts.revisions) == (2, 1, 3, 5)
    assert counts.correct_to_wrong_rate == pytest.approx(2 / 3)
    assert count_correct_to_wrong(chains[2:], "\\frac{1}{2}").from_correct == 1


def _scripted(answers_by_attempt):
    """Attempt k of every chain answers answers_by_attempt[k] (k = number of attempts shown in the prompt)."""

    def continuation(prompt, rng, temperature):
        k = len(re.findall(r"^Attempt \d+:$", prompt, flags=re.MULTILINE))
        a, b, c, *said = answers_by_attempt[k]
        return f"{a} + {b} = {c}\nThe answer is {said[0] if said else c}."

    return continuation


async def test_chains_rounds_and_counts():
    meter = FlopMeter()
    # First attempt right, the revision breaks it, the next one repairs it.
    policy = FakePolicy(_scripted([(3, 4, 7), (3, 4, 8), (3, 4, 7)]), meter)
    result = await build_strategy("revisions", {"n": 6, "chain_length": 3, "selection": "majority"}).run(
        PROBLEM, policy, None, meter.budget(None))
    assert [c.ns for c in policy.calls] == [[2], [1, 1], [1, 1]]
    assert "7\nThe answer is 7." in policy.calls[1].prompts[0]
    assert result.details["revisions"] == 4 and result.details["answer_changes"] == 4
    assert result.details["chains"] == [["7", "8", "7"], ["7", "8", "7"]]
    assert result.answer == "7" and result.score == pytest.approx(4 / 6)
    assert count_correct_to_wrong(result.details["chains"], "7").correct_to_wrong == 2


async def test_weighted_selection_prefers_the_verified_attempt():
    # Three sloppy attempts (wrong sum, and an answer no calculation produced) and one verified attempt.
    script = [(3, 4, 8, 9), (3, 4, 8, 9), (3, 4, 7), (3, 4, 8, 9)]
    policy = FakePolicy(_scripted(script))
    reward = ArithmeticReward()
    weighted = await build_strategy("revisions", {"n": 8, "chain_length": 4}).run(
        PROBLEM, policy, reward, FlopMeter().budget(None))
    assert weighted.answer == "7"  # 0.83 for the verified attempt against 3 x 0.17
    majority = await build_strategy("revisions", {"n": 4, "chain_length": 4, "selection": "majority"}).run(
        PROBLEM, FakePolicy(_scripted(script)), None, FlopMeter().budget(None))
    assert majority.answer == "9"


async def test_budget_cuts_chains_short_and_is_never_exceeded():
    meter = FlopMeter()
    policy = FakePolicy(_scripted([(3, 4, 7)] * 4), meter)
    reward = FakeReward(meter=meter, flops_per_step=1.0)
    from service.strategies.base import SamplingParams

    first = policy.estimate_flops([BASE_PROMPT], SamplingParams(max_tokens=PROBLEM.max_tokens), 2)
    limit = first + 50.0
    result = await build_strategy("revisions", {"n": 8, "chain_length": 4}).run(
        PROBLEM, policy, reward, meter.budget(limit))
    assert meter.total <= limit and result.budget_exhausted
    assert len(policy.calls) == 1 and result.details["revisions"] == 0 and result.answer == "7"
