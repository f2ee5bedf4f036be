"""Prefix reuse in tree search, read from the policy worker's own counters, per KV block size.

    python benchmarks/prefix_reuse.py [--block-sizes 16,32,128] [--strategies beam_search,rebase] [--ns 4,16]
                                      [--out benchmarks/results/prefix_reuse.json]

For each block size it starts a gateway (embedded policy and reward workers, the policy worker with --block-size B),
runs each search on the same questions with the response and sample caches bypassed, and reads vLLM's
`vllm:prefix_cache_queries_total` / `vllm:prefix_cache_hits_total` before and after every request: prefill computed /
requested = 1 - hits / queries. It also times a best-of-N 16 request per block size (decode throughput), so a smaller
block is not bought with slower decoding. Reward FLOPs per round show whether the verifier's cost grows linearly with
depth (`ttc.flops.reward` over `ttc.rounds`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = ["Tom has 4 apples and gets 3 more. Then he gives away 2. How many apples does he have now?",
             "What is (25 + 33) * 8 - 59?",
             "A box holds 12 pens. Sara buys 7 boxes and gives 15 pens to her class. How many pens are left?"]
NO_CACHE = {"Cache-Control": "no-cache, no-store"}
MODEL = "smollm2-135m-instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def counters(worker: str) -> dict[str, float]:
    text = httpx.get(worker + "/metrics", timeout=10).text
    out: dict[str, float] = {}
    for name in ("prefix_cache_queries_total", "prefix_cache_hits_total", "prompt_tokens_total",
                 "generation_tokens_total"):
        m = re.search(rf"^vllm:{name}\{{[^}}]*\}} ([0-9.e+]+)$", text, re.M)
        out[name] = float(m.group(1)) if m else 0.0
    m = re.search(r'vllm:cache_config_info\{[^}]*block_size="(\d+)"', text)
    out["block_size"] = float(m.group(1)) if m else 0.0
    return out


def start_gateway(block_size: int, log: Path) -> tuple[subprocess.Popen, str, str]:
    port, wport, rport = free_port(), free_port(), free_port()
    env = dict(os.environ, TTC_PORT=str(port), TTC_POLICY__PORT=str(wport), TTC_REWARD__PORT=str(rport),
               TTC_POLICY__BLOCK_SIZE=str(block_size))
    proc = subprocess.Popen([sys.executable, "-m", "service", "serve"], env=env, cwd=REPO, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(base + "/ready", timeout=2).status_code == 200:
                return proc, base, f"http://127.0.0.1:{wport}"
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise TimeoutError("gateway not ready")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def run_one(base: str, worker: str, ttc: dict, question: str) -> dict:
    before = counters(worker)
    t0 = time.perf_counter()
    r = httpx.post(base + "/v1/chat/completions", headers=NO_CACHE, timeout=900, json={
        "model": MODEL, "messages": [{"role": "user", "content": question}], "max_tokens": 256, "seed": 7, "ttc": ttc})
    wall = time.perf_counter() - t0
    if r.status_code != 200:
        raise RuntimeError(f"{r.status_code}: {r.text}")
    after = counters(worker)
    body = r.json()["ttc"]
    queries = after["prefix_cache_queries_total"] - before["prefix_cache_queries_total"]
    hits = after["prefix_cache_hits_total"] - before["prefix_cache_hits_total"]
    return {"strategy": ttc["strategy"], "n": ttc.get("n"), "wall_s": round(wall, 2),
            "queried_tokens": queries, "hit_tokens": hits,
            "computed_over_requested": 1 - hits / queries if queries else None,
            "generated_tokens": after["generation_tokens_total"] - before["generation_tokens_total"],
            "rounds": body.get("rounds"), "policy_flops": body["flops"].get("policy"),
            "reward_flops": body["flops"].get("reward"), "policy_cached_reported": body["tokens"]["policy_cached"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--block-sizes", default="16,32,128")
    ap.add_argument("--strategies", default="beam_search,rebase")
    ap.add_argument("--ns", default="4,16")
    ap.add_argument("--questions", type=int, default=len(QUESTIONS))
    ap.add_argument("--out", default="benchmarks/results/prefix_reuse.json")
    args = ap.parse_args()
    results: dict = {"runs": []}
    t_start = time.monotonic()
    for bs in [int(x) for x in args.block_sizes.split(",")]:
        log = Path(f"/tmp/prefix_reuse_gateway_{bs}.log")
        proc, base, worker = start_gateway(bs, log)
        try:
            actual = counters(worker)["block_size"]
            rows = []
            for strategy in args.strategies.split(","):
                for n in [int(x) for x in args.ns.split(",")]:
                    for q in QUESTIONS[:args.questions]:
                        rows.append(run_one(base, worker, {"strategy": strategy, "n": n}, q))
                        print(bs, json.dumps(rows[-1]), flush=True)
            thr = run_one(base, worker, {"strategy": "best_of_n", "n": 16}, QUESTIONS[0])
            thr["tokens_per_s"] = thr["generated_tokens"] / thr["wall_s"]
            print(bs, "best_of_n 16:", json.dumps(thr), flush=True)
            results["runs"].append({"block_size": bs, "reported_block_size": actual, "searches": rows,
                                    "best_of_n_16": thr})
        finally:
            stop(proc)
    results["seconds"] = round(time.monotonic() - t_start)
    for run in results["runs"]:
        for strategy in args.strategies.split(","):
            for n in [int(x) for x in args.ns.split(",")]:
                sel = [r for r in run["searches"] if r["strategy"] == strategy and r["n"] == n]
                q = sum(r["queried_tokens"] for r in sel)
                h = sum(r["hit_tokens"] for r in sel)
                print(f"block {run['block_size']:>3}  {strategy:<11} N={n:<2}  computed/requested "
                      f"{1 - h / q if q else float('nan'):.2f}  ({h:.0f} of {q:.0f} prompt tokens from cache)")
        print(f"block {run['block_size']:>3}  best_of_n 16 decode {run['best_of_n_16']['tokens_per_s']:.1f} tok/s")
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out} in {results['seconds']} s")


if __name__ == "__main__":
    main()
