"""What the offline benchmark scripts share: the results an interrupted run already measured (one JSON record per
line, keyed by problem id and configuration; a line cut off by a kill is measured again), a free port for the
workers they start, accuracy intervals, and the report they write."""

from __future__ import annotations

import json
import math
import socket
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


def worker_port(requested: int) -> int:
    """The requested port, or a free one (the reward worker, when any, takes the next)."""
    if requested:
        return requested
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_report(out: str, result: dict) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of an accuracy k / n."""
    if n == 0:
        return [0.0, 1.0]
    p, d = k / n, 1 + z * z / n
    mid, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [round(mid - half, 3), round(mid + half, 3)]


def save_plot(fig, ax, path, title: str, ylabel: str, legend_size: int = 8) -> None:
    """The benchmarks' accuracy-vs-FLOPs plots: log FLOPs axis, grid, legend, written and closed."""
    import matplotlib.pyplot as plt

    ax.set_xscale("log")
    ax.set_xlabel("mean FLOPs per problem")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
