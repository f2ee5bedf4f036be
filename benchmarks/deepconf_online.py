"""DeepConf online early termination on the real policy worker: tokens and accuracy of real aborts against the
report-only mode, and how many tokens vLLM generates for a stream after the gateway closed it.

    python benchmarks/deepconf_online.py --dataset ../shared/datasets/arith_graded.jsonl --limit 12 --probe 10 \
        --window 8 --out benchmarks/results/deepconf_online.json --work-dir /tmp/deepconf_online

Starts the embedded policy worker alone (confidence needs no reward worker). Then:
- probe: `--probe` single stoppable samples, one at a time, each stopped at a fixed token; for each, how many tokens
  the worker's own `vllm:generation_tokens_total` counted beyond the stopping token (what ABORT_SLACK_TOKENS must
  cover) and whether the meter charged at least that;
- per problem (the seeded shuffle `calibrate` uses) and per eta: best-of-N (`--n`, default 16) with selection
  confidence, report-only then online, both seeded alike (online sample k has the seed of sample k of the
  report-only n=N call; vLLM-CPU's samples also depend on the batch, so the traces are not identical: the report
  says how often the warm-up confidences matched), one request at a time so the worker's counter delta belongs to
  that request. Per run: metered completion tokens, the counter delta, FLOPs, correctness, seconds.
Per-run results are cached as JSONL in the work dir; a rerun resumes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.offline.calibrate import load_pool  # noqa: E402
from service.offline.workers import gateway_settings, with_gateway  # noqa: E402
from service.workers.policy import ABORT_SLACK_TOKENS  # noqa: E402
from bench_runs import finished_runs, wilson, worker_port, write_report  # noqa: E402

MAX_TOKENS = 96
TEMPERATURE = 0.8


def counter(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:generation_tokens_total"))


async def settled_counter(url: str, previous: float | None = None) -> float:
    """The counter once the aborted requests' last steps are in (vLLM updates it per engine step)."""
    await asyncio.sleep(0.5)
    value = await asyncio.to_thread(counter, url)
    while previous is not None and value != previous:
        previous = value
        await asyncio.sleep(0.5)
        value = await asyncio.to_thread(counter, url)
    return value


async def probe(gw: Any, url: str, count: int, stop_at: int) -> list[dict[str, Any]]:
    from service.metering import Meter
    from service.prompts import math_messages
    from service.strategies.base import SamplingParams
    from service.workers.policy import MeteredPolicy

    prompt = await gw.policy.render_chat(math_messages("What is (25 + 33) * 8 - 59?"))
    out = []
    for k in range(count):
        meter = Meter()
        before = await settled_counter(url)
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=TEMPERATURE, top_logprobs=20, seed=1000 + k)
        seen = {"tokens": 0}

        def should_stop(i: int, top: Any) -> bool:
            seen["tokens"] += 1
            return seen["tokens"] >= stop_at

        c = (await MeteredPolicy(gw.policy, meter).generate_stoppable(prompt, params, 1, should_stop))[0]
        after = await settled_counter(url, before)
        out.append({"stopped_at": c.token_count, "finish": c.finish_reason, "engine": after - before,
                    "metered": meter.policy.completion_tokens, "beyond_stop": after - before - c.token_count})
        print("probe", out[-1], flush=True)
    return out


async def run_problem(gw: Any, url: str, row: dict[str, Any], n: int, etas: list[float], window: int, done: dict,
                      out: Any) -> None:
    from service.metering import Meter
    from service.prompts import math_messages, style_for
    from service.strategies import build_strategy
    from service.strategies.base import ComputeBudget, Problem
    from service.strategies.voting import answers_equivalent
    from service.workers.policy import MeteredPolicy

    pid, gold = row["id"], str(row["answer"])
    prompt = await gw.policy.render_chat(math_messages(row["question"], style_for(row.get("source", ""))))
    seed = 7 + int(pid.rsplit("-", 1)[-1]) if pid.rsplit("-", 1)[-1].isdigit() else 7
    for eta in etas:
        for online in (False, True):
            key = f"eta={eta:g} {'online' if online else 'report'}"
            if (pid, key) in done:
                continue
            meter = Meter()
            problem = Problem(prompt=prompt, question=row["question"], max_tokens=MAX_TOKENS,
                              temperature=TEMPERATURE, seed=seed)
            params = {"n": n, "selection": "confidence", "eta": eta, "online": online, "confidence_window": window}
            before = await settled_counter(url)
            t0 = time.monotonic()
            res = await build_strategy("best_of_n", params).run(problem, MeteredPolicy(gw.policy, meter), None,
                                                                ComputeBudget(None, lambda: meter.total_flops))
            seconds = time.monotonic() - t0
            after = await settled_counter(url, before)
            o = res.details.get("online") or {}
            rec = {"id": pid, "key": key, "level": row.get("level"), "gold": gold, "answer": res.answer,
                   "correct": answers_equivalent(res.answer, gold), "metered_tokens": meter.policy.completion_tokens,
                   "engine_tokens": after - before, "flops": meter.total_flops,
                   "prompt_tokens": meter.policy.prompt_tokens, "cached_tokens": meter.policy.cached_tokens, "seconds": round(seconds, 2),
                   "samples": res.samples, "voters": res.details.get("candidates"),
                   "threshold": o.get("threshold"), "would_stop": o.get("would_stop"),
                   "tokens_saved_if_aborted": o.get("tokens_saved_if_aborted"),
                   "aborted": o.get("samples_aborted"), "aborted_at": o.get("aborted_at"),
                   "confidences": res.details.get("confidences")}
            done[(pid, key)] = rec
            out.write(json.dumps(rec) + "\n")
            out.flush()
            print(key, pid, {k: rec[k] for k in ("correct", "metered_tokens", "engine_tokens", "aborted", "seconds",
                                                 "prompt_tokens", "cached_tokens", "flops")},
                  flush=True)


def report(rows: list[dict[str, Any]], done: dict, etas: list[float], probes: list[dict[str, Any]],
           window: int) -> dict:
    table: dict[str, Any] = {}
    for eta in etas:
        for mode in ("report", "online"):
            key = f"eta={eta:g} {mode}"
            recs = [done[(r["id"], key)] for r in rows if (r["id"], key) in done]
            if not recs:
                continue
            k = sum(r["correct"] for r in recs)
            table[key] = {
                "problems": len(recs), "accuracy": k / len(recs), "ci95": wilson(k, len(recs)),
                "mean_metered_tokens": sum(r["metered_tokens"] for r in recs) / len(recs),
                "mean_engine_tokens": sum(r["engine_tokens"] for r in recs) / len(recs),
                "max_engine_minus_metered": max(r["engine_tokens"] - r["metered_tokens"] for r in recs),
                "mean_flops": sum(r["flops"] for r in recs) / len(recs),
                "mean_seconds": sum(r["seconds"] for r in recs) / len(recs),
                "mean_aborted": (sum(r["aborted"] or 0 for r in recs) / len(recs)) if mode == "online" else None,
                # Metered = received + ABORT_SLACK_TOKENS per aborted sample (below max_tokens): what the worker
                # counted beyond what the gateway had received, at most (max over requests).
                "max_engine_minus_received": max(r["engine_tokens"] - r["metered_tokens"]
                                                 + ABORT_SLACK_TOKENS * (r["aborted"] or 0) for r in recs),
                "mean_prompt_tokens": sum(r["prompt_tokens"] for r in recs) / len(recs),
                "mean_cached_tokens": sum(r["cached_tokens"] for r in recs) / len(recs),
                "mean_would_stop": (sum(r["would_stop"] or 0 for r in recs) / len(recs)) if mode == "report" else None,
                "mean_tokens_saved_if_aborted": (sum(r["tokens_saved_if_aborted"] or 0 for r in recs) / len(recs))
                if mode == "report" else None,
            }
    # Same traces? Seeded alike, the warm-up samples would be the report-only draws if sampling ignored the batch.
    same = []
    for eta in etas:
        for r in rows:
            a, b = done.get((r["id"], f"eta={eta:g} report")), done.get((r["id"], f"eta={eta:g} online"))
            if a and b and a["confidences"] and b["confidences"]:
                same.append(a["confidences"][:4] == b["confidences"][:4])
    return {"max_tokens": MAX_TOKENS, "temperature": TEMPERATURE, "window": window, "strategies": table,
            "warmup_confidences_equal": f"{sum(same)}/{len(same)}", "probe": {
        "samples": len(probes), "max_beyond_stop": max((p["beyond_stop"] for p in probes), default=None),
        "mean_beyond_stop": sum(p["beyond_stop"] for p in probes) / len(probes) if probes else None,
        "metered_below_engine": sum(p["metered"] < p["engine"] for p in probes)}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--etas", default="10,90")
    # The bundled model's answers are often shorter than the default 32-token window, and a trace shorter than one
    # window is never stopped.
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--probe", type=int, default=20)
    ap.add_argument("--probe-stop-at", type=int, default=10)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work-dir", default="/tmp/deepconf_online")
    ap.add_argument("--policy-port", type=int, default=0)
    args = ap.parse_args()
    etas = [float(x) for x in args.etas.split(",")]
    rows = load_pool([args.dataset])[: args.limit]
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    path, probe_path = work / "results.jsonl", work / "probe.json"
    done = finished_runs(path)
    probes = json.loads(probe_path.read_text()) if probe_path.exists() else []

    async def work_fn(gw: Any) -> None:
        url = gw.policy_pool.endpoints[0].url
        if len(probes) < args.probe:
            probes.extend(await probe(gw, url, args.probe - len(probes), args.probe_stop_at))
            probe_path.write_text(json.dumps(probes))
        with open(path, "a") as out:
            for i, row in enumerate(rows):
                await run_problem(gw, url, row, args.n, etas, args.window, done, out)
                print(f"{i + 1}/{len(rows)} problems", flush=True)

    keys = [f"eta={e:g} {m}" for e in etas for m in ("report", "online")]
    if len(probes) < args.probe or not all((r["id"], k) in done for r in rows for k in keys):
        port = worker_port(args.policy_port)
        asyncio.run(with_gateway(gateway_settings("arith", port, port + 1), work_fn))
    result = report(rows, done, etas, probes, args.window)
    write_report(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
