"""Step searches live on held-out sample-bank problems, beside best-of-N and `auto` replayed on the same problems.

    python benchmarks/held_out_searches.py --bank benchmarks/results/bank_smollm2_10l.jsonl.gz --limit 32 \
        --out benchmarks/results/held_out_searches.json --work-dir /tmp/held_out_searches

The bank's best-of-N figures come from 32 samples per problem, replayed; beam search, DVTS and REBASE cannot be
replayed from independent samples, so they run live here, through the code the gateway serves (unbudgeted, verifier
`prm*arith`, temperature 0.8, 96 tokens, FLOPs from the meter), on the first `--limit` problems of the bank's
held-out split (bank.is_held_out: never fitted on). The same problems' best-of-N weighted (N = 1..16) and the shipped
table's `auto` (the head's prefill paid) are replayed from the bank, so every point of the plot is on the same problems.
Per-problem results are cached as JSONL in the work dir; a rerun resumes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.offline.bank import is_held_out, read_bank  # noqa: E402
from service.offline.workers import gateway_settings, with_gateway  # noqa: E402
from bench_runs import finished_runs, save_plot, wilson, worker_port, write_report  # noqa: E402

MAX_TOKENS = 96
TEMPERATURE = 0.8
BACKEND = "prm*arith"
SEARCHES = [  # (label, strategy, params): the calibration grid's lean N = 4 searches
    ("beam_search n=4 M=2", "beam_search", {"n": 4, "beam_width": 2}),
    ("dvts n=4 M=2", "dvts", {"n": 4, "beam_width": 2}),
    ("rebase n=4", "rebase", {"n": 4}),
]


async def run_problem(gw: Any, row: dict[str, Any], done: dict, out: Any) -> None:
    from service.metering import Meter
    from service.prompts import math_messages, style_for
    from service.strategies import build_strategy
    from service.strategies.base import ComputeBudget, Problem
    from service.strategies.voting import answers_equivalent
    from service.workers.policy import MeteredPolicy

    pid, gold = row["id"], str(row["gold"])
    prompt = await gw.policy.render_chat(math_messages(row["question"], style_for(row.get("source", ""))))
    for label, name, params in SEARCHES:
        if (pid, label) in done:
            continue
        meter = Meter()
        problem = Problem(prompt=prompt, question=row["question"], max_tokens=MAX_TOKENS, temperature=TEMPERATURE)
        t0 = time.monotonic()
        res = await build_strategy(name, params).run(problem, MeteredPolicy(gw.policy, meter),
                                                     gw.reward_for(meter, "bench"),
                                                     ComputeBudget(None, lambda: meter.total_flops))
        rec = {"id": pid, "key": label, "source": row.get("source"), "answer": res.answer,
               "correct": answers_equivalent(res.answer, gold), "flops": meter.total_flops,
               "seconds": round(time.monotonic() - t0, 2)}
        done[(pid, label)] = rec
        out.write(json.dumps(rec) + "\n")
        out.flush()


def replayed(problems: list[dict[str, Any]], table_path: str, head_path: str, bank_path: str) -> dict[str, Any]:
    """Best-of-N weighted and the shipped `auto` on exactly these problems, from the bank (128 orderings), with
    percentile bootstrap 95% intervals over the problems."""
    from service.offline.auto_replay import hidden_auto_outcomes
    from service.offline.evaluate import BUDGETS_GEN, RULES, hidden_inputs
    from service.offline.fit import budget_flops
    from service.offline.replay import (NS, BonConfig, all_configs, bank_arrays, bootstrap_weights,
                                        replay_orderings, with_intervals)
    from service.router.table import load

    bank = bank_arrays(problems)
    # The table may choose early stopping (replay --stopping): the same configurations as the replay that fitted it.
    configs = [c for c in all_configs(NS, rules=RULES[:2]) if c.selection == "majority" or c.backend == BACKEND]
    ok, cost, _ = replay_orderings(bank, configs, r=128, seed=0)
    acc, fl = ok.mean(1), cost.mean(1)
    w = bootstrap_weights(len(problems), 1000, seed=0)

    def point(a: np.ndarray, f: np.ndarray) -> dict[str, Any]:
        ci = with_intervals(a[:, None], w)
        return {"accuracy": float(a.mean()), "ci95": [round(float(ci["lo"][0]), 3), round(float(ci["hi"][0]), 3)],
                "mean_flops": float(f.mean())}

    out: dict[str, Any] = {}
    for n in NS:
        k = next(j for j, c in enumerate(configs) if c == BonConfig(n, "weighted", "last", BACKEND))
        out[f"best_of_n n={n} weighted"] = point(acc[:, k], fl[:, k])
    table = load(table_path)
    hid = hidden_inputs(argparse.Namespace(difficulty_head=head_path, features=None, bank=bank_path), problems, None)
    stat = np.array([hid["prediction"][p["id"]] for p in problems])
    enc = np.array([hid["encode_flops"][p["id"]] for p in problems])
    budgets = [budget_flops(g, table.generation_flops) for g in BUDGETS_GEN]
    aa, af = hidden_auto_outcomes(table, acc, fl, configs, stat, enc, budgets, [p["question"] for p in problems])
    for j, g in enumerate(BUDGETS_GEN):
        out[f"auto B={g} gen"] = point(aa[:, j], af[:, j])
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    rows = result["strategies"]
    for prefix, name, style in (("best_of_n", "best-of-N weighted, N = 1..16", dict(marker="o", lw=1.2)),
                                ("auto", "auto (shipped table, head paid), B = 1..16 gen", dict(marker="s", lw=2.5))):
        pts = [v for k, v in rows.items() if k.startswith(prefix)]
        ax.plot([p["mean_flops"] for p in pts], [100 * p["accuracy"] for p in pts],
                label=f"{name} (replayed from the bank)", **style)
    for label, *_ in SEARCHES:
        if label in rows:
            r = rows[label]
            lo, hi = (100 * x for x in r["ci95"])
            ax.errorbar([r["mean_flops"]], [100 * r["accuracy"]], yerr=[[100 * r["accuracy"] - lo],
                        [hi - 100 * r["accuracy"]]], fmt="^", capsize=4, label=f"{label} (live, Wilson 95%)")
    save_plot(fig, ax, path, f"{result['problems']} held-out bank problems, verifier {BACKEND}", "accuracy %")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bank", required=True)
    ap.add_argument("--limit", type=int, default=32)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work-dir", default="/tmp/held_out_searches")
    ap.add_argument("--table", default="service/data/policy_table_smollm2.json")
    ap.add_argument("--difficulty-head", default="service/data/difficulty_head_smollm2.npz")
    ap.add_argument("--policy-port", type=int, default=0, help="embedded policy worker port (reward: the next)")
    args = ap.parse_args()
    _, problems = read_bank(args.bank)
    rows = [p for p in problems if is_held_out(p["id"]) and p.get("question")][: args.limit]
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    path = work / "results.jsonl"
    done = finished_runs(path)

    async def work_fn(gw: Any) -> None:
        t0 = time.monotonic()
        with open(path, "a") as out:
            for i, row in enumerate(rows):  # one problem at a time: the two workers share the cores
                await run_problem(gw, row, done, out)
                print(f"{i + 1}/{len(rows)} problems, {time.monotonic() - t0:.0f} s", flush=True)

    if not all((r["id"], s[0]) in done for r in rows for s in SEARCHES):
        port = worker_port(args.policy_port)
        asyncio.run(with_gateway(gateway_settings(BACKEND, port, port + 1), work_fn))
    table: dict[str, Any] = replayed(rows, args.table, args.difficulty_head, args.bank)
    for label, *_ in SEARCHES:
        recs = [done[(r["id"], label)] for r in rows if (r["id"], label) in done]
        k = sum(bool(r["correct"]) for r in recs)
        table[label] = {"accuracy": k / len(recs), "ci95": wilson(k, len(recs)), "problems": len(recs),
                        "mean_flops": sum(r["flops"] for r in recs) / len(recs),
                        "mean_seconds": sum(r["seconds"] for r in recs) / len(recs)}
    result = {"problems": len(rows), "sources": {s: sum(r.get("source") == s for r in rows)
                                                 for s in sorted({r.get("source") for r in rows})},
              "strategies": table}
    write_report(args.out, result)
    plot(result, Path(args.out).with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
