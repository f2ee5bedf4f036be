"""Held-out evaluation of a PRM head: how well it ranks samples and how much it helps best-of-N selection.

Metrics (on problems the head never trained on):
- AUROC of final-answer correctness from the last-step score, over all samples ("overall") and averaged over the
  problems that have both right and wrong samples ("within": the part that is about sample quality, not problem ease);
  the same for the arithmetic step verifier and the product of both.
- Best-of-N accuracy at N = 4 and 16 (random N-subsets of the K samples, `draws` per problem, averaged): greedy,
  majority vote, weighted vote with the head (sum of last-step scores per equivalent answer), weighted vote with the
  arithmetic verifier, weighted vote with their product, and the oracle (pass@N).

- Cost per sample (`sample_costs`): the reward tokens of each held-out sample's PRM layout and their FLOPs on the
  reward model's own shape (layers included), against the policy FLOPs of generating that sample with its prompt in
  the prefix cache (the meter's generation_flops, as the sample bank counts them).

Can be rerun on a saved head and a work dir (train_prm.report_main; this module imports nothing of train_prm):
    python -m service.offline.train_prm report --head service/data/prm_head_smollm2.npz --json prm_report.json
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..rewards.arithmetic import ArithmeticReward
from ..strategies.steps import split_steps
from ..strategies.voting import Candidate, aggregate_scores, answers_equivalent, extract_answer, select
from ..models.prm_head import PRMHead

BASELINE = {"source": "docs/cpu-runtime.md first attempt (240 MAWPS/SVAMP problems x 16, layer-20 head, 2-fold CV)",
            "auroc_overall": 0.73, "auroc_within": 0.63, "weighted_minus_greedy_at_16_points": 1.3}


def auroc(scores: Sequence[float], labels: Sequence[int]) -> float | None:
    s, y = np.asarray(scores, float), np.asarray(labels, int)
    pos, neg = s[y == 1], s[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        return None
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    allv = np.concatenate([pos, neg])[order]
    # average ranks for ties
    i = 0
    while i < len(allv):
        j = i
        while j + 1 < len(allv) and allv[j + 1] == allv[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def evaluate(rows: list[dict], feats: dict[str, list[np.ndarray]], head: PRMHead, ns: Sequence[int] = (4, 16),
             draws: int = 20, seed: int = 0) -> dict[str, Any]:
    arith = ArithmeticReward()
    rng = np.random.default_rng(seed)
    per_problem = []
    for row in rows:
        arrs = feats[row["id"]]
        texts = row["samples"]
        answers = [extract_answer(t) for t in texts]
        right = [int(answers_equivalent(a, row["answer"])) for a in answers]
        prm = [aggregate_scores(list(head.score(a.astype(np.float32))), "last") for a in arrs[:len(texts)]]
        ar = [aggregate_scores(arith.score_steps(split_steps(t, head.delimiter)), "last") for t in texts]
        greedy_ok = int(answers_equivalent(extract_answer(row["greedy"]), row["answer"]))
        per_problem.append({"id": row["id"], "source": row["source"], "right": right, "answers": answers,
                            "texts": texts, "prm": prm, "arith": ar, "prod": [p * a for p, a in zip(prm, ar)],
                            "greedy": greedy_ok, "gold": row["answer"]})

    report: dict[str, Any] = {"problems": len(rows), "samples_per_problem": len(rows[0]["samples"]) if rows else 0,
                              "per_sample_accuracy": float(np.mean([np.mean(p["right"]) for p in per_problem])),
                              "auroc": {}, "selection": {}, "baseline": BASELINE}
    all_right = [r for p in per_problem for r in p["right"]]
    for name in ("prm", "arith", "prod"):
        overall = auroc([s for p in per_problem for s in p[name]], all_right)
        within = [a for p in per_problem if (a := auroc(p[name], p["right"])) is not None]
        report["auroc"][name] = {"overall": overall, "within": float(np.mean(within)) if within else None,
                                 "within_problems": len(within)}
    for n in ns:
        acc: dict[str, list[float]] = {k: [] for k in ("greedy", "majority", "weighted_prm", "best_prm",
                                                       "weighted_arith", "weighted_prm_x_arith", "oracle")}
        for p in per_problem:
            k = len(p["texts"])
            if k < n:
                continue
            subsets = [np.arange(k)] if n == k else [rng.choice(k, n, replace=False) for _ in range(draws)]
            res = {key: [] for key in acc}
            for idx in subsets:
                def pick(scores: list[float] | None, rule: str) -> int:
                    cands = [Candidate(p["texts"][i], p["answers"][i], 1.0 if scores is None else scores[i])
                             for i in idx]
                    chosen = select(cands, rule).candidate
                    return int(answers_equivalent(chosen.answer, p["gold"]))
                res["greedy"].append(p["greedy"])
                res["majority"].append(pick(None, "majority"))
                res["weighted_prm"].append(pick(p["prm"], "weighted"))
                res["best_prm"].append(pick(p["prm"], "best"))
                res["weighted_arith"].append(pick(p["arith"], "weighted"))
                res["weighted_prm_x_arith"].append(pick(p["prod"], "weighted"))
                res["oracle"].append(int(any(p["right"][i] for i in idx)))
            for key in acc:
                acc[key].append(float(np.mean(res[key])))
        report["selection"][f"N={n}"] = {key: 100.0 * float(np.mean(v)) if v else None for key, v in acc.items()}
    return report


def sample_costs(rows: list[dict], layout: Any, policy_prompt_len: Any, completion_tokens: Any, policy_shape: Any,
                 reward_shape: Any) -> dict[str, Any]:
    """Mean reward tokens and FLOPs per sample (every sample's own PRM layout, nothing cached) and mean policy FLOPs
    per sample; `layout(question, steps)`, `policy_prompt_len(row)` and `completion_tokens(text)` from the caller."""
    reward_tok, reward_fl, policy_fl, gen_tok = [], [], [], []
    for row in rows:
        plen = policy_prompt_len(row)
        for text in row["samples"]:
            steps = split_steps(text, "\n")
            n = len(layout(row["question"], steps).token_ids) if steps else 0
            g = completion_tokens(text)
            reward_tok.append(n)
            reward_fl.append(reward_shape.encode_flops(n))
            gen_tok.append(g)
            policy_fl.append(policy_shape.generation_flops(plen, plen, [g]))
    r, p = float(np.mean(reward_fl)), float(np.mean(policy_fl))
    return {"samples": len(reward_fl), "reward_layers": reward_shape.n_layer,
            "reward_tokens": float(np.mean(reward_tok)), "reward_flops": r,
            "completion_tokens": float(np.mean(gen_tok)), "policy_flops": p,
            "reward_over_policy": r / p if p else None}


def print_table(report: dict[str, Any]) -> None:
    print(f"\nHeld-out: {report['problems']} problems x {report['samples_per_problem']} samples, "
          f"per-sample accuracy {100 * report['per_sample_accuracy']:.1f}%")
    print("AUROC of final-answer correctness (last-step score):")
    print(f"  {'scorer':<10} {'overall':>8} {'within':>8} (problems with both)")
    for name, a in report["auroc"].items():
        fmt = lambda v: f"{v:.3f}" if v is not None else "  n/a"  # noqa: E731
        print(f"  {name:<10} {fmt(a['overall']):>8} {fmt(a['within']):>8} ({a['within_problems']})")
    sel = report["selection"]
    keys = list(next(iter(sel.values())).keys()) if sel else []
    print("Best-of-N accuracy (%):")
    print(f"  {'method':<22}" + "".join(f"{n:>9}" for n in sel))
    for k in keys:
        print(f"  {k:<22}" + "".join(f"{(sel[n][k] if sel[n][k] is not None else float('nan')):>9.1f}" for n in sel))
    c = report.get("cost_per_sample")
    if c:
        print(f"Per sample: {c['reward_tokens']:.1f} reward tokens, reward {c['reward_flops']:.3g} FLOPs "
              f"({c['reward_layers']} layers) vs policy {c['policy_flops']:.3g} ({c['completion_tokens']:.1f} "
              f"tokens): reward/policy {c['reward_over_policy']:.3f}")
    b = report["baseline"]
    print(f"Baseline ({b['source']}): AUROC {b['auroc_overall']} / {b['auroc_within']}, weighted vote about +1 point "
          f"over greedy at N=16.")
