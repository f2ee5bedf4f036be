"""The dataset-style math prompt used for solving (calibration, bench, PRM training) and the JSONL dataset loader.

The prompt is the one measured in docs/cpu-runtime.md: a system instruction asking for one calculation per line and a
closing "The answer is N.", then three worked chat examples, then the question. One line = one step, which is what the
gateway's default step delimiter ("\n") and the PRM head expect.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

SYSTEM = "Solve the problem step by step, one calculation per line, and end with 'The answer is N.'"

# (question, worked answer) pairs per style.
_EXAMPLES: dict[str, list[tuple[str, str]]] = {
    "arith": [
        ("What is 12 + 7?", "12 + 7 = 19\nThe answer is 19."),
        ("Sam has 4 bags with 6 marbles each. He loses 5 marbles. How many marbles are left?",
         "4 * 6 = 24\n24 - 5 = 19\nThe answer is 19."),
        ("What is (3 + 5) * 2?", "3 + 5 = 8\n8 * 2 = 16\nThe answer is 16."),
    ],
}
# Word problems (MAWPS, SVAMP, GSM8K) and graded arithmetic use the same one-calculation-per-line format.
for _alias in ("mawps", "svamp", "gsm8k", "arith_graded"):
    _EXAMPLES[_alias] = _EXAMPLES["arith"]

STYLES = tuple(sorted(_EXAMPLES))


def math_messages(question: str, style: str = "arith") -> list[dict[str, str]]:
    """Chat messages: system instruction, three worked examples (user/assistant turns), then the question."""
    try:
        examples = _EXAMPLES[style]
    except KeyError:
        raise ValueError(f"unknown prompt style {style!r}; known: {', '.join(STYLES)}") from None
    messages = [{"role": "system", "content": SYSTEM}]
    for q, a in examples:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": question.strip()})
    return messages


def style_for(source: str) -> str:
    """The prompt style for a dataset `source` field (falls back to "arith")."""
    source = (source or "").lower()
    for style in _EXAMPLES:
        if source.startswith(style):
            return style
    return "arith"


def load_dataset(path: str | Path, limit: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Rows {id, question, answer, source, ...} of a JSONL file; with `limit`, a seeded random subset (file order
    kept) so that the same (limit, seed) always picks the same problems."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line:
                row = json.loads(line)
                row.setdefault("source", Path(path).stem)
                rows.append(row)
    if limit is not None and limit < len(rows):
        keep = sorted(random.Random(seed).sample(range(len(rows)), limit))
        rows = [rows[i] for i in keep]
    return rows
