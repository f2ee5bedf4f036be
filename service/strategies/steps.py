"""Steps of a solution: splitting, joining, "is it finished", and the shared state of the tree searches.

A partial solution's text is kept exactly as generated, with each step's delimiter appended after it (the policy gets
the delimiter as a stop string, which vLLM leaves out of the text), so `problem.prompt + text` continues naturally and
the final answer is the very string whose prefixes were streamed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

from .base import Completion, Problem, ProgressCallback, SamplingParams

# "The answer is" followed by something on the same line; "#### 42" (GSM8K); a closed \boxed{...}.
_FINAL_ANSWER = re.compile(r"the answer is\s*[:\-]?\s*[^\s.]|####\s*\S|\\boxed\s*\{[^{}]*\}", re.IGNORECASE)


def split_steps(text: str, delimiter: str) -> list[str]:
    """The non-blank steps of `text` (blank lines between steps are not steps)."""
    return [s for s in text.split(delimiter) if s.strip()]


def has_final_answer(text: str) -> bool:
    return _FINAL_ANSWER.search(text) is not None


def whole_steps_prefix(texts: Sequence[str], delimiter: str) -> str:
    """The longest common prefix of `texts` that ends right after a delimiter (only whole steps)."""
    if not texts:
        return ""
    first, last = min(texts), max(texts)  # the common prefix of all strings is that of the extremes
    length = 0
    while length < min(len(first), len(last)) and first[length] == last[length]:
        length += 1
    cut = first.rfind(delimiter, 0, length)
    return first[: cut + len(delimiter)] if cut >= 0 else ""


@dataclass
class Node:
    """A partial (or finished) solution in a tree search."""

    text: str = ""
    tokens: int = 0
    step_scores: list[float] = field(default_factory=list)
    score: float | None = None
    finished: bool = False
    finish_reason: str = "stop"
    # Round in which it finished; earlier finishers come first when more than N finish (Snell's done[:N]).
    finished_round: int = -1

    def extend(self, completion: Completion, delimiter: str, client_stops: Sequence[str], max_tokens: int,
               round_index: int) -> "Node":
        """The child that appends `completion`; finished on EOS, a client stop, the final answer, or max_tokens."""
        stepped = completion.stop_reason == delimiter
        text = self.text + completion.text + (delimiter if stepped else "")
        child = Node(text=text, tokens=self.tokens + completion.token_count)
        if completion.hit_eos or (completion.stop_reason is not None and completion.stop_reason in client_stops):
            child.finished, child.finish_reason = True, "stop"
        elif has_final_answer(completion.text):
            child.finished, child.finish_reason = True, "stop"
        elif child.tokens >= max_tokens:
            child.finished, child.finish_reason = True, "length"
        elif completion.finish_reason not in ("stop", "length"):  # aborted by the engine
            child.finished, child.finish_reason = True, completion.finish_reason
        if child.finished:
            child.finished_round = round_index
        return child

    def finish(self, round_index: int, reason: str = "length") -> None:
        """Close a node the search will not extend (last round, or the budget ran out)."""
        if not self.finished:
            self.finished, self.finish_reason, self.finished_round = True, reason, round_index


def first_finished(nodes: Sequence[Node], limit: int) -> list[Node]:
    """At most `limit` finished nodes: earliest rounds first, then the better scored (Snell's done[:N])."""
    ranked = sorted(nodes, key=lambda n: (n.finished_round, -(n.score if n.score is not None else 0.0)))
    return ranked[:limit]


class PrefixStreamer:
    """Emits text once every candidate still eligible for the final answer shares it (whole steps only).

    Whatever is chosen at the end is one of today's eligible candidates or a descendant of one, so it starts with
    everything emitted. The caller sends the rest of the final text after `run` returns.
    """

    def __init__(self, progress: ProgressCallback | None, delimiter: str):
        self.progress = progress
        self.delimiter = delimiter
        self.sent = ""

    async def update(self, eligible_texts: Sequence[str]) -> None:
        if self.progress is None or not eligible_texts:
            return
        prefix = whole_steps_prefix(eligible_texts, self.delimiter)
        if len(prefix) > len(self.sent) and prefix.startswith(self.sent):
            new, self.sent = prefix[len(self.sent):], prefix
            await self.progress(new)


def step_params(nodes: Sequence[Node], problem: Problem, temperature: float, delimiter: str, last: bool,
                cap: int = 256) -> SamplingParams:
    """Sampling for one round: up to the next delimiter, or to the end of the answer in the last round.

    One call serves all nodes, so the token limit is what the longest node has left: no node can exceed max_tokens
    (a node with more room just gets a shorter step and goes on next round).
    """
    room = max(1, min(problem.max_tokens - node.tokens for node in nodes))
    return SamplingParams(
        max_tokens=room if last else min(cap, room),
        temperature=temperature,
        top_p=problem.top_p if temperature > 0 else 1.0,
        stop=tuple(problem.stop) if last else (delimiter, *problem.stop),
    )


def expand(parents: Sequence[Node], outputs: Sequence[Sequence[Completion]], delimiter: str, problem: Problem,
           round_index: int, last: bool) -> list[list[Node]]:
    """The children of each parent from one round's completions; in the last round every child is closed."""
    families = []
    for parent, completions in zip(parents, outputs, strict=True):
        children = [parent.extend(c, delimiter, problem.stop, problem.max_tokens, round_index) for c in completions]
        if last:
            for child in children:
                child.finish(round_index)
        families.append(children)
    return families
