"""Reward FLOPs per round of one beam search through the API (issue 15): `ttc.details.score_flops` (what each
round's scoring added to the meter) against `score_bound_flops` (its estimate: a whole re-encode of the round's
candidates). Run against a gateway with TTC_REWARD__PREFIX_READS on (default) and off to compare.
Usage: python benchmarks/reward_tail_api.py --url http://127.0.0.1:8310 --n 4 --rounds 8 --tag R4 [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time

import httpx

QUESTION = ("Trip {tag}: a bus starts with 18 people. At the first stop 7 get off and 5 get on, at the second 9 get "
            "off and 12 get on, at the third 4 get off. How many are on the bus?")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8310")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--strategy", default="beam_search")
    ap.add_argument("--tag", default="R4", help="makes the question new to the worker's cache")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    t = time.time()
    r = httpx.post(args.url + "/v1/chat/completions", timeout=1800, headers={"Cache-Control": "no-cache, no-store"},
                   json={"model": "smollm2-135m-instruct", "max_tokens": 256, "seed": 5,
                         "messages": [{"role": "user", "content": QUESTION.format(tag=args.tag)}],
                         "ttc": {"strategy": args.strategy, "n": args.n, "max_rounds": args.rounds}})
    r.raise_for_status()
    ttc = r.json()["ttc"]
    d = ttc["details"]
    row = {"n": args.n, "strategy": args.strategy, "tag": args.tag, "seconds": round(time.time() - t),
           "score_flops": d["score_flops"], "score_bound_flops": d["score_bound_flops"],
           "reward_flops": ttc["flops"]["reward"], "rounds": d.get("rounds")}
    print(json.dumps(row))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
