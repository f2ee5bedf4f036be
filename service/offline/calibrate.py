"""`ttc-gateway calibrate`: run the strategy grid over calibration problems on real workers, bin the problems by
predicted difficulty and choose per (bin, budget) the best strategy by 2-fold cross-validation (Snell et al. A1).

Cost accounting (also used by `bench`):
- Each problem's prompt is prefilled once by an unmetered 1-token warm-up, so every strategy run sees the same prefix
  cache state; every request is then charged the prefill of its QUESTION tokens (the tokens after the few-shot prefix
  that all problems share, which a serving deployment keeps in vLLM's prefix cache). Everything else is the meter's
  measurement (policy + reward FLOPs, prefix-cache aware).
- Best-of-N is drawn once with n=16 and scored once; best-of-N at N = 1, 2, 4, 8, 16 uses the first N samples
  (prefixes, so the router's probe samples are exactly the first k of them). Its FLOPs: the N samples' decode FLOPs,
  N/16 of the reward call, plus the question charge.
- One "generation" (the budget unit) = the mean per-sample FLOPs of those best-of-16 draws, policy plus reward.

Per-problem results are cached as JSONL in the work dir (one line per problem and config); a rerun skips done work.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import re
import time
from pathlib import Path
from typing import Any, Sequence

from .workers import add_worker_args, gateway_settings, model_info, with_gateway
from .fit import (BON_N, BUDGET_GENERATIONS, MAX_TOKENS, PROBE_KS, TEMPERATURE, Config, budget_flops,
                         build_table, choose_estimator, config_key, generation_flops)

log = logging.getLogger("ttc.calibrate")

def _cfg(strategy: str, generations: int, **params: Any) -> Config:
    return Config(strategy, tuple(sorted(params.items())), generations)


# The searched grid, pruned to what the shared 2-core machine could run (one step-search run costs 10-30
# generations' worth of FLOPs here): beam search M = sqrt(N) (N=4, M=2) and M = 4 (N=8); DVTS N=4, M=2; REBASE N=4
# and 8; revisions N=4 with 2 sequential x 2 parallel. Pruned: lookahead (beam N=4, M=2, k=1) and DVTS N=8, M=4
# (both run in a first attempt; too slow for the time available), and every N=16 search.
# Particle filtering N=4 joined the grid with issue 16 (the shipped table was calibrated before it).
# Best-of-N (majority and weighted, N = 1..16) comes from the shared n=16 draw; it is also rescored by the
# confidence verifier (its top-k log-probabilities come with the draw).
SEARCH_GRID: tuple[Config, ...] = (
    _cfg("beam_search", 4, n=4, beam_width=2, lookahead=0),
    _cfg("beam_search", 8, n=8, beam_width=4, lookahead=0),
    _cfg("dvts", 4, n=4, beam_width=2),
    _cfg("rebase", 4, n=4),
    _cfg("rebase", 8, n=8),
    _cfg("revisions", 4, n=4, chain_length=2),
    _cfg("particle_filtering", 4, n=4),
)
# The N = 4 searches only: what an AVX2-only 2-core host (float32, ~60 tok/s aggregate) can run over ~100 problems.
LEAN_GRID: tuple[Config, ...] = tuple(c for c in SEARCH_GRID if c.params_dict["n"] == 4)
TINY_GRID: tuple[Config, ...] = (_cfg("beam_search", 2, n=2, beam_width=2, lookahead=0),)


def bon_configs(max_n: int = BON_N) -> list[Config]:
    return [_cfg("best_of_n", n, n=n, selection=s) for s in ("weighted", "majority")
            for n in (1, 2, 4, 8, 16) if n <= max_n]


# ---- problems ------------------------------------------------------------------------------------------------------

def load_pool(specs: Sequence[str], seed: int = 20261123) -> list[dict[str, Any]]:
    """All problems of the datasets, each shuffled with `seed`, interleaved round-robin; `path:w` takes w rows of that
    dataset per round (a weighted mix). Calibrate takes the head of this order, bench the problems not calibrated on."""
    from ..prompts import load_dataset

    lists = []
    for spec in specs:
        path, _, w = spec.partition(":") if re.search(r":\d+$", spec) else (spec, "", "1")
        rows = load_dataset(path)
        random.Random(f"{seed}:{Path(path).stem}").shuffle(rows)
        lists.append((rows, int(w or 1)))
    out, pos = [], [0] * len(lists)
    while any(pos[i] < len(rows) for i, (rows, _) in enumerate(lists)):
        for i, (rows, w) in enumerate(lists):
            out.extend(rows[pos[i]:pos[i] + w])
            pos[i] += w
    for row in out:
        row["id"] = str(row["id"])
    return out


# ---- running the grid on real workers ------------------------------------------------------------------------------

def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", s.lower()).strip("_")


class PromptRenderer:
    """Renders a problem's chat prompt on the policy worker and counts its tokens and the few-shot prefix it shares
    with every other problem (calibrate, bench and the sample bank charge the same question prefill)."""

    def __init__(self, gw: Any):
        self.gw = gw
        self._ref_ids: list[int] | None = None

    async def _token_ids(self, text: str) -> list[int]:
        body = await self.gw.policy.pool.post_json("/tokenize", {"model": self.gw.policy.model, "prompt": text,
                                                                 "add_special_tokens": False})
        return list(body["tokens"])

    async def render(self, row: dict[str, Any]) -> tuple[str, int, int]:
        """(rendered prompt, its tokens, tokens shared with every other problem's prompt: the few-shot prefix)."""
        from ..prompts import math_messages, style_for

        style = style_for(row.get("source", ""))
        prompt = await self.gw.policy.render_chat(math_messages(row["question"], style))
        if self._ref_ids is None:
            ref = await self.gw.policy.render_chat(math_messages("What is 1 + 1?", style))
            self._ref_ids = await self._token_ids(ref)
        ids = await self._token_ids(prompt)
        shared = 0
        for a, b in zip(ids, self._ref_ids):
            if a != b:
                break
            shared += 1
        return prompt, len(ids), shared


class GridRunner:
    """Runs configs on problems through an in-process Gateway's workers; caches one JSONL line per (problem, key)."""

    def __init__(self, gw: Any, work_dir: Path, reward_backend: str, max_tokens: int = MAX_TOKENS,
                 concurrency: int = 6, bon_n: int = BON_N, table: Any = None):
        self.gw = gw
        self.table = table  # for live `auto` configs (bench)
        self.reward_backend = reward_backend
        self.max_tokens = max_tokens
        self.bon_n = bon_n
        self.sem = asyncio.Semaphore(concurrency)
        work_dir.mkdir(parents=True, exist_ok=True)
        self.path = work_dir / f"results_{_slug(reward_backend)}_t{max_tokens}.jsonl"
        self.done: dict[tuple[str, str], dict[str, Any]] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:  # a line cut off by a kill
                        continue
                    self.done[(rec["id"], rec["key"])] = rec
        self._fh = open(self.path, "a", encoding="utf-8")
        self.prompts = PromptRenderer(gw)

    def close(self) -> None:
        self._fh.close()

    def _write(self, rec: dict[str, Any]) -> None:
        self.done[(rec["id"], rec["key"])] = rec
        self._fh.write(json.dumps(rec) + "\n")
        self._fh.flush()

    async def _prompt(self, row: dict[str, Any]) -> tuple[str, int, int]:
        return await self.prompts.render(row)

    async def run_problem(self, row: dict[str, Any], configs: Sequence[Config]) -> None:
        from ..metering import Meter
        from ..rewards.arithmetic import ArithmeticReward
        from ..strategies import build_strategy
        from ..strategies.base import ComputeBudget, Problem, SamplingParams
        from ..strategies.steps import split_steps
        from ..strategies.voting import answers_equivalent, extract_answer
        from ..workers.policy import MeteredPolicy

        pid = row["id"]
        todo = [c for c in configs if (pid, c.key) not in self.done]
        need_bon = (pid, "bon") not in self.done
        if not todo and not need_bon:
            return
        async with self.sem:
            prompt, plen, shared = await self._prompt(row)
            shape = self.gw.policy.shape
            charge = shape.forward_flops(plen - shared, shared)
            warm = MeteredPolicy(self.gw.policy, Meter())
            await warm.generate([prompt], SamplingParams(max_tokens=1, temperature=TEMPERATURE), 1)
            gold = str(row["answer"])
            base = {"id": pid, "source": row.get("source"), "level": row.get("level"), "gold": gold,
                    "question": row["question"], "prompt_tokens": plen, "shared_tokens": shared,
                    "question_charge": charge}

            async def bon() -> None:
                from ..rewards import ConfidenceReward

                meter = Meter()
                reward = self.gw.reward_for(meter, "calibration")
                # The draw comes back with its top-k log-probabilities (same call, no FLOPs), so the confidence
                # verifier rescores it like the others.
                confidence = ConfidenceReward()
                policy: Any = confidence.wrap_policy(MeteredPolicy(self.gw.policy, meter))
                policy = getattr(reward, "wrap_policy", lambda x: x)(policy)
                t0 = time.monotonic()
                out = (await policy.generate([prompt], SamplingParams(max_tokens=self.max_tokens,
                                                                      temperature=TEMPERATURE), self.bon_n))[0]
                pol = meter.policy.flops
                steps = [split_steps(c.text, "\n") for c in out]
                scores = await reward.score(row["question"], steps)
                # The same draw scored by every backend (the calculator is free; the PRM only when it is
                # configured): bench reports best-of-N and the bon-only router per backend without new samples.
                by_backend = {"arith": await ArithmeticReward().score(row["question"], steps),
                              "confidence": await confidence.score(row["question"], steps)}
                by_backend["confidence*arith"] = [[x * y for x, y in zip(a, b)] for a, b in
                                                  zip(by_backend["confidence"], by_backend["arith"])]
                if "prm" in self.reward_backend and self.gw.prm is not None:
                    by_backend["prm"] = await self.gw.prm.score(row["question"], steps)
                    by_backend["prm*arith"] = [[x * y for x, y in zip(a, b)]
                                               for a, b in zip(by_backend["prm"], by_backend["arith"])]
                samples = []
                for j, (c, s) in enumerate(zip(out, scores)):
                    ans = extract_answer(c.text)
                    samples.append({"answer": ans, "correct": answers_equivalent(ans, gold),
                                    "last": float(s[-1]) if s else 0.0, "steps": len(s), "tokens": c.token_count,
                                    "last_by": {name: float(v[j][-1]) if v[j] else 0.0
                                                for name, v in by_backend.items()},
                                    "policy_flops": shape.generation_flops(plen, plen, [c.token_count])})
                self._write({**base, "key": "bon", "n": self.bon_n, "samples": samples, "policy_flops": pol,
                             "reward_flops": meter.reward.flops, "seconds": time.monotonic() - t0})

            async def one(cfg: Config) -> None:
                meter = Meter()
                policy = MeteredPolicy(self.gw.policy, meter)
                reward = self.gw.reward_for(meter, "calibration")
                choice: dict[str, Any] = {}
                limit = None
                if cfg.strategy == "auto":  # bench's live router: the served code path, under budget
                    from ..router.auto import AutoStrategy

                    strategy: Any = AutoStrategy(self.table, max_n=64, on_choice=choice.update)
                    limit = budget_flops(cfg.params_dict["budget_generations"], self.table.generation_flops) - charge
                else:
                    strategy = build_strategy(cfg.strategy, cfg.params_dict)
                problem = Problem(prompt=prompt, question=row["question"], max_tokens=self.max_tokens,
                                  temperature=TEMPERATURE)
                t0 = time.monotonic()
                try:
                    res = await strategy.run(problem, policy, reward, ComputeBudget(limit, lambda: meter.total_flops))
                except Exception as exc:  # one failed run must not sink the calibration; it is recorded as wrong
                    log.warning("%s on %s failed: %r", cfg.key, pid, exc)
                    self._write({**base, "key": cfg.key, "error": repr(exc), "correct": False,
                                 "flops": meter.total_flops + charge, "generations": cfg.generations})
                    return
                self._write({**base, "key": cfg.key, "strategy": cfg.strategy, "params": cfg.params_dict,
                             "generations": cfg.generations, "answer": res.answer,
                             "correct": answers_equivalent(res.answer, gold),
                             "flops": meter.total_flops + charge, "policy_flops": meter.policy.flops,
                             "reward_flops": meter.reward.flops, "samples": res.samples,
                             "exhausted": res.budget_exhausted, "seconds": time.monotonic() - t0,
                             **({"choice": choice} if choice else {}),
                             # revisions: the answer of every attempt per chain (bench counts correct -> wrong)
                             **({"chains": res.details["chains"]} if "chains" in (res.details or {}) else {})})

            outcomes = await asyncio.gather(*([bon()] if need_bon else []), *(one(c) for c in todo),
                                            return_exceptions=True)
            for exc in outcomes:  # e.g. a worker that died and is restarting: not recorded, so a rerun retries
                if isinstance(exc, Exception):
                    log.warning("problem %s: %r (not recorded; rerun to retry)", pid, exc)

    async def run(self, rows: Sequence[dict[str, Any]], configs: Sequence[Config], label: str = "grid",
                  every: int = 4) -> None:
        t0 = time.monotonic()
        pending = [r for r in rows if (r["id"], "bon") not in self.done
                   or any((r["id"], c.key) not in self.done for c in configs)]
        print(f"[{label}] {len(rows)} problems x {len(configs)} configs + best-of-{self.bon_n}; "
              f"{len(rows) - len(pending)} already cached in {self.path}", flush=True)
        finished = 0

        async def go(row: dict[str, Any]) -> None:
            nonlocal finished
            await self.run_problem(row, configs)
            finished += 1
            if finished % every == 0 or finished == len(pending):
                el = time.monotonic() - t0
                eta = el / finished * (len(pending) - finished)
                print(f"[{label}] {finished}/{len(pending)} problems, {el:.0f} s elapsed, ETA {eta:.0f} s",
                      flush=True)

        await asyncio.gather(*(go(r) for r in pending))

    def records(self, rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for r in rows:
            out[r["id"]] = {k: v for (pid, k), v in self.done.items() if pid == r["id"]}
        return out


# ---- outcomes from records (pure) ----------------------------------------------------------------------------------

def run_grid(gws: Any, work_dir: Path, reward: str, concurrency: int, bon_n: int, rows: Sequence[dict[str, Any]],
             configs: Sequence[Config], label: str, table: Any = None) -> dict[str, dict[str, dict[str, Any]]]:
    """Run what is not cached yet (starting or reaching the workers only then); all records of `rows`."""
    offline = GridRunner(None, work_dir, reward, bon_n=bon_n)
    offline.close()
    if all((r["id"], k) in offline.done for r in rows for k in ["bon"] + [c.key for c in configs]):
        print(f"[{label}] all {len(rows)} problems cached in {offline.path}", flush=True)
        return offline.records(rows)

    async def work(gw: Any) -> dict[str, dict[str, dict[str, Any]]]:
        runner = GridRunner(gw, work_dir, reward, concurrency=concurrency, bon_n=bon_n, table=table)
        try:
            await runner.run(rows, configs, label)
        finally:
            runner.close()
        return runner.records(rows)

    return asyncio.run(with_gateway(gws, work))


def cached_records(work_dir: Path, reward: str, ids: Sequence[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """The recorded runs of these problems (no workers); problems without a best-of-N draw are left out."""
    offline = GridRunner(None, work_dir, reward)
    offline.close()
    recs = offline.records([{"id": i} for i in ids])
    return {i: r for i, r in recs.items() if "bon" in r}


def complete_ids(rows: Sequence[dict[str, Any]], recs: dict[str, dict[str, Any]], label: str) -> list[str]:
    """The problems whose runs are all recorded; the others are named and left for a rerun (which resumes)."""
    ids = [r["id"] for r in rows if "bon" in recs.get(r["id"], {})]
    missing = [r["id"] for r in rows if "bon" not in recs.get(r["id"], {})]
    if missing:
        print(f"[{label}] {len(missing)} of {len(rows)} problems have no complete run and are left out (rerun the "
              f"same command to finish them): {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}",
              flush=True)
    if not ids:
        raise SystemExit(f"[{label}] no problem has a complete run yet; rerun the command")
    return ids


def add_parser(sub: Any) -> None:
    p = sub.add_parser("calibrate", help="run the strategy grid and write a compute-optimal policy table")
    p.add_argument("--dataset", action="append", required=True, help="JSONL file (path or path:weight); repeatable")
    p.add_argument("--limit", type=int, required=True, help="calibration problems (head of the seeded pool)")
    p.add_argument("--out", required=True, help="policy table JSON to write")
    p.add_argument("--work-dir", required=True, help="per-problem results cache (resumable)")
    p.add_argument("--grid", default="full", choices=("full", "lean", "tiny"),
                   help="lean: best-of-N + the N=4 searches; tiny: best-of-N + one beam config")
    p.add_argument("--budgets", default=",".join(map(str, BUDGET_GENERATIONS)),
                   help="budgets in generations' worth of FLOPs (best-of-N is drawn up to min(16, max budget))")
    add_worker_args(p)
    p.set_defaults(func=main)


def bon_size(budgets: Sequence[int]) -> int:
    return max(min(BON_N, max(budgets)), max(PROBE_KS))


def grid(name: str, budgets: Sequence[int]) -> list[Config]:
    search = {"full": SEARCH_GRID, "lean": LEAN_GRID, "tiny": TINY_GRID}[name]
    return bon_configs(min(BON_N, max(budgets))) + list(search)


def main(settings: Any, args: argparse.Namespace) -> int:
    budgets = sorted(int(b) for b in args.budgets.split(","))
    configs = grid(args.grid, budgets)
    rows = load_pool(args.dataset, args.seed)[: args.limit]
    gws = gateway_settings(args.reward, args.policy_port, args.reward_port, args.policy_url, args.reward_url)
    t0 = time.monotonic()

    recs = run_grid(gws, Path(args.work_dir), args.reward, args.concurrency, bon_size(budgets), rows,
                    [c for c in configs if c.strategy != "best_of_n"], "calibrate")
    run_s = time.monotonic() - t0
    ids = complete_ids(rows, recs, "calibrate")
    gen = generation_flops(recs[i] for i in ids)
    est, k, report = choose_estimator(ids, recs, configs, budgets, gen, args.reward)
    table = build_table(ids, recs, configs, k, budgets, gen, args.reward, est)
    table.models = model_info(gws)
    table.generation_flops = gen
    table.calibration = {"problem_ids": ids, "datasets": args.dataset, "seed": args.seed, "problems": len(ids),
                         "configs": [c.key for c in configs], "estimator_cv": report,
                         "cost_accounting": "see service/offline/calibrate.py docstring", "run_seconds": round(run_s)}
    table.save(args.out)
    print(f"wrote {args.out}: estimator {est} (probe k={k}), cuts {[round(c, 3) for c in table.cuts]}, "
          f"1 generation = {gen['per_generation']:.3g} FLOPs; run {run_s:.0f} s")
    for name, r in report.items():
        print(f"  CV {name}: accuracy per budget {[round(a, 3) for a in r['accuracy']]} "
              f"mean {r['mean_accuracy']:.3f}")
    for e in table.entries:
        print(f"  bin {e['bin']} budget {e['budget_generations']:>2} gen: {config_key(e['strategy'], e['params'])}"
              f"  cv-acc {e['expected_accuracy']:.2f}  flops {e['mean_flops']:.3g}  n={e['n_problems']}")
    return 0

