"""Particle filtering against beam search, DVTS, REBASE and best-of-N, and DeepConf confidence beside the learned PRM
and the calculator as verifiers, on real workers.

    python benchmarks/pf_confidence.py --dataset ../shared/datasets/arith_graded.jsonl --limit 36 \
        --out benchmarks/results/pf_confidence.json --work-dir /tmp/pfconf2

Starts the embedded policy and reward workers, then per problem:
- one best-of-8 draw (temperature 0.8, 96 tokens, top-20 log-probabilities with the samples), every sample's steps
  scored by the calculator `arith` and the learned PRM head `prm` in one pass (the gateway's MeteredPRM, as `bank`
  does; `prm*arith` is their step-wise product). Best-of-N at N = 1, 2, 4, 8 (the first N samples) by majority,
  weighted vote (`arith`, `prm`, `prm*arith`) and DeepConf's confidence vote (eta 90 and 50); per sample the AUROC of
  each score against final-answer correctness, over all samples and within problems (95% intervals resampling
  problems), also restricted to the problems the PRM head was not trained on (`train_prm.select_problems` rebuilt
  from the head's own metadata);
- the searches (n = 4 unless named) through the same code the gateway serves, unbudgeted, FLOPs from the meter.
Problems are the seeded shuffle `calibrate` uses, skipping the first `--skip`. Per-problem results are cached as
JSONL in the work dir; a rerun resumes. FLOPs are the meter's total per request (prompt prefill included); best-of-N
rows are charged N/8 of the draw's policy FLOPs, plus N/8 of the PRM call when they use `prm`. The accuracy-vs-FLOPs
plot (Wilson 95% bars) goes next to --out as .png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from service.offline.calibrate import load_pool  # noqa: E402
from service.offline.workers import gateway_settings, with_gateway  # noqa: E402
from service.rewards.confidence import token_confidences, trace_confidence  # noqa: E402
from bench_runs import finished_runs, save_plot, wilson, worker_port, write_report  # noqa: E402

N_DRAW = 8
BON_NS = (1, 2, 4, 8)
MAX_TOKENS = 96
TEMPERATURE = 0.8
SEARCHES = [  # (label, backend, strategy, params)
    ("particle_filtering n=4", "arith", "particle_filtering", {"n": 4}),
    ("particle_filtering n=8", "arith", "particle_filtering", {"n": 8}),
    ("particle_filtering n=4 [confidence*arith]", "confidence*arith", "particle_filtering", {"n": 4}),
    ("beam_search n=4 M=2", "arith", "beam_search", {"n": 4, "beam_width": 2}),
    ("dvts n=4 M=2", "arith", "dvts", {"n": 4, "beam_width": 2}),
    ("rebase n=4", "arith", "rebase", {"n": 4}),
]
SCORES = ("arith", "prm", "prm*arith", "conf_lowest_group", "conf_tail", "conf_mean", "conf_bottom10")
WEIGHTED = ("arith", "prm", "prm*arith")  # best-of-N weighted-vote verifiers


def auroc(pos: Sequence[float], neg: Sequence[float]) -> float | None:
    """P(a correct sample outscores a wrong one), ties half: the Mann-Whitney form of the ROC area."""
    if not pos or not neg:
        return None
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def auroc_summary(problems: Sequence[Sequence[dict[str, Any]]], score: str) -> dict[str, Any]:
    """AUROC of `score` against `correct` pooled over every sample, and its mean within the problems that have both
    right and wrong samples (the ranking a vote over one problem's samples needs)."""
    flat = [s for p in problems for s in p]
    overall = auroc([s[score] for s in flat if s["correct"]], [s[score] for s in flat if not s["correct"]])
    within = [a for p in problems if (a := auroc([s[score] for s in p if s["correct"]],
                                                 [s[score] for s in p if not s["correct"]])) is not None]
    return {"overall": overall, "within_mean": sum(within) / len(within) if within else None,
            "within_problems": len(within), "samples": len(flat), "correct": sum(s["correct"] for s in flat),
            "problems": len(problems)}


def auroc_intervals(problems: Sequence[Sequence[dict[str, Any]]], score: str, n_boot: int = 1000,
                    seed: int = 0) -> dict[str, list[float] | None]:
    """95% percentile intervals of auroc_summary's two numbers, resampling whole problems (samples of one problem
    are not independent); a resample without both outcomes is skipped."""
    import random

    rng = random.Random(seed)
    overall, within = [], []
    for _ in range(n_boot):
        res = auroc_summary([problems[rng.randrange(len(problems))] for _ in problems], score) if problems else {}
        if res.get("overall") is not None:
            overall.append(res["overall"])
        if res.get("within_mean") is not None:
            within.append(res["within_mean"])

    def pct(xs: list[float]) -> list[float] | None:
        xs = sorted(xs)
        return [round(xs[int(0.025 * (len(xs) - 1))], 3), round(xs[int(0.975 * (len(xs) - 1))], 3)] if xs else None

    return {"overall_ci95": pct(overall), "within_ci95": pct(within)}


def prm_training_ids() -> tuple[set[tuple[str, str]], dict[str, Any]]:
    """(source, id) of the problems the shipped PRM head was trained on: train-prm's own split rebuilt from the
    datasets, problem counts and seed recorded in the head's metadata."""
    from service.gateway import DEFAULT_PRM_HEAD
    from service.models.prm_head import PRMHead
    from service.offline.train_prm import select_problems

    t = PRMHead.load(DEFAULT_PRM_HEAD).metadata["training"]
    train, _ = select_problems(t["datasets"], t["problems"], t["eval_problems_held_out"], t["seed"])
    rule = {"head": Path(DEFAULT_PRM_HEAD).name, "rule": "train_prm.select_problems(datasets, problems, "
            "eval_problems_held_out, seed) from the head metadata", **{k: t[k] for k in (
                "datasets", "problems", "eval_problems_held_out", "seed")}}
    return {(str(r["source"]), str(r["id"])) for r in train}, rule


async def run_problem(gw: Any, row: dict[str, Any], done: dict, out: Any, sem: asyncio.Semaphore) -> None:
    from service.metering import Meter
    from service.prompts import math_messages, style_for
    from service.rewards import ArithmeticReward
    from service.strategies import build_strategy
    from service.strategies.base import ComputeBudget, Problem, SamplingParams
    from service.strategies.steps import split_steps
    from service.strategies.voting import answers_equivalent, extract_answer
    from service.workers.policy import MeteredPolicy
    from service.workers.reward import MeteredPRM

    pid, gold = row["id"], str(row["answer"])
    todo = [s for s in SEARCHES if (pid, s[0]) not in done]
    if (pid, "draw") in done and not todo:
        return
    async with sem:
        prompt = await gw.policy.render_chat(math_messages(row["question"], style_for(row.get("source", ""))))

        def write(key: str, rec: dict[str, Any]) -> None:
            rec = {"id": pid, "source": row.get("source"), "key": key, "level": row.get("level"), "gold": gold, **rec}
            done[(pid, key)] = rec
            out.write(json.dumps(rec) + "\n")
            out.flush()

        if (pid, "draw") not in done:
            meter = Meter()
            policy = MeteredPolicy(gw.policy, meter)
            samples = (await policy.generate([prompt], SamplingParams(max_tokens=MAX_TOKENS, temperature=TEMPERATURE,
                                                                      top_logprobs=20), N_DRAW))[0]
            steps = [split_steps(c.text, "\n") for c in samples]
            arith = await ArithmeticReward().score(row["question"], steps)
            prm = await MeteredPRM(gw.prm, meter, "bench").score(row["question"], steps)  # one call, all samples
            recs = []
            for c, a, p in zip(samples, arith, prm):
                conf = token_confidences(c)
                answer = extract_answer(c.text)
                recs.append({"answer": answer, "correct": answers_equivalent(answer, gold), "tokens": c.token_count,
                             "arith": a[-1] if a else 0.0, "prm": p[-1] if p else 0.0,
                             "prm*arith": p[-1] * a[-1] if a and p else 0.0,  # last step of the step-wise product
                             "steps_arith": [round(x, 4) for x in a], "steps_prm": [round(x, 4) for x in p],
                             **{f"conf_{m}": trace_confidence(conf, m, 32, 32)
                                for m in ("lowest_group", "tail", "mean", "bottom10")}})
            write("draw", {"samples": recs, "flops": meter.total_flops, "policy_flops": meter.policy.flops,
                           "reward_flops": meter.reward.flops})

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
                          "prompt_tokens": meter.policy.prompt_tokens, "cached_tokens": meter.policy.cached_tokens,
                          "rounds": res.details.get("rounds")})

        for s in todo:  # sequential per problem: `reward_backend` is switched per search
            await search(*s)


def vote(samples: list[dict[str, Any]], how: str, eta: float = 100.0) -> bool:
    """Is the answer chosen by `how` (majority, confidence, or a weighted vote by a SCORES key) correct?"""
    from service.strategies.voting import Candidate, select

    if how == "confidence":
        keep = max(1, math.ceil(eta / 100 * len(samples)))
        samples = sorted(samples, key=lambda s: -s["conf_lowest_group"])[:keep]
    key = {"majority": None, "confidence": "conf_lowest_group"}.get(how, how)
    cands = [Candidate(text="", answer=s["answer"], score=1.0 if key is None else s[key]) for s in samples]
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


def row(hits: Sequence[bool], flops: Sequence[float], **extra: Any) -> dict[str, Any]:
    return {"accuracy": sum(hits) / len(hits), "ci95": wilson(sum(hits), len(hits)),
            "mean_flops": sum(flops) / len(flops) if flops else None, "problems": len(hits), **extra}


def report(rows: list[dict[str, Any]], done: dict) -> dict[str, Any]:
    ids = [r["id"] for r in rows if (r["id"], "draw") in done]
    draws = {i: done[(i, "draw")] for i in ids}
    table: dict[str, dict[str, Any]] = {}
    for n in BON_NS:
        for how, eta in (("majority", 100), *((w, 100) for w in WEIGHTED), ("confidence", 90), ("confidence", 50)):
            label = f"best_of_n n={n} " + {"majority": "majority", "confidence": f"confidence eta={eta}"}.get(
                how, f"weighted [{how}]")
            # The PRM call is charged only to the rows that use it; arith and confidence cost no FLOPs.
            flops = [(d["policy_flops"] + (d["reward_flops"] if "prm" in how else 0.0)) * n / N_DRAW
                     for d in draws.values()]
            table[label] = row([vote(d["samples"][:n], how, eta) for d in draws.values()], flops)
        table[f"oracle pass@{n}"] = row([any(s["correct"] for s in d["samples"][:n]) for d in draws.values()], [])
    for label, *_ in SEARCHES:
        recs = [done[(i, label)] for i in ids if (i, label) in done]
        if recs:
            table[label] = row([r["correct"] for r in recs], [r["flops"] for r in recs],
                               mean_seconds=sum(r["seconds"] for r in recs) / len(recs),
                               mean_prompt_tokens=sum(r["prompt_tokens"] for r in recs) / len(recs),
                               mean_cached_tokens=sum(r["cached_tokens"] for r in recs) / len(recs))
    for tau in (0.8, 0.95):  # adaptive sampling replayed on the recorded draws (the strategy's rule)
        drawn = [adaptive_replay(d["samples"], tau) for d in draws.values()]
        table[f"best_of_n n<=8 confidence eta=90 adaptive tau={tau} (replay, warmup 2)"] = row(
            [vote(x, "confidence", 90) for x in drawn],
            [d["policy_flops"] * len(x) / N_DRAW for d, x in zip(draws.values(), drawn)],
            mean_samples=sum(len(x) for x in drawn) / len(ids))
    trained, rule = prm_training_ids()
    fresh = [i for i in ids if (str(draws[i]["source"]), i) not in trained]
    samples = [s for d in draws.values() for s in d["samples"]]
    every, unseen = [draws[i]["samples"] for i in ids], [draws[i]["samples"] for i in fresh]
    return {"problems": len(ids), "samples": len(samples), "per_sample_accuracy": sum(s["correct"] for s in samples)
            / max(1, len(samples)), "strategies": table,
            "auroc": {sc: {**auroc_summary(every, sc), **auroc_intervals(every, sc)} for sc in SCORES},
            "auroc_not_prm_trained": {sc: {**auroc_summary(unseen, sc), **auroc_intervals(unseen, sc)}
                                      for sc in SCORES},
            "prm_training_rule": {**rule, "problems_here_trained_on": len(ids) - len(fresh),
                                  "problems_here_not_trained_on": len(fresh)}}


def plot(result: dict[str, Any], path: Path) -> None:
    """Accuracy vs mean FLOPs, Wilson 95% bars: best-of-N curves over N and the searches as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = result["strategies"]
    fig, ax = plt.subplots(figsize=(8, 5))

    def draw(label: str, pts: list[dict[str, Any]], **style: Any) -> None:
        x, y = [p["mean_flops"] for p in pts], [100 * p["accuracy"] for p in pts]
        err = [[yy - 100 * p["ci95"][0] for p, yy in zip(pts, y)], [100 * p["ci95"][1] - yy for p, yy in zip(pts, y)]]
        ax.errorbar(x, y, yerr=err, label=label, capsize=3, elinewidth=0.8, **style)

    for how in ("majority", *(f"weighted [{w}]" for w in WEIGHTED), "confidence eta=90"):
        draw(f"best-of-N {how}", [t[f"best_of_n n={n} {how}"] for n in BON_NS], lw=1.2, marker="o", ms=3)
    for k, (label, *_) in enumerate(SEARCHES):  # colours and markers apart from the best-of-N curves
        if label in t:
            draw(label.replace("_", " ") + ("" if "[" in label else " [arith]"), [t[label]], ls="none",
                 marker="sD^vPX"[k % 6], color=plt.cm.tab20(2 * k + 1 if k < 5 else 14))
    save_plot(fig, ax, path, f"pf_confidence: {result['problems']} arith_graded problems, 32-token KV blocks",
              "accuracy % (Wilson 95%)", legend_size=7)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--limit", type=int, default=30)
    ap.add_argument("--skip", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work-dir", default="/tmp/pfconf")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--policy-port", type=int, default=0, help="embedded worker port (the reward worker: the next)")
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

    # Wall time of every invocation that started workers (a resumed run adds up), so a report rebuilt from the
    # cache still says what the measurement took.
    runs = work / "run_seconds.json"
    if not all((r["id"], k) in done for r in rows for k in ["draw"] + [s[0] for s in SEARCHES]):
        t0 = time.monotonic()
        port = worker_port(args.policy_port)
        settings = gateway_settings("prm*arith", port, port + 1)  # starts the reward worker; searches switch backend
        asyncio.run(with_gateway(settings, work_fn))
        runs.write_text(json.dumps(json.loads(runs.read_text()) + [round(time.monotonic() - t0)]
                                   if runs.exists() else [round(time.monotonic() - t0)]))
    result = {**report(rows, done), "run_seconds": json.loads(runs.read_text()) if runs.exists() else None}
    write_report(args.out, result)
    plot(result, Path(args.out).with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
