"""What an earlier, interrupted run of a benchmark already measured: its results file, one JSON record per line,
keyed by (problem id, configuration key). A line cut off by a kill is skipped and measured again."""

from __future__ import annotations

import json
from pathlib import Path


def finished_runs(path: Path) -> dict[tuple[str, str], dict]:
    done: dict[tuple[str, str], dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[(rec["id"], rec["key"])] = rec
    return done
