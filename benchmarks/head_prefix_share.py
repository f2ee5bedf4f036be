"""Does the zero-decode head's prefill of the question spare the PRM's first scoring call the question's prefix?

    python benchmarks/head_prefix_share.py --bank benchmarks/results/bank_smollm2_10l.jsonl.gz --limit 200 \
        --out benchmarks/results/head_prefix_share.json

On held-out bank problems, alternately: "warm" encodes the bare question (what `auto` pays for its difficulty bin),
then scores 4 of the bank's samples with the PRM; "cold" scores them only. The reward worker caches prompt blocks of
32 tokens and reads them back, and the PRM's bare layout starts with the very tokens the head encodes, so a warm
scoring call should hit the question's full blocks in all 4 inputs, a cold one in 3 (the inputs of one call share
blocks). Reported per mode: cached tokens per scoring call beyond that expectation's (N - 1) x full blocks, and the
share of the head's FLOPs those full blocks hold on the whole bank (what serving then does not pay twice).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from service.metering import Meter  # noqa: E402
from service.offline.bank import is_held_out, read_bank  # noqa: E402
from service.offline.workers import gateway_settings, with_gateway  # noqa: E402
from bench_runs import worker_port, write_report  # noqa: E402

N = 4
BLOCK = 32


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bank", required=True)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--out", required=True)
    ap.add_argument("--policy-port", type=int, default=0)
    args = ap.parse_args()
    _, problems = read_bank(args.bank)
    rows = [p for p in problems if is_held_out(p["id"]) and p.get("question")][: args.limit]
    recs: list[dict[str, Any]] = []
    share: dict[str, float] = {}

    async def work(gw: Any) -> None:
        prm = gw.prm
        for i, p in enumerate(rows):
            warm = i % 2 == 0
            if warm:
                await prm.encode_question(p["question"], Meter())
            m = Meter()
            await prm.score(p["question"], [s["steps"] for s in p["samples"][:N]], m)
            full = len(prm.question_ids(p["question"])) // BLOCK * BLOCK
            recs.append({"id": p["id"], "warm": warm, "full_block_tokens": full,
                         "cached_tokens": m.reward.cached_tokens,
                         "beyond_n_minus_1": m.reward.cached_tokens - (N - 1) * full})
        lengths = [len(prm.question_ids(p["question"])) for p in problems if p.get("question")]
        enc = np.array([prm.shape.encode_flops(n) for n in lengths])
        kept = np.array([prm.shape.encode_flops(n // BLOCK * BLOCK) for n in lengths])
        share.update(problems=len(lengths), full_block_share_of_head_flops=float(kept.sum() / enc.sum()),
                     mean_head_flops=float(enc.mean()), mean_full_block_flops=float(kept.mean()))

    port = worker_port(args.policy_port)
    asyncio.run(with_gateway(gateway_settings("prm*arith", port, port + 1), work))
    result: dict[str, Any] = {"samples_scored": N, "block": BLOCK, "bank": share}
    for mode in ("warm", "cold"):
        r = [x for x in recs if x["warm"] == (mode == "warm")]
        result[mode] = {"problems": len(r), "with_a_full_block": sum(x["full_block_tokens"] > 0 for x in r),
                        "mean_full_block_tokens": float(np.mean([x["full_block_tokens"] for x in r])),
                        "mean_cached_beyond_n_minus_1_full_blocks": float(np.mean([x["beyond_n_minus_1"] for x in r]))}
    result["records"] = recs
    write_report(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
