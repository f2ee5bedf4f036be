"""Final answers: extraction, equivalence (math_verify), score aggregation and the three selection rules.

Selection rules (Wu et al. B2, Snell et al. A2):
- majority: the answer given most often wins;
- weighted: the answer with the largest sum of candidate scores wins (weighted majority vote);
- best: the single candidate with the highest score.
The candidate returned for a voted answer is its best-scored member (Snell's "top solution of the max answer").

Candidates without an extractable answer take part in `best` like any other, but they cast no vote: lumping them into
one "no answer" group would let a pile of unfinished texts outvote real answers. Their weight still counts in the
denominator of the vote share. If no candidate has an answer, voting falls back to `best`.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Literal, Sequence

from math_verify import parse, verify

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?|-?\.\d+"
_LAST_NUMBER = re.compile(_NUMBER)
_ANSWER_IS = re.compile(r"the (?:final )?answer is\s*:?\s*([^\n]*)", re.IGNORECASE)
_GSM8K = re.compile(r"####\s*([^\n]+)")
_MATHY = re.compile(r"[\d\s.,/\-+*^()]+")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, matching nested braces."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth, i = 1, start
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start:i - 1].strip()
    return None


def _clean(answer: str) -> str | None:
    # "4 * 9 = 36" -> "36": the value after the last "=" is what the solution concludes.
    answer = answer.rsplit("=", 1)[-1]
    # A sentence may go on after the answer: "36. I hope it is correct."
    answer = re.split(r"(?<!\d)\.(?!\d)|\.\s|\.$", answer.strip(), maxsplit=1)[0]
    answer = answer.strip().strip("*").strip()
    answer = re.sub(r"^\\?\$(?=\s*-?\d)", "", answer).strip()  # currency sign: "$18" -> "18"
    if answer.startswith("$") and answer.endswith("$") and len(answer) > 1:
        answer = answer.strip("$").strip()
    return answer or None


def extract_answer(text: str) -> str | None:
    """The final answer of a solution: \\boxed{}, else "The answer is X", else "#### X", else the last number."""
    boxed = _last_boxed(text)
    if boxed:
        return boxed
    said = _ANSWER_IS.findall(text)
    if said:
        cleaned = _clean(said[-1])
        if cleaned:
            if _MATHY.fullmatch(cleaned) or "\\" in cleaned:
                return cleaned
            # Words around the number ("12 apples") would confuse the comparison: keep the first number.
            number = _LAST_NUMBER.search(cleaned)
            return number.group(0).strip().rstrip(",") if number else cleaned
    gsm = _GSM8K.findall(text)
    if gsm:
        cleaned = _clean(gsm[-1])
        if cleaned:
            return cleaned
    numbers = _LAST_NUMBER.findall(text)
    return numbers[-1].strip().rstrip(",") if numbers else None


def _timeout() -> int | None:
    # math_verify's timeouts use SIGALRM, which only the main thread may set.
    return 5 if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=4096)
def parse_answer(answer: str) -> tuple:
    """math_verify's parse of an extracted answer (cached); LaTeX is retried inside $...$."""
    parsed = parse(answer, parsing_timeout=_timeout())
    if not parsed and ("\\" in answer or "{" in answer):
        parsed = parse(f"${answer}$", parsing_timeout=_timeout())
    return tuple(parsed)


def _normalised(answer: str) -> str:
    return re.sub(r"\s+", "", answer).replace(",", "").lower()


# Longer "answers" are compared as normalised text only: off the main thread math_verify runs without its SIGALRM
# timeout, and a runaway expression must not occupy the voting thread.
MAX_PARSED_ANSWER_CHARS = 200


@lru_cache(maxsize=16384)
def _equivalent_cached(a: str, b: str) -> bool:
    if max(len(a), len(b)) > MAX_PARSED_ANSWER_CHARS:
        return _normalised(a) == _normalised(b)
    pa, pb = parse_answer(a), parse_answer(b)
    if not pa or not pb:
        return _normalised(a) == _normalised(b)
    return bool(verify(list(pa), list(pb), timeout_seconds=_timeout()))


def answers_equivalent(a: str | None, b: str | None) -> bool:
    """Mathematical equivalence of two extracted answers ("1/2" == "0.5" == "\\frac{1}{2}"); None matches nothing."""
    if a is None or b is None:
        return False
    if a == b or _normalised(a) == _normalised(b):
        return True
    return _equivalent_cached(*sorted((a, b)))


def _canonical(value: Any) -> Any:
    # 1.0 and 1 are one JSON number (RFC 8785 writes both as 1).
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


def json_answer(text: str) -> str | None:
    """The answer of a structured (JSON) candidate: its value as canonical JSON (sorted keys, no spaces), so equal
    values compare equal as strings; text that does not parse casts no vote."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return json.dumps(_canonical(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def json_equal(a: str | None, b: str | None) -> bool:
    """Equality of canonical JSON answers (json_answer)."""
    return a is not None and a == b


Equivalence = Callable[[str | None, str | None], bool]


def aggregate_scores(step_scores: Sequence[float], how: Literal["last", "min", "prod", "mean"]) -> float:
    """One score for a whole candidate from its step scores; no steps means nothing to trust: 0."""
    if not step_scores:
        return 0.0
    if how == "last":
        return float(step_scores[-1])
    if how == "min":
        return float(min(step_scores))
    if how == "prod":
        return float(math.prod(step_scores))
    if how == "mean":
        return float(sum(step_scores) / len(step_scores))
    raise ValueError(f"unknown aggregation {how!r}")


@dataclass
class Candidate:
    text: str
    answer: str | None
    # Aggregated reward in [0, 1]; 1.0 when unscored (majority needs no scores).
    score: float = 1.0
    finish_reason: str = "stop"
    tokens: int = 0

    @classmethod
    def of(cls, text: str, score: float = 1.0, finish_reason: str = "stop", tokens: int = 0,
           extract: Callable[[str], str | None] = extract_answer) -> "Candidate":
        return cls(text, extract(text), score, finish_reason, tokens)


@dataclass
class Choice:
    candidate: Candidate
    # Aggregated reward of the candidate (best), or the winner's share of all votes/weight (majority, weighted).
    score: float
    vote_share: float
    # Canonical answers with their vote weights, best first (for details and debugging).
    tally: list[tuple[str, float]]


def group_by_answer(candidates: Sequence[Candidate], equivalent: Equivalence | None = None) -> list[list[int]]:
    """Indices of candidates grouped by equivalent answers (first occurrence order); unanswered ones are left out."""
    equivalent = equivalent or answers_equivalent
    groups: list[list[int]] = []
    for i, cand in enumerate(candidates):
        if cand.answer is None:
            continue
        for group in groups:
            if equivalent(candidates[group[0]].answer, cand.answer):
                group.append(i)
                break
        else:
            groups.append([i])
    return groups


def select(candidates: Sequence[Candidate], selection: Literal["majority", "best", "weighted"],
           equivalent: Equivalence | None = None) -> Choice:
    if not candidates:
        raise ValueError("select() needs at least one candidate")
    if selection not in ("majority", "best", "weighted"):
        raise ValueError(f"unknown selection {selection!r}")
    weight = (lambda c: 1.0) if selection == "majority" else (lambda c: max(0.0, c.score))
    groups = group_by_answer(candidates, equivalent)
    total = sum(weight(c) for c in candidates)
    sums = [sum(weight(candidates[i]) for i in g) for g in groups]
    tally = sorted(((candidates[g[0]].answer or "", s) for g, s in zip(groups, sums)), key=lambda t: -t[1])
    # Earliest best-scored candidate wins ties (max keeps the first of equals).
    best_index = max(range(len(candidates)), key=lambda i: (candidates[i].score, -i))
    if selection == "best" or not groups:
        chosen = candidates[best_index]
        same = next((s for g, s in zip(groups, sums) if best_index in g), weight(chosen))
        return Choice(chosen, chosen.score, same / total if total > 0 else 0.0, tally)
    # Ties between answers: the one whose best member scores higher, then the one seen first.
    order = range(len(groups))
    winner = max(order, key=lambda k: (sums[k], max(candidates[i].score for i in groups[k]), -k))
    member = max(groups[winner], key=lambda i: (candidates[i].score, -i))
    share = sums[winner] / total if total > 0 else 0.0
    return Choice(candidates[member], share, share, tally)


# One thread: math_verify/sympy calls are serialised (no thread-safety questions) and kept off the event loop.
_VOTER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ttc-vote")


async def select_async(candidates: Sequence[Candidate], selection: Literal["majority", "best", "weighted"],
                       equivalent: Equivalence | None = None) -> Choice:
    """`select` without stalling the event loop: grouping answers by equivalence parses them with math_verify
    (measured: 0.09 s for 16 integer answers, about 1 s for 64 distinct fractions), time in which every other
    request on this gateway process would wait. Trivial votes (at most one distinct answer text) stay inline."""
    if equivalent is not None or len({_normalised(c.answer) for c in candidates if c.answer is not None}) <= 1:
        return select(candidates, selection, equivalent)  # another equivalence than math_verify's is cheap
    return await asyncio.get_running_loop().run_in_executor(_VOTER, select, candidates, selection)


async def group_by_answer_async(candidates: Sequence[Candidate],
                                equivalent: Equivalence | None = None) -> list[list[int]]:
    """`group_by_answer` off the event loop, for the same reason as `select_async`."""
    if equivalent is not None or len({_normalised(c.answer) for c in candidates if c.answer is not None}) <= 1:
        return group_by_answer(candidates, equivalent)
    return await asyncio.get_running_loop().run_in_executor(_VOTER, group_by_answer, candidates)
