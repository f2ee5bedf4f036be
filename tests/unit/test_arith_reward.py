import time

import pytest

from service.rewards import ArithmeticReward, ProductReward
from service.rewards.arithmetic import UnsafeExpression, check_equations, final_answer_number, safe_eval
from service.strategies.voting import Candidate, aggregate_scores, select


@pytest.mark.parametrize("step,correct,wrong", [
    ("12 + 7 = 19", 1, 0),
    ("12 + 7 = 18", 0, 1),
    ("3 + 5 * 2 = 13", 1, 0),
    ("(3 + 5) * 2 = 16", 1, 0),
    ("4 x 9 = 36", 1, 0),
    ("4 × 9 = 36", 1, 0),
    ("10 ÷ 4 = 2.5", 1, 0),
    ("1,000 + 250 = 1,250", 1, 0),
    ("10 / 3 = 3.33", 1, 0),  # rounded to the decimals it shows
    ("10 / 3 = 3", 0, 1),
    ("2^10 = 1024", 1, 0),
    ("3 + 5 = 8 = 2 * 4", 2, 0),
    ("8 - 3 = 5 = 6", 1, 1),
    ("He has 5 apples. 3 + 2 = 5.", 1, 0),
    ("Total = 5 + 3 = 8", 1, 0),
    ("$5 + $3 = $8", 1, 0),
    ("The answer is 4 * 9 = 36.", 1, 0),
    ("x = 5", 0, 0),
    ("20 = 20", 0, 0),
    ("She has 3 apples and 4 pears.", 0, 0),
    ("5 / 0 = 0", 0, 1),
    ("3 + 4 = 7\n7 * 2 = 14", 2, 0),  # a paragraph step with one equation per line
    ("3 + 4 = 7\n7 * 2 = 15", 1, 1),
])
def test_check_equations(step, correct, wrong):
    assert check_equations(step)[:2] == (correct, wrong)


@pytest.mark.parametrize("expression", ["__import__('os').system('true')", "a + 1", "(1).real", "[1, 2]",
                                        "'7' * 3", "f(2)", "1 if 1 else 2", "lambda: 1"])
def test_safe_eval_rejects_non_arithmetic(expression):
    with pytest.raises(UnsafeExpression):
        safe_eval(expression)


def test_safe_eval_refuses_huge_powers_quickly():
    start = time.perf_counter()
    with pytest.raises(UnsafeExpression):
        safe_eval("9 ** 9 ** 9")
    assert time.perf_counter() - start < 0.5
    assert safe_eval("-(2 + 3) * 4 / 8") == -2.5


def test_final_answer_number():
    assert final_answer_number("The answer is 4 * 9 = 36.") == "36"
    assert final_answer_number("The answer is 1,200.") == "1200"
    assert final_answer_number("no answer here") is None


async def test_scores_are_cumulative_smoothed_accuracy():
    reward = ArithmeticReward()
    assert reward.name == "arith" and reward.estimate_flops("q", [["1 + 1 = 2"]]) == 0.0
    good, bad, plain = await reward.score("q", [
        ["12 + 7 = 19", "19 * 2 = 38", "The answer is 38."],
        ["12 + 7 = 20", "20 * 2 = 40", "The answer is 40."],
        ["I count them.", "The answer is 38."],
    ])
    assert good == pytest.approx([0.75, 5 / 6, 7 / 8])
    assert bad[0] == pytest.approx(0.25) and bad[-1] < good[-1]
    assert plain == [0.5, 0.5]  # no calculation at all: neutral prior
    # An answer no calculation produced is penalised.
    lonely = reward.score_steps(["12 + 7 = 19", "The answer is 25."])
    assert lonely[-1] < lonely[0]


async def test_weighted_vote_with_calculator_beats_majority():
    steps = {
        "14": ["3 + 4 = 7", "7 * 2 = 14", "The answer is 14."],
        "17": ["3 + 4 = 8", "8 * 2 = 17", "The answer is 17."],
    }
    answers = ["14", "17", "17", "14", "17"]
    rows = await ArithmeticReward().score("q", [steps[a] for a in answers])
    cands = [Candidate("\n".join(steps[a]), a, aggregate_scores(r, "last")) for a, r in zip(answers, rows)]
    assert select(cands, "majority").candidate.answer == "17"
    assert select(cands, "weighted").candidate.answer == "14"


class _Const:
    def __init__(self, name, value, flops):
        self.name, self.value, self.flops = name, value, flops

    async def score(self, question, candidates):
        return [[self.value] * len(c) for c in candidates]

    def estimate_flops(self, question, candidates):
        return self.flops


async def test_product_reward():
    product = ProductReward(ArithmeticReward(), _Const("prm", 0.5, 10.0))
    assert product.name == "arith*prm"
    assert await product.score("q", [["1 + 1 = 2", "ok"]]) == [[0.375, 0.375]]
    assert product.estimate_flops("q", [["x"]]) == 10.0
