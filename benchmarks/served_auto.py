"""`auto` served live under enforced budgets on held-out bank problems, with and without best-of-N top-up rounds,
beside `auto` replayed from the bank on the same problems.

    python benchmarks/served_auto.py --bank benchmarks/results/bank_smollm2_10l.jsonl.gz --limit 60 \
        --out benchmarks/results/served_auto.json --work-dir /tmp/served_auto

The replay holds each request to its budget with the samples' realized FLOPs; a served budget is enforced on the
worst case (every sample running to max_tokens), so without top-up the served `auto` draws fewer samples than the
table chose. This runs the code the gateway serves (router.difficulty.run_auto with the shipped table and the
zero-decode head's prefill paid, verifier `prm*arith`, temperature 0.8, the bank's max_tokens unless told) at
budgets of B generations, and reports
per budget and mode: accuracy with a Wilson 95% interval, mean FLOPs, mean samples drawn against the N the table
chose, and the largest spend over the budget (must be <= 1). Per-problem results are cached in the work dir.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.offline.bank import is_held_out, read_bank  # noqa: E402
from service.offline.workers import gateway_settings, with_gateway  # noqa: E402
from bench_runs import finished_runs, wilson, worker_port, write_report  # noqa: E402

BACKEND = "prm*arith"
BUDGETS_GEN = (4, 16)
MODES = ("top_up", "single_call")


def tables(path: str) -> dict[str, Any]:
    """The shipped table, and the same table with top-up switched off in every best-of-N entry."""
    from service.router.table import load

    raw = json.loads(Path(path).read_text())
    if raw.get("hidden_head"):  # the copy lives elsewhere: the head's path must not be relative to it
        raw["hidden_head"]["path"] = str((Path(path).parent / raw["hidden_head"]["path"]).resolve())
    for entry in raw["entries"]:
        if entry["strategy"] == "best_of_n":
            entry["params"] = dict(entry["params"], top_up=False)
    off = Path(tempfile.mkdtemp()) / "table_single_call.json"
    off.write_text(json.dumps(raw))
    return {"top_up": load(path), "single_call": load(str(off))}


async def run_problem(gw: Any, row: dict[str, Any], by_mode: dict[str, Any], max_tokens: int, done: dict,
                      out: Any) -> None:
    from service.metering import Meter
    from service.offline.fit import budget_flops
    from service.prompts import math_messages, style_for
    from service.strategies import build_strategy
    from service.strategies.base import ComputeBudget, Problem
    from service.strategies.voting import answers_equivalent
    from service.workers.policy import MeteredPolicy

    pid, gold = row["id"], str(row["gold"])
    prompt = await gw.policy.render_chat(math_messages(row["question"], style_for(row.get("source", ""))))
    for mode, table in by_mode.items():
        for g in BUDGETS_GEN:
            key = f"{mode} B={g}"
            if (pid, key) in done:
                continue
            limit = budget_flops(g, table.generation_flops)
            meter = Meter()
            problem = Problem(prompt=prompt, question=row["question"], max_tokens=max_tokens, temperature=0.8)
            chosen: dict[str, Any] = {}
            strategy = build_strategy("auto", {}, gw.settings.max_n, table=table, on_choice=chosen.update,
                                      encoder=gw.prompt_encoder(meter))
            t0 = time.monotonic()
            res = await strategy.run(problem, MeteredPolicy(gw.policy, meter), gw.reward_for(meter, "bench"),
                                     ComputeBudget(limit, lambda: meter.total_flops))
            rec = {"id": pid, "key": key, "source": row.get("source"), "correct": answers_equivalent(res.answer, gold),
                   "flops": meter.total_flops, "budget": limit, "samples": res.samples,
                   "chosen_n": (chosen.get("params") or {}).get("n"), "strategy": chosen.get("strategy"),
                   "exhausted": res.budget_exhausted, "top_up": (res.details or {}).get("top_up"),
                   "seconds": round(time.monotonic() - t0, 2)}
            done[(pid, key)] = rec
            out.write(json.dumps(rec) + "\n")
            out.flush()


def summary(recs: list[dict[str, Any]]) -> dict[str, Any]:
    k = sum(bool(r["correct"]) for r in recs)
    with_n = [r for r in recs if r["chosen_n"]]
    return {"problems": len(recs), "accuracy": k / len(recs), "ci95": wilson(k, len(recs)),
            "mean_flops": sum(r["flops"] for r in recs) / len(recs),
            "mean_samples": sum(r["samples"] for r in recs) / len(recs),
            "mean_chosen_n": sum(r["chosen_n"] for r in with_n) / max(1, len(with_n)),
            "samples_over_chosen_n": sum(r["samples"] for r in with_n) / max(1, sum(r["chosen_n"] for r in with_n)),
            "max_spend_over_budget": max(r["flops"] / r["budget"] for r in recs),
            "mean_seconds": sum(r["seconds"] for r in recs) / len(recs)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bank", required=True)
    ap.add_argument("--limit", type=int, default=60)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work-dir", default="/tmp/served_auto")
    ap.add_argument("--table", default="service/data/policy_table_smollm2.json")
    ap.add_argument("--difficulty-head", default="service/data/difficulty_head_smollm2.npz")
    ap.add_argument("--max-tokens", type=int, default=0, help="default: the bank's max_tokens")
    ap.add_argument("--policy-port", type=int, default=0, help="embedded policy worker port (reward: the next)")
    args = ap.parse_args()
    meta, problems = read_bank(args.bank)
    max_tokens = args.max_tokens or int(meta["max_tokens"])
    rows = [p for p in problems if is_held_out(p["id"]) and p.get("question")][: args.limit]
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    path = work / "results.jsonl"
    done = finished_runs(path)
    by_mode = tables(args.table)
    keys = [f"{m} B={g}" for m in MODES for g in BUDGETS_GEN]

    async def work_fn(gw: Any) -> None:
        t0 = time.monotonic()
        with open(path, "a") as out:
            for i, row in enumerate(rows):  # one problem at a time: the two workers share the cores
                await run_problem(gw, row, by_mode, max_tokens, done, out)
                print(f"{i + 1}/{len(rows)} problems, {time.monotonic() - t0:.0f} s", flush=True)

    if not all((r["id"], k) in done for r in rows for k in keys):
        port = worker_port(args.policy_port)
        settings = gateway_settings(BACKEND, port, port + 1)
        settings.policy_table_path = args.table
        asyncio.run(with_gateway(settings, work_fn))
    from held_out_searches import replayed

    result: dict[str, Any] = {"problems": len(rows), "max_tokens": max_tokens,
                              "served": {k: summary([done[(r["id"], k)] for r in rows]) for k in keys},
                              "replayed": {k: v for k, v in replayed(rows, args.table, args.difficulty_head,
                                                                     args.bank).items()
                                           if k in {f"auto B={g} gen" for g in BUDGETS_GEN}}}
    write_report(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
