import pytest

from service.strategies.voting import Candidate, aggregate_scores, answers_equivalent, extract_answer, select


@pytest.mark.parametrize("text,answer", [
    ("4 * 9 = 36\nThe answer is 4 * 9 = 36.", "36"),
    ("The answer is 4 * 9 = 36.", "36"),
    ("12 + 7 = 19\nThe answer is 19.", "19"),
    ("The answer is 3.5.", "3.5"),
    ("The answer is -3.", "-3"),
    ("The answer is $18.50.", "18.50"),
    ("The answer is 12 apples.", "12"),
    ("The answer is **42**.", "42"),
    ("The answer is 36. I hope it is correct.", "36"),
    ("The answer is 5.\nThe answer is 7.", "7"),
    ("so \\boxed{\\frac{1}{2}} in the end", "\\frac{1}{2}"),
    ("\\boxed{a} then \\boxed{\\frac{3}{\\sqrt{4}}}", "\\frac{3}{\\sqrt{4}}"),
    ("The answer is: $\\frac{1}{2}$.", "\\frac{1}{2}"),
    ("Natalia sold 48 clips.\n#### 1,000", "1,000"),
    ("First 3 then 12, and finally 15.", "15"),
    ("no digits here", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_extraction_pitfall_gold_number_mid_solution():
    # 307 wrong samples in the calibration set contain the gold number mid-solution: the stated answer must win.
    assert extract_answer("6 * 6 = 36\n36 + 4 = 40\nThe answer is 40.") == "40"


@pytest.mark.parametrize("a,b", [("1/2", "0.5"), ("0.5", "\\frac{1}{2}"), ("1/2", "\\frac{1}{2}"),
                                 ("1,000", "1000"), ("36", "36.0"), ("3/4", "0.75"), ("-2", "-2.00")])
def test_equivalent(a, b):
    assert answers_equivalent(a, b)
    assert answers_equivalent(b, a)


@pytest.mark.parametrize("a,b", [("12", "13"), ("3", "-3"), ("1/2", "2"), ("1000", "100"), (None, "1"), (None, None)])
def test_not_equivalent(a, b):
    assert not answers_equivalent(a, b)


def test_aggregate_scores():
    scores = [0.5, 0.8, 0.2]
    assert aggregate_scores(scores, "last") == 0.2
    assert aggregate_scores(scores, "min") == 0.2
    assert aggregate_scores(scores, "prod") == pytest.approx(0.08)
    assert aggregate_scores(scores, "mean") == pytest.approx(0.5)
    assert aggregate_scores([], "last") == 0.0
    with pytest.raises(ValueError):
        aggregate_scores(scores, "max")  # type: ignore[arg-type]


def _cands(pairs):
    return [Candidate(text=f"The answer is {a}." if a else "no idea", answer=a, score=s) for a, s in pairs]


def test_weighted_vote_worked_example():
    # Answer "7" twice with scores 0.9 and 0.8 (sum 1.7); "5" three times at 0.3 (sum 0.9).
    cands = _cands([("7", 0.8), ("5", 0.3), ("7", 0.9), ("5", 0.3), ("5", 0.3)])
    weighted = select(cands, "weighted")
    assert weighted.candidate is cands[2]  # the best-scored member of the winning answer
    assert weighted.score == pytest.approx(1.7 / 2.6)
    assert weighted.tally[0] == ("7", pytest.approx(1.7))
    majority = select(cands, "majority")
    assert majority.candidate.answer == "5"
    assert majority.vote_share == pytest.approx(3 / 5)
    best = select(cands, "best")
    assert best.candidate is cands[2] and best.score == 0.9


def test_vote_groups_equivalent_forms():
    cands = _cands([("2", 0.9), ("0.5", 0.4), ("1/2", 0.4), ("\\frac{1}{2}", 0.4), ("2", 0.9)])
    assert answers_equivalent(select(cands, "majority").candidate.answer, "1/2")
    assert select(cands, "weighted").candidate.answer == "2"  # 1.8 > 1.2


def test_unanswered_candidates_do_not_vote_but_count_for_best():
    cands = _cands([(None, 0.95), (None, 0.9), (None, 0.9), ("5", 0.2)])
    assert select(cands, "majority").candidate.answer == "5"
    assert select(cands, "weighted").candidate.answer == "5"
    assert select(cands, "weighted").vote_share == pytest.approx(0.2 / 2.95)
    assert select(cands, "best").candidate is cands[0]
    # Nobody answered: voting falls back to the best-scored candidate.
    assert select(cands[:3], "weighted").candidate is cands[0]


def test_ties_are_deterministic():
    cands = _cands([("1", 0.5), ("2", 0.5)])
    assert select(cands, "weighted").candidate is cands[0]
    assert select(list(reversed(cands)), "weighted").candidate.answer == "2"
    with pytest.raises(ValueError):
        select([], "weighted")


async def test_select_async_keeps_the_event_loop_responsive():
    import asyncio

    from service.strategies import voting

    voting.parse_answer.cache_clear()
    voting._equivalent_cached.cache_clear()
    # 48 distinct fractions: math_verify parses each and compares pairs, far longer than one loop tick.
    cands = [Candidate.of(f"The answer is \\frac{{{i}}}{{{i + 7}}}.", score=1.0 + i % 3) for i in range(1, 49)]
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    beat = asyncio.create_task(ticker())
    choice = await voting.select_async(cands, "weighted")
    beat.cancel()
    assert ticks > 0, "the vote ran on the event loop and starved other coroutines"
    assert choice == voting.select(cands, "weighted")  # same answer as the synchronous rule


async def test_select_async_inline_for_a_single_distinct_answer():
    from service.strategies import voting

    cands = [Candidate.of("The answer is 7.", score=s) for s in (0.2, 0.9)]
    assert (await voting.select_async(cands, "best")).candidate is cands[1]


def test_overlong_answers_compare_as_text():
    assert answers_equivalent("1" * 300, "1" * 300)
    assert not answers_equivalent("2" * 300, "2" * 299 + "3")
