"""Gateway overhead and engine use, measured in one run against a running service.

    python benchmarks/loadtest.py --gateway http://127.0.0.1:8000 [--requests 64] [--concurrency 1,8,32]

1. Pass-through: the same prompts at the same concurrency, once through the gateway and once straight to the vLLM
   policy worker it uses (found via /ready); prints p50/p99 latency and tokens/s for both and their ratios, plus the
   gateway process's own CPU time per request (from /proc).
2. Search efficiency: beam search and REBASE requests; per request the prefill tokens requested vs computed (prefix
   cache hits), policy and PRM calls per round, wall time per round.
3. Concurrency across requests: problems per minute for best-of-N 16 and beam search 16 at concurrency 1 vs 8.
Writes the figures as JSON (--out) so reruns show regressions.

    python benchmarks/loadtest.py --gateway URL --overhead-pairs 200 [--overhead-concurrency 1,32]

Overhead mode (runs instead of 1-3): the gateway's added latency on 1-token pass-through chat requests (strategy
none, `max_tokens: 1`). Per concurrency c, c lanes each alternate one request through the gateway and one straight
to its worker, so machine noise hits both sides; a lane's pairs swap which side goes first. Prints p50 and p99 of
the per-pair difference and of each side, with 95% intervals from a bootstrap over pairs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

import httpx
import numpy as np

PROMPTS = [f"Write one sentence about the number {i}." for i in range(64)]
QUESTIONS = ["Tom has 4 apples and gets 3 more. How many apples does he have now?",
             "Sara has 9 bags of 31 coins and loses 2 coins. How many coins are left?",
             "What is (25 + 33) * 8 - 59?", "A box holds 12 pens. How many pens are in 7 boxes?"]
# Measure the engine, not the gateway's caches (sample pool, PRM scores, responses).
NO_CACHE = {"Cache-Control": "no-cache, no-store"}
DEFAULT_OUT = "benchmarks/results/loadtest.json"
SYSTEM = "Solve the problem step by step, one calculation per line, and end with 'The answer is N.'"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def drive(base: str, model: str, n_requests: int, concurrency: int, max_tokens: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    tokens = 0

    async def one(client: httpx.AsyncClient, i: int) -> None:
        nonlocal tokens
        # Same prompt, same sampling on both paths; the stop string that never appears is only there so both
        # paths carry identical bodies (the gateway rejects vLLM-only fields such as ignore_eos).
        # A seed per request index: both paths sample the same tokens, so their token counts (and work) match and
        # tokens/s compares like with like (unseeded, output lengths differed by up to 10% between runs).
        body = {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0.8,
                "stop": ["never-appears"], "seed": 1000 + i}
        async with sem:
            t = time.perf_counter()
            # Seeded requests are cacheable: bypass the gateway's response cache, or it would answer from memory.
            r = await client.post(base + "/v1/completions", json=body, headers=NO_CACHE)
            latencies.append(time.perf_counter() - t)
            r.raise_for_status()
            tokens += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        started = time.perf_counter()
        await asyncio.gather(*(one(client, i) for i in range(n_requests)))
        wall = time.perf_counter() - started
    return {"p50_s": statistics.median(latencies), "p99_s": pct(latencies, 0.99), "tokens_per_s": tokens / wall,
            "wall_s": wall, "requests": n_requests}


async def passthrough(gateway: str, worker: str, model: str, gw_pid: int | None, args) -> list[dict]:
    """Per concurrency, `--repeats` pairs of runs (gateway, direct) in alternating order, so drift of the shared
    machine and warm caches do not favour one path; ratios are per pair, reported as median and range."""
    rows = []
    for c in args.concurrency:
        await drive(worker, model, min(8, args.requests), c, args.max_tokens)  # warm both paths alike
        pairs = []
        for rep in range(args.repeats):
            order = ("gateway", "direct") if rep % 2 == 0 else ("direct", "gateway")
            got: dict[str, dict] = {}
            for path in order:
                cpu0 = cpu_seconds(gw_pid) if gw_pid and path == "gateway" else None
                got[path] = await drive(gateway if path == "gateway" else worker, model, args.requests, c,
                                        args.max_tokens)
                if cpu0 is not None:
                    got[path]["cpu_ms_per_request"] = 1000 * (cpu_seconds(gw_pid) - cpu0) / args.requests
            via_gw, direct = got["gateway"], got["direct"]
            pairs.append({"gateway": via_gw, "direct": direct,
                          "p50_added_ms": 1000 * (via_gw["p50_s"] - direct["p50_s"]),
                          "p50_ratio": via_gw["p50_s"] / direct["p50_s"], "p99_ratio": via_gw["p99_s"] / direct["p99_s"],
                          "throughput_ratio": via_gw["tokens_per_s"] / direct["tokens_per_s"],
                          "gateway_cpu_ms_per_request": via_gw.get("cpu_ms_per_request")})
        row = {"concurrency": c, "repeats": len(pairs), "pairs": pairs}
        for key in ("p50_added_ms", "p50_ratio", "p99_ratio", "throughput_ratio", "gateway_cpu_ms_per_request"):
            vals = [p[key] for p in pairs if p[key] is not None]
            row[key] = statistics.median(vals) if vals else None
            row[key + "_range"] = [min(vals), max(vals)] if vals else None
        # Kept for the plot and older readers: the median pair's absolute figures.
        mid = sorted(pairs, key=lambda p: p["throughput_ratio"])[len(pairs) // 2]
        row["gateway"], row["direct"] = mid["gateway"], mid["direct"]
        rows.append(row)
        tr = row["throughput_ratio_range"]
        print(f"c={c:>2}  p50 gw/direct {row['p50_ratio']:.3f} (+{row['p50_added_ms']:.1f} ms)  "
              f"p99 {row['p99_ratio']:.3f}  throughput {row['throughput_ratio']:.3f} [{tr[0]:.3f}-{tr[1]:.3f}]  "
              f"gateway CPU {row['gateway_cpu_ms_per_request'] or float('nan'):.2f} ms/request "
              f"(median of {len(pairs)} alternating pairs)", flush=True)
    return rows


async def search_efficiency(gateway: str, model: str) -> list[dict]:
    rows = []
    async with httpx.AsyncClient(timeout=900) as client:
        for ttc in ({"strategy": "beam_search", "n": 8, "beam_width": 2}, {"strategy": "rebase", "n": 8}):
            for q in QUESTIONS[:2]:
                body = {"model": model, "max_tokens": 96, "ttc": ttc,
                        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]}
                t = time.perf_counter()
                r = await client.post(gateway + "/v1/chat/completions", json=body, headers=NO_CACHE)
                wall = time.perf_counter() - t
                r.raise_for_status()
                info = r.json()["ttc"]
                details = info.get("details") or {}
                rounds = max(1, details.get("rounds") or 1)
                tok = info["tokens"]
                row = {"strategy": ttc["strategy"], "question": q[:40], "rounds": rounds,
                       "prefill_requested": tok["policy_prompt"], "prefill_cached": tok["policy_cached"],
                       "prefix_hit_rate": tok["policy_cached"] / max(1, tok["policy_prompt"]),
                       "generate_calls_per_round": details.get("generate_calls", 0) / rounds,
                       "policy_requests_per_round": info["calls"]["policy"] / rounds,
                       "reward_calls_per_round": info["calls"]["reward"] / rounds,
                       "wall_s_per_round": wall / rounds, "flops": info["flops"]["total"]}
                rows.append(row)
                print(f"{row['strategy']:<12} rounds {rounds:>2}  prefill {tok['policy_prompt']:>6} requested, "
                      f"{tok['policy_cached']:>6} from prefix cache ({100 * row['prefix_hit_rate']:.0f}%)  "
                      f"generate calls/round {row['generate_calls_per_round']:.2f} (engine requests "
                      f"{row['policy_requests_per_round']:.2f})  PRM calls/round "
                      f"{row['reward_calls_per_round']:.2f}  {row['wall_s_per_round']:.2f} s/round", flush=True)
    return rows


async def problems_per_minute(gateway: str, model: str, n_problems: int) -> list[dict]:
    rows = []
    for ttc in ({"strategy": "best_of_n", "n": 16}, {"strategy": "beam_search", "n": 16, "beam_width": 4}):
        for c in (1, 8):
            sem = asyncio.Semaphore(c)

            async def one(client: httpx.AsyncClient, i: int) -> None:
                body = {"model": model, "max_tokens": 96, "ttc": ttc,
                        "messages": [{"role": "system", "content": SYSTEM},
                                     {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + f" (#{i})"}]}
                async with sem:
                    r = await client.post(gateway + "/v1/chat/completions", json=body, headers=NO_CACHE)
                    r.raise_for_status()

            async with httpx.AsyncClient(timeout=1800) as client:
                t = time.perf_counter()
                await asyncio.gather(*(one(client, i) for i in range(n_problems)))
                wall = time.perf_counter() - t
            row = {"strategy": ttc["strategy"], "n": 16, "concurrency": c, "problems_per_minute": 60 * n_problems / wall}
            rows.append(row)
            print(f"{ttc['strategy']:<12} N=16 concurrency {c}: {row['problems_per_minute']:.2f} problems/min",
                  flush=True)
    return rows


# Overhead mode. A 1-token chat request: what the gateway adds is then most of the difference, not lost in decode.
OVERHEAD_BODY_TEXT = "Say hi."
QUANTILES = (0.5, 0.99)


def pair_summary(gateway_s, direct_s, n_boot: int = 2000, seed: int = 0) -> dict:
    """Milliseconds. Quantiles of the per-pair difference and of each side, and the gap between the sides' own
    quantiles, all with intervals from one bootstrap over pairs (a resampled pair keeps both of its requests, so
    the sides' intervals and the gaps see the same resamples)."""
    gw = 1000 * np.asarray(gateway_s, dtype=float)
    direct = 1000 * np.asarray(direct_s, dtype=float)
    if gw.shape != direct.shape or gw.ndim != 1 or len(gw) < 2:
        raise ValueError("need two equally long sequences of at least 2 latencies, one entry per pair")
    idx = np.random.default_rng(seed).integers(0, len(gw), size=(n_boot, len(gw)))
    series = {"difference": gw - direct, "gateway": gw, "direct": direct}
    out: dict = {"pairs": len(gw)}
    boot_q = {}
    for name, v in series.items():
        boot_q[name] = np.quantile(v[idx], QUANTILES, axis=1)
        out[name] = {f"p{round(100 * q)}_ms": _interval(float(np.quantile(v, q)), b)
                     for q, b in zip(QUANTILES, boot_q[name])}
    out["side_gap"] = {f"p{round(100 * q)}_ms": _interval(
        float(np.quantile(gw, q) - np.quantile(direct, q)), boot_q["gateway"][i] - boot_q["direct"][i])
        for i, q in enumerate(QUANTILES)}
    out["difference"]["mean_ms"] = float(np.mean(series["difference"]))
    return out


def _interval(value: float, boot: np.ndarray) -> dict[str, float]:
    return {"value": value, "lo": float(np.percentile(boot, 2.5)), "hi": float(np.percentile(boot, 97.5))}


async def overhead_lanes(gateway: str, worker: str, model: str, pairs: int, concurrency: int,
                         warmup: int = 4, think_s: float = 0.0) -> tuple[list[float], list[float], list[bool]]:
    """At least `pairs` (gateway, direct) latency pairs in seconds from `concurrency` lanes running at once, and
    whether the gateway went first in each; a lane alternates the two sides and swaps which one goes first every
    pair. `think_s`: each request waits a random 0..think_s first, so lanes do not move in lockstep with the
    engine's batches (in lockstep, a request arriving 1 ms after its batch started waits a whole engine step).
    aiohttp, one session per side: httpx's pool scan costs the client more CPU per request as connections grow,
    and the client shares the cores too."""
    import random

    import aiohttp

    per_lane = -(-pairs // concurrency)
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": OVERHEAD_BODY_TEXT}],
                       "max_tokens": 1}).encode()
    headers = {"content-type": "application/json", "x-ttc-strategy": "none", **NO_CACHE}
    gw_lat: list[float] = []
    direct_lat: list[float] = []
    gateway_first: list[bool] = []
    connector = dict(limit=concurrency + 4, keepalive_timeout=2.0)  # under the workers' 5 s keep-alive

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(**connector)) as via_gw, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(**connector)) as direct:
        sides = {"gateway": (via_gw, gateway), "direct": (direct, worker)}

        async def timed(side: str) -> float:
            session, base = sides[side]
            t = time.perf_counter()
            async with session.post(base + "/v1/chat/completions", data=body, headers=headers) as r:
                await r.read()
                elapsed = time.perf_counter() - t
                if r.status != 200:
                    raise RuntimeError(f"{side} answered {r.status}: {(await r.text())[:300]}")
            return elapsed

        async def lane(k: int) -> None:
            rng = random.Random(k)

            async def after_thinking(side: str) -> float:
                if think_s > 0:
                    await asyncio.sleep(rng.uniform(0.0, think_s))
                return await timed(side)

            for _ in range(warmup):  # open and warm this lane's connections on both sides
                await after_thinking("gateway")
                await after_thinking("direct")
            for i in range(per_lane):
                order = ("gateway", "direct") if (i + k) % 2 == 0 else ("direct", "gateway")
                got = {side: await after_thinking(side) for side in order}
                gw_lat.append(got["gateway"])
                direct_lat.append(got["direct"])
                gateway_first.append(order[0] == "gateway")

        await asyncio.gather(*(lane(k) for k in range(concurrency)))
    return gw_lat, direct_lat, gateway_first


async def overhead(gateway: str, worker: str, model: str, gw_pid: int | None, args) -> list[dict]:
    rows = []
    for c in args.overhead_concurrency:
        load_before = os.getloadavg()
        cpu0 = cpu_seconds(gw_pid) if gw_pid else None
        t = time.perf_counter()
        gw_lat, direct_lat, first = await overhead_lanes(gateway, worker, model, args.overhead_pairs, c,
                                                         think_s=args.overhead_think_ms / 1000)
        wall = time.perf_counter() - t
        row = {"concurrency": c, "think_ms": args.overhead_think_ms, "wall_s": wall, "loadavg_before": load_before,
               "loadavg_after": os.getloadavg(), **pair_summary(gw_lat, direct_lat, seed=c),
               "gateway_s": gw_lat, "direct_s": direct_lat, "gateway_first": first}
        if cpu0 is not None:
            # Includes the warm-up requests and the health loop: an upper bound per request.
            row["gateway_cpu_ms_per_request"] = 1000 * (cpu_seconds(gw_pid) - cpu0) / (len(gw_lat) + 4 * c)
        rows.append(row)
        print(format_overhead(row), flush=True)
    return rows


def format_overhead(row: dict) -> str:
    def q(d: dict) -> str:
        return f"{d['value']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]"

    def side(d: dict) -> str:
        return f"{d['value']:.2f} [{d['lo']:.2f}, {d['hi']:.2f}]"

    la = row["loadavg_before"]
    lines = [f"c={row['concurrency']:>2}: {row['pairs']} pairs, {row['wall_s']:.1f} s, load average before "
             f"{la[0]:.2f} {la[1]:.2f} {la[2]:.2f}, after {row['loadavg_after'][0]:.2f}"
             + (f", gateway CPU {row['gateway_cpu_ms_per_request']:.2f} ms/request"
                if row.get("gateway_cpu_ms_per_request") is not None else "")]
    for name, label in (("difference", "gateway - direct, per pair"), ("side_gap", "gateway pXX - direct pXX"),
                        ("gateway", "gateway"), ("direct", "direct")):
        fmt = q if name in ("difference", "side_gap") else side
        d = row[name]
        lines.append(f"  {label:<28} p50 {fmt(d['p50_ms'])} ms   p99 {fmt(d['p99_ms'])} ms")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Tokens/s through the gateway and straight to the worker, per concurrency level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["passthrough"]
    xs = [r["concurrency"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(xs, [r["direct"]["tokens_per_s"] for r in rows], "o-", label="vLLM worker directly")
    ax.plot(xs, [r["gateway"]["tokens_per_s"] for r in rows], "s--", label="through ttc-gateway")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("generated tokens / s")
    ax.set_title("Pass-through throughput, one run")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gateway", default="http://127.0.0.1:8000")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="alternating gateway/direct pairs per concurrency")
    ap.add_argument("--problems", type=int, default=8, help="problems per strategy for problems/minute")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: passthrough,search,throughput")
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--plot-from", help="only redraw the plot from an earlier results JSON")
    ap.add_argument("--overhead-pairs", type=int, default=0,
                    help="overhead mode: at least this many 1-token gateway/direct pairs per concurrency")
    ap.add_argument("--overhead-concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32])
    ap.add_argument("--overhead-think-ms", type=float, default=0.0,
                    help="overhead mode: each request first waits a random 0..this many ms (breaks lockstep)")
    ap.add_argument("--worker", help="the direct side (default: the gateway's first policy worker, from /ready)")
    args = ap.parse_args()
    if args.plot_from:
        plot(json.loads(Path(args.plot_from).read_text()), Path(args.plot_from).with_suffix(".png"))
        return
    ready = httpx.get(args.gateway + "/ready", timeout=10).json()
    worker = args.worker or ready["pools"]["policy"]["workers"][0]["url"]
    model = ready["pools"]["policy"]["model"]
    results = {"machine": {"cpus": os.cpu_count()}, "args": vars(args), "time": time.time()}
    if args.overhead_pairs:
        results["overhead"] = await overhead(args.gateway, worker, model, ready.get("pid"), args)
        out = args.out if args.out != DEFAULT_OUT else "benchmarks/results/loadtest_overhead.json"
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=2))
        print(f"wrote {out}")
        return
    skip = set(args.skip.split(","))
    if "passthrough" not in skip:
        results["passthrough"] = await passthrough(args.gateway, worker, model, ready.get("pid"), args)
    if "search" not in skip:
        results["search_efficiency"] = await search_efficiency(args.gateway, model)
    if "throughput" not in skip:
        results["problems_per_minute"] = await problems_per_minute(args.gateway, model, args.problems)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    if "passthrough" in results:
        plot(results, Path(args.out).with_suffix(".png"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    asyncio.run(main())
