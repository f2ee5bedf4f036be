"""A calculator as a step verifier: recomputes every equation a step writes, without ever seeing the answer key.

A step's score is the share of correct checks among all checks so far (cumulative), smoothed towards a neutral prior:
    score = (correct + prior * prior_weight) / (checked + prior_weight)
so a solution with no equation scores 0.5, one right equation 0.75, two 0.83, one wrong 0.25. Under the default
"last" aggregation the final score is the smoothed accuracy of the whole solution, and the weighted vote favours
answers that consistent solutions reach. Checks:
- every `a op b = c` and chain `3 + 5 * 2 = 13 = 26 / 2` (x, ×, ÷, ^, parentheses, 1,000, decimals);
- the final answer ("The answer is N") against the result of the last equation written before or with it (an answer
  that no calculation produced is a classic small-model failure).
Expressions are evaluated by walking Python's AST (numbers, + - * / **, unary signs): never eval.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from typing import Sequence

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.Pow: operator.pow}
# Runs of arithmetic characters on one line (a step may hold several lines when steps are paragraphs).
_SPAN = re.compile(r"[0-9.+\-*/()= \t]*=[0-9.+\-*/()= \t]*")
_TIMES = re.compile(r"(?<=[\d)])[ \t]*[xX×✕∗·][ \t]*(?=[\d(])")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_CURRENCY = re.compile(r"\\?\$(?=\d)")
_FINAL = re.compile(r"the (?:final )?answer is\s*:?([^\n]*)", re.IGNORECASE)
_LITERAL = re.compile(r"-?\d+(?:\.(\d+))?")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class UnsafeExpression(ValueError):
    pass


def _walk(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _walk(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return float(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _walk(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _walk(node.left), _walk(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 1e6):
            raise UnsafeExpression("exponent too large")  # 9**9**9 must not hang the gateway
        try:
            result = _OPS[type(node.op)](left, right)
        except (ZeroDivisionError, OverflowError) as exc:
            raise UnsafeExpression(str(exc)) from None
        if isinstance(result, complex) or not math.isfinite(result):
            raise UnsafeExpression("not a finite real number")
        return float(result)
    raise UnsafeExpression(f"not arithmetic: {type(node).__name__}")


def safe_eval(expression: str) -> float:
    """The value of a plain arithmetic expression; raises ValueError (UnsafeExpression/SyntaxError) otherwise."""
    if len(expression) > 200:
        raise UnsafeExpression("too long")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise UnsafeExpression(str(exc)) from None
    return _walk(tree)


def _has_operator(expression: str) -> bool:
    tree = ast.parse(expression.strip(), mode="eval")
    return any(isinstance(n, ast.BinOp) for n in ast.walk(tree))


def normalise(text: str) -> str:
    text = text.replace("÷", "/").replace("−", "-").replace("–", "-").replace("^", "**")
    text = _CURRENCY.sub("", _THOUSANDS.sub("", text))
    return _TIMES.sub(" * ", text)


def _clean_part(part: str) -> str:
    part = part.strip()
    if part.startswith(".") and not part[1:2].isdigit():
        part = part.lstrip(". ")
    return part.rstrip(". ")


def _tolerance(a_text: str, b_text: str, a: float, b: float) -> float:
    # A written literal is right if it is the value rounded to the decimals it shows ("10 / 3 = 3.33").
    shown = [m.group(1) for t in (a_text, b_text) if (m := _LITERAL.fullmatch(t)) and m.group(1)]
    rounding = max((0.5 * 10 ** -len(d) for d in shown), default=0.0)
    return max(rounding, 1e-9 * max(1.0, abs(a), abs(b)))


def check_equations(step: str) -> tuple[int, int, float | None]:
    """(correct, wrong, value of the last equation) for the equations written in one step."""
    correct = wrong = 0
    last_value: float | None = None
    for span in _SPAN.findall(normalise(step)):
        values: list[tuple[str, float]] = []
        operators = False
        for part in (_clean_part(p) for p in span.split("=")):
            if not part:
                continue
            try:
                values.append((part, safe_eval(part)))
                operators = operators or _has_operator(part)
            except UnsafeExpression:
                if re.search(r"\d\s*/\s*0(?![.\d])", part):  # a written division by zero is a wrong equation
                    wrong += 1
                values = []
        if len(values) < 2 or not operators:
            continue  # "x = 5", "20 = 20": nothing was calculated
        for (a_text, a), (b_text, b) in zip(values, values[1:]):
            if abs(a - b) <= _tolerance(a_text, b_text, a, b):
                correct += 1
            else:
                wrong += 1
        last_value = values[-1][1]
    return correct, wrong, last_value


def final_answer_number(step: str) -> str | None:
    """The number a step gives as its final answer ("The answer is 4 * 9 = 36." -> "36"), if any."""
    said = _FINAL.findall(normalise(step))
    number = _NUMBER.search(said[-1].rsplit("=", 1)[-1]) if said else None
    return number.group(0) if number else None


class ArithmeticReward:
    """Reward protocol implementation "arith": step scores from recomputed arithmetic (no model, no FLOPs)."""

    name = "arith"

    def __init__(self, prior: float = 0.5, prior_weight: float = 1.0, check_final_answer: bool = True):
        self.prior = prior
        self.prior_weight = prior_weight
        self.check_final_answer = check_final_answer

    def score_steps(self, steps: Sequence[str]) -> list[float]:
        correct = checked = 0
        last_value: float | None = None
        scores: list[float] = []
        for step in steps:
            ok, bad, value = check_equations(step)
            correct, checked = correct + ok, checked + ok + bad
            last_value = value if value is not None else last_value
            answer_text = final_answer_number(step) if self.check_final_answer else None
            if answer_text is not None and last_value is not None:
                answer = float(answer_text)
                checked += 1
                correct += abs(answer - last_value) <= _tolerance(answer_text, "", answer, last_value)
            scores.append((correct + self.prior * self.prior_weight) / (checked + self.prior_weight))
        return scores

    async def score(self, question: str, candidates: Sequence[Sequence[str]]) -> list[list[float]]:
        return [self.score_steps(steps) for steps in candidates]

    def estimate_flops(self, question: str, candidates: Sequence[Sequence[str]]) -> float:
        return 0.0
