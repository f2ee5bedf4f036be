"""`ttc-gateway train-difficulty`: fit the zero-decode difficulty head (router.hidden_difficulty) on a sample bank.

Per bank problem, one /pooling call on the reward worker returns the last-layer hidden states of the bare question
(`PRMClient.encode_question`, exactly what `auto` calls when serving); they are cached next to the bank, so a rerun
only encodes new problems. Labels come from the bank: pass@1 (share of the 32 samples that are correct), its
empirical logit, and the mean last-step verifier score of the samples (the statistic the probe estimates). Problems
are split by a hash of their id (bank.is_held_out): the head is fitted on the rest only, its ridge strength and
label chosen by 5-fold cross-validation there (Spearman against pass@1), and it is reported on the held-out problems
against pass@1 (with a bootstrap interval) and, for graded arithmetic, against the generator's level, next to the
prompt-statistics ridge estimator on the same split. The cost is the encode FLOPs of the question over one
generation's FLOPs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..router.hidden_difficulty import POOLINGS, HiddenDifficultyHead, pooled_features
from .bank import current_models, is_held_out, read_bank
from .policy import kfold
from .bench_checks import spearman

RIDGES = (0.1, 1.0, 10.0, 100.0, 1e3, 3e3, 1e4, 1e5)
LABELS = ("verifier", "pass_at_1", "logit_pass_at_1")
# Half a pseudo-count on each side keeps the empirical logit finite for 0 of 32 and 32 of 32.
LOGIT_PSEUDO = 0.5


def labels(problems: Sequence[dict[str, Any]], backend: str = "prm*arith") -> dict[str, np.ndarray]:
    from .bank import step_scores

    correct = np.array([sum(bool(s["correct"]) for s in p["samples"]) for p in problems], dtype=np.float64)
    n = np.array([len(p["samples"]) for p in problems], dtype=np.float64)
    verifier = np.array([np.mean([(step_scores(s, backend) or [0.0])[-1] for s in p["samples"]]) for p in problems])
    # Most problems sit near pass@1 = 0, where a few easy ones dominate a squared loss on the raw share; the
    # empirical logit spreads the hard end out, which is where the table's bins must separate problems.
    logit = np.log((correct + LOGIT_PSEUDO) / (n - correct + LOGIT_PSEUDO))
    return {"pass_at_1": correct / np.maximum(n, 1), "verifier": verifier, "logit_pass_at_1": logit}


def out_of_fold(X: np.ndarray, y: np.ndarray, ridge: float, k: int = 5, seed: int = 0) -> np.ndarray:
    """Each problem's prediction from a head fitted on the other folds: what the head says of a problem it never
    saw, which is what it does in serving."""
    pred = np.zeros(len(y))
    for fold in kfold(len(y), k, seed):
        train = np.setdiff1d(np.arange(len(y)), fold)
        pred[fold] = HiddenDifficultyHead.fit(X[train], y[train], ridge).predict_features(X[fold])
    return pred


def cross_validate(X: np.ndarray, y: np.ndarray, truth: np.ndarray, ridge: float, k: int = 5,
                   seed: int = 0) -> float:
    """Spearman of out-of-fold predictions against `truth` (pass@1)."""
    k = min(k, len(y))
    if k < 2:
        return 0.0
    return spearman(list(out_of_fold(X, y, ridge, k, seed)), list(truth)) or 0.0


def select_and_fit(X: np.ndarray, labs: dict[str, np.ndarray], seed: int = 0
                   ) -> tuple[HiddenDifficultyHead, dict[str, Any]]:
    grid = {(lab, r): cross_validate(X, labs[lab], labs["pass_at_1"], r, seed=seed) for lab in LABELS for r in RIDGES}
    (label, ridge), best = max(grid.items(), key=lambda kv: (kv[1], kv[0][1]))  # ties: the stronger ridge
    head = HiddenDifficultyHead.fit(X, labs[label], ridge)
    return head, {"label": label, "ridge": ridge, "cv_spearman_pass_at_1": round(best, 4),
                  "grid": {f"{lab} ridge={r:g}": round(v, 4) for (lab, r), v in grid.items()}}


def level_spearman(pred: np.ndarray, problems: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Graded arithmetic carries its generator level (higher = harder): predicted ease should fall with it."""
    rows = [(float(x), float(p["level"])) for x, p in zip(pred, problems) if p.get("level") is not None]
    if len(rows) < 5:
        return None
    s = spearman([r[0] for r in rows], [-r[1] for r in rows])
    return {"problems": len(rows), "spearman_with_minus_level": None if s is None else round(s, 4)}


def spearman_interval(pred: np.ndarray, truth: np.ndarray, resamples: int = 1000, seed: int = 0
                      ) -> list[float] | None:
    """Percentile bootstrap 95% interval over problems."""
    if len(pred) < 10:
        return None
    rng = np.random.default_rng(seed)
    draws = [spearman(list(pred[i]), list(truth[i])) for i in rng.integers(0, len(pred), (resamples, len(pred)))]
    lo, hi = np.percentile([d for d in draws if d is not None], [2.5, 97.5])
    return [round(float(lo), 4), round(float(hi), 4)]


def report(head: HiddenDifficultyHead, X: np.ndarray, problems: Sequence[dict[str, Any]],
           labs: dict[str, np.ndarray], rows: np.ndarray, prompt_pred: np.ndarray) -> dict[str, Any]:
    if not len(rows):
        return {"problems": 0}
    pred = head.predict_features(X[rows])
    sub = [problems[i] for i in rows]
    truth = labs["pass_at_1"][rows]
    return {"problems": int(len(rows)),
            "spearman_pass_at_1": spearman(list(pred), list(truth)),
            "spearman_pass_at_1_interval": spearman_interval(pred, truth),
            "spearman_verifier": spearman(list(pred), list(labs["verifier"][rows])),
            "prompt_model_spearman_pass_at_1": spearman(list(prompt_pred[rows]), list(truth)),
            "levels": level_spearman(pred, sub),
            "prompt_model_levels": level_spearman(prompt_pred[rows], sub)}


async def encode_all(prm: Any, questions: Sequence[str], batch: int = 16) -> list[np.ndarray]:
    """Pooled features per question: one /pooling call per batch (the same ids `encode_question` sends)."""
    out: list[np.ndarray] = []
    for i in range(0, len(questions), batch):
        ids = [prm.question_ids(q) for q in questions[i:i + batch]]
        hidden, _ = await prm.pool_hidden(ids)
        out += [pooled_features(h, POOLINGS).astype(np.float32) for h in hidden]
    return out


# Caches written before the poolings were stored held these.
LEGACY_POOLINGS = ("mean", "last")


def load_features(path: Path, poolings: Sequence[str] = POOLINGS) -> dict[str, np.ndarray]:
    """The cached pooled features per problem id; none when the cache holds other poolings (they are re-encoded)."""
    if not path.is_file():
        return {}
    with np.load(path, allow_pickle=False) as z:
        stored = tuple(str(p) for p in z["poolings"]) if "poolings" in z.files else LEGACY_POOLINGS
        if stored != tuple(poolings):
            return {}
        return {str(i): f for i, f in zip(z["ids"], z["features"])}


def save_features(path: Path, feats: dict[str, np.ndarray], poolings: Sequence[str] = POOLINGS) -> None:
    ids = sorted(feats)
    np.savez_compressed(path, ids=np.array(ids), features=np.stack([feats[i] for i in ids]),
                        poolings=np.array(list(poolings)))


def add_parser(sub: Any) -> None:
    from .workers import add_worker_args

    p = sub.add_parser("train-difficulty", help="fit the zero-decode difficulty head on a sample bank")
    p.add_argument("--bank", required=True, help="sample bank written by `ttc-gateway bank`")
    p.add_argument("--out", required=True, help="head (.npz), e.g. service/data/difficulty_head_smollm2.npz")
    p.add_argument("--report", help="JSON report (default: next to --out)")
    p.add_argument("--features", help="hidden-state cache (default: the bank path + .hidden-<layers>l.npz)")
    p.add_argument("--min-problems", type=int, default=20, help="refuse smaller banks")
    add_worker_args(p)
    p.set_defaults(func=main)


def main(settings: Any, args: argparse.Namespace) -> int:
    from ..router.difficulty import PromptDifficultyModel
    from .workers import gateway_settings, with_gateway

    header, problems = read_bank(args.bank)
    problems = [p for p in problems if p.get("question")]
    if len(problems) < args.min_problems:
        raise SystemExit(f"{args.bank}: {len(problems)} problems with their question; train-difficulty needs >= "
                         f"{args.min_problems} (run `ttc-gateway bank`, and keep the datasets its header names where "
                         f"it can find them)")
    from .workers import check_prepared

    gws = gateway_settings("prm*arith", args.policy_port, args.reward_port, args.policy_url, args.reward_url)
    check_prepared(gws)  # the tokenizer and the FLOPs shape come from the model folder even when nothing is encoded
    from ..gateway import load_shape, reward_model

    shape = load_shape(reward_model(gws), gws.reward.config_path)
    # States of another depth are other features: the cache is per reward-model depth.
    feats_path = Path(args.features or f"{args.bank}.hidden-{shape.n_layer}l.npz")
    feats = load_features(feats_path)
    todo = [p for p in problems if p["id"] not in feats]
    t0 = time.monotonic()
    if todo:

        async def work(gw: Any) -> None:
            for p, f in zip(todo, await encode_all(gw.prm, [p["question"] for p in todo])):
                feats[p["id"]] = f

        asyncio.run(with_gateway(gws, work))
        save_features(feats_path, feats)
    encode_s = time.monotonic() - t0
    X = np.stack([feats[p["id"]] for p in problems]).astype(np.float64)
    labs = labels(problems)
    held = np.array([is_held_out(p["id"]) for p in problems])
    fit, ho = np.flatnonzero(~held), np.flatnonzero(held)
    head, chosen = select_and_fit(X[fit], {k: v[fit] for k, v in labs.items()})
    questions = [p["question"] for p in problems]
    prompt = PromptDifficultyModel.fit([questions[i] for i in fit], list(labs[chosen["label"]][fit]))
    prompt_pred = np.array([prompt.predict(q) for q in questions])

    from ..models.prm_head import PRMTokenizer

    tokenizer = PRMTokenizer.from_model_dir(reward_model(gws)).tokenizer
    tokens = [len(tokenizer.encode(q.strip(), add_special_tokens=False)) for q in questions]  # as encode_question
    per_gen = float(np.mean([s["policy_flops"] + s["reward_flops"] for p in problems for s in p["samples"]]))
    encode = float(np.mean([shape.encode_flops(int(t)) for t in tokens]))
    head.metadata.update({"model": current_models(gws).get("policy"), "poolings": list(POOLINGS),
                          "layers": shape.n_layer,  # the reward worker's depth: the gateway refuses another
                          "label": chosen["label"], "fitted_on": int(len(fit)),
                          "bank_created": header.get("created"), "datasets": header.get("datasets"),
                          "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    rep = {"head": str(args.out), "version": head.version, "selection": chosen,
           "fit": report(head, X, problems, labs, fit, prompt_pred),
           "held_out": report(head, X, problems, labs, ho, prompt_pred),
           "cost": {"mean_encode_flops": encode, "flops_per_generation": per_gen,
                    "encode_over_generation": round(encode / per_gen, 4),
                    "probe_k4_over_generation": 4.0},
           "encode_seconds": round(encode_s, 1), "encoded_problems": len(todo)}
    head.metadata["held_out_spearman_pass_at_1"] = rep["held_out"].get("spearman_pass_at_1")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    head.save(args.out)
    report_path = Path(args.report or Path(args.out).with_suffix(".json"))
    report_path.write_text(json.dumps(rep, indent=1, default=float) + "\n")
    print(json.dumps({k: rep[k] for k in ("version", "selection", "held_out", "cost")}, indent=1, default=float))
    print(f"wrote {args.out} and {report_path}")
    return 0
