"""Particle filtering against beam search, REBASE and best-of-N, and DeepConf confidence as a verifier, on real workers.

    python benchmarks/pf_confidence.py --dataset ../shared/datasets/arith_graded.jsonl --limit 30 \
        --out benchmarks/results/pf_confidence.json --work-dir /tmp/pfconf

Starts the embedded policy worker (no reward worker: the verifiers are the free calculator `arith` and the policy's
own confidence), then per problem:
- one best-of-8 draw (temperature 0.8, 96 tokens, top-20 log-probabilities with the samples): best-of-N at N = 4
  and 8 (the first N samples) by majority, weighted `arith` vote and DeepConf's confidence vote (eta 90 and 50), and
  per sample the AUROC of each score against final-answer correctness, over all samples and within problems;
- the searches (n = 4 unless named) through the same code the gateway serves, unbudgeted, FLOPs from the meter.
Problems are the seeded shuffle `calibrate` uses, skipping the first `--skip`. Per-problem results are cached as
JSONL in the work dir; a rerun resumes. FLOPs are the meter's total per request (prompt prefill included).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.offline.calibrate import load_pool  # noqa: E402
from service.offline.workers import gateway_settings, with_gateway  # noqa: E402
from service.rewards.confidence import token_confidences, trace_confidence  # noqa: E402
from bench_runs import finished_runs, wilson, worker_port, write_report  # noqa: E402

N_DRAW = 8
MAX_TOKENS = 96
TEMPERATURE = 0.8
SEARCHES = [  # (label, backend, strategy, params)
    ("particle_filtering n=4", "arith", "particle_filtering", {"n": 4}),
    ("particle_filtering n=8", "arith", "particle_filtering", {"n": 8}),
    ("particle_filtering n=4 [confidence*arith]", "confidence*arith", "particle_filtering", {"n": 4}),
    ("beam_search n=4 M=2", "arith", "beam_search", {"n": 4, "beam_width": 2}),
    ("rebase n=4", "arith", "rebase", {"n": 4}),
]
SCORES = ("arith", "conf_lowest_group", "conf_tail", "conf_mean", "conf_bottom10")


def auroc(pos: list[float], neg: list[float]) -> float | None:
    if not pos or not neg:
        return None
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


async def run_problem(gw: Any, row: dict[str, Any], done: dict, out: Any, sem: asyncio.Semaphore) -> None:
    from service.metering import Meter
    from service.prompts import math_messages, style_for
    from service.rewards import ArithmeticReward
    from service.strategies import build_strategy
    from service.strategies.base import ComputeBudget, Problem, SamplingParams
    from service.strategies.steps import split_steps
    from service.strategies.voting import answers_equivalent, extract_answer
    from service.workers.policy import MeteredPolicy

    pid, gold = row["id"], str(row["answer"])
    todo = [s for s in SEARCHES if (pid, s[0]) not in done]
    if (pid, "draw") in done and not todo:
        return
    async with sem:
        prompt = await gw.policy.render_chat(math_messages(row["question"], style_for(row.get("source", ""))))

        def write(key: str, rec: dict[str, Any]) -> None:
            rec = {"id": pid, "key": key, "level": row.get("level"), "gold": gold, **rec}
            done[(pid, key)] = rec
            out.write(json.dumps(rec) + "\n")
            out.flush()

        if (pid, "draw") not in done:
            meter = Meter()
            policy = MeteredPolicy(gw.policy, meter)
            samples = (await policy.generate([prompt], SamplingParams(max_tokens=MAX_TOKENS, temperature=TEMPERATURE,
                                                                      top_logprobs=20), N_DRAW))[0]
            arith = await ArithmeticReward().score(row["question"], [split_steps(c.text, "\n") for c in samples])
            recs = []
            for c, a in zip(samples, arith):
                conf = token_confidences(c)
                answer = extract_answer(c.text)
                recs.append({"answer": answer, "correct": answers_equivalent(answer, gold), "tokens": c.token_count,
                             "arith": a[-1] if a else 0.0,
                             **{f"conf_{m}": trace_confidence(conf, m, 32, 32)
                                for m in ("lowest_group", "tail", "mean", "bottom10")}})
            write("draw", {"samples": recs, "flops": meter.total_flops})

        async def search(label: str, backend: str, name: str, params: dict[str, Any]) -> None:
            meter = Meter()
            gw.settings.reward_backend = backend  # read per call by reward_for; one backend per search
            reward = gw.reward_for(meter, "bench")
            problem = Problem(prompt=prompt, question=row["question"], max_tokens=MAX_TOKENS, temperature=TEMPERATURE)
            t0 = time.monotonic()
            res = await build_strategy(name, params).run(problem, MeteredPolicy(gw.policy, meter), reward,
                                                         ComputeBudget(None, lambda: meter.total_flops))
            write(label, {"answer": res.answer, "correct": answers_equivalent(res.answer, gold),
                          "flops": meter.total_flops, "seconds": time.monotonic() - t0,
                          "rounds": res.details.get("rounds")})

        for s in todo:  # sequential per problem: `reward_backend` is switched per search
            await search(*s)


def vote(samples: list[dict[str, Any]], how: str, eta: float = 100.0) -> bool:
    from service.strategies.voting import Candidate, select

    if how == "confidence":
        keep = max(1, math.ceil(eta / 100 * len(samples)))
        samples = sorted(samples, key=lambda s: -s["conf_lowest_group"])[:keep]
    cands = [Candidate(text="", answer=s["answer"],
                       score={"majority": 1.0, "weighted": s["arith"], "confidence": s["conf_lowest_group"]}[how])
             for s in samples]
    chosen = select(cands, "majority" if how == "majority" else "weighted").candidate
    return next(s["correct"] for s in samples if s["answer"] == chosen.answer) if chosen.answer else False


def adaptive_replay(samples: list[dict[str, Any]], tau: float, warmup: int = 2, eta: float = 90) -> list[dict]:
    """The samples best_of_n's adaptive confidence mode would have drawn (batches of `warmup`, see best_of_n.py)."""
    from service.rewards.confidence import consensus, warmup_threshold
    from service.strategies.voting import answers_equivalent

    drawn: list[dict[str, Any]] = []
    threshold = None
    while len(drawn) < len(samples):
        drawn = samples[: len(drawn) + warmup]
        if threshold is None:
            threshold = warmup_threshold([s["conf_lowest_group"] for s in drawn], eta)
        weights: dict[str, float] = {}
        for k, s in enumerate(drawn):
            if s["answer"] is None or (k >= warmup and s["conf_lowest_group"] < threshold):
                continue
            key = next((a for a in weights if answers_equivalent(a, s["answer"])), s["answer"])
            weights[key] = weights.get(key, 0.0) + s["conf_lowest_group"]
        if weights and consensus(weights) >= tau:
            break
    return drawn


def report(rows: list[dict[str, Any]], done: dict) -> dict[str, Any]:
    ids = [r["id"] for r in rows if (r["id"], "draw") in done]
    table: dict[str, dict[str, float]] = {}
    for n in (4, 8):
        for how, eta in (("majority", 100), ("weighted", 100), ("confidence", 90), ("confidence", 50)):
            label = f"best_of_n n={n} {how}" + (f" eta={eta}" if how == "confidence" else "") + \
                (" [arith]" if how == "weighted" else "")
            hits = [vote(done[(i, "draw")]["samples"][:n], how, eta) for i in ids]
            flops = [done[(i, "draw")]["flops"] * n / N_DRAW for i in ids]
            table[label] = {"accuracy": sum(hits) / len(ids), "ci95": wilson(sum(hits), len(ids)),
                            "mean_flops": sum(flops) / len(ids), "problems": len(ids)}
        hits = [any(s["correct"] for s in done[(i, "draw")]["samples"][:n]) for i in ids]
        table[f"oracle pass@{n}"] = {"accuracy": sum(hits) / len(ids), "ci95": wilson(sum(hits), len(ids)),
                                     "mean_flops": None, "problems": len(ids)}
    for label, *_ in SEARCHES:
        recs = [done[(i, label)] for i in ids if (i, label) in done]
        if recs:
            k = sum(r["correct"] for r in recs)
            table[label] = {"accuracy": k / len(recs), "ci95": wilson(k, len(recs)),
                            "mean_flops": sum(r["flops"] for r in recs) / len(recs), "problems": len(recs)}
    for tau in (0.8, 0.95):  # adaptive sampling replayed on the recorded draws (the strategy's rule)
        used, hits = [], []
        for i in ids:
            drawn = adaptive_replay(done[(i, "draw")]["samples"], tau)
            used.append(len(drawn))
            hits.append(vote(drawn, "confidence", 90))
        table[f"best_of_n n<=8 confidence eta=90 adaptive tau={tau} (replay, warmup 2)"] = {
            "accuracy": sum(hits) / len(ids), "ci95": wilson(sum(hits), len(ids)), "mean_samples": sum(used) / len(ids),
            "mean_flops": sum(done[(i, "draw")]["flops"] * u / N_DRAW for i, u in zip(ids, used)) / len(ids),
            "problems": len(ids)}
    samples = [s for i in ids for s in done[(i, "draw")]["samples"]]
    aurocs: dict[str, dict[str, Any]] = {}
    for score in SCORES:
        overall = auroc([s[score] for s in samples if s["correct"]], [s[score] for s in samples if not s["correct"]])
        within = [a for i in ids if (a := auroc([s[score] for s in done[(i, "draw")]["samples"] if s["correct"]],
                                                 [s[score] for s in done[(i, "draw")]["samples"]
                                                  if not s["correct"]])) is not None]
        aurocs[score] = {"overall": overall, "within_mean": sum(within) / len(within) if within else None,
                         "within_problems": len(within)}
    return {"problems": len(ids), "samples": len(samples), "per_sample_accuracy": sum(s["correct"] for s in samples)
            / max(1, len(samples)), "strategies": table, "auroc": aurocs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--limit", type=int, default=30)
    ap.add_argument("--skip", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work-dir", default="/tmp/pfconf")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--policy-port", type=int, default=0, help="embedded worker port (default: a free one)")
    args = ap.parse_args()
    rows = load_pool([args.dataset])[args.skip:args.skip + args.limit]
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    path = work / "results.jsonl"
    done = finished_runs(path)

    async def work_fn(gw: Any) -> None:
        sem = asyncio.Semaphore(args.concurrency)
        t0 = time.monotonic()
        with open(path, "a") as out:
            finished = 0

            async def go(row: dict[str, Any]) -> None:
                nonlocal finished
                await run_problem(gw, row, done, out, sem)
                finished += 1
                print(f"{finished}/{len(rows)} problems, {time.monotonic() - t0:.0f} s", flush=True)

            await asyncio.gather(*(go(r) for r in rows))

    if not all((r["id"], k) in done for r in rows for k in ["draw"] + [s[0] for s in SEARCHES]):
        port = worker_port(args.policy_port)
        settings = gateway_settings("arith", port, port + 1)
        asyncio.run(with_gateway(settings, work_fn))
    result = report(rows, done)
    write_report(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
