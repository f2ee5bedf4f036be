"""The gateway's long-lived parts, built once from Settings: worker pools and their clients, the supervisor of
co-located workers, the metrics and the cache. The HTTP layer holds one `Gateway` and passes requests to `serving`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from .config import Settings
from .metering import ModelShape
from .workers.policy import PolicyClient
from .workers.pool import WorkerPool
from .workers.supervisor import ManagedWorker, Supervisor, WorkerSpec

log = logging.getLogger("ttc.gateway")


def resolve_model_dir(settings: Settings, model: str, served_name: str) -> str:
    """A configured model (folder or id), else the prepared bundled folder of that name."""
    return model or str(settings.models_dir / served_name)


def load_shape(model: str, config_path: str) -> ModelShape:
    if config_path:
        return ModelShape.from_path(config_path)
    if Path(model).is_dir():
        return ModelShape.from_path(model)
    # A hub id on a machine that reaches the hub (GPU deployments).
    from huggingface_hub import hf_hub_download

    return ModelShape.from_path(hf_hub_download(model, "config.json"))


class Gateway:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.supervisor = Supervisor()
        self.policy_pool = self._build_pool("policy", settings.policy)
        policy_model = resolve_model_dir(settings, settings.policy.model, settings.policy.served_name)
        self.policy = PolicyClient(self.policy_pool, load_shape(policy_model, settings.policy.config_path))
        self.draining = False
        self.started_at = int(time.time())
        self._health_task: asyncio.Task | None = None

    def _build_pool(self, role: str, pool_settings) -> WorkerPool:
        s = self.settings
        if pool_settings.embedded:
            urls = [f"http://127.0.0.1:{pool_settings.port + i}" for i in range(pool_settings.replicas)]
        else:
            urls = pool_settings.urls
        pool = WorkerPool.from_urls(role, pool_settings.served_name, urls,
                                    connect_timeout_s=s.upstream_connect_timeout_s,
                                    request_timeout_s=s.request_timeout_s)
        if pool_settings.embedded:
            model_dir = resolve_model_dir(s, pool_settings.model, pool_settings.served_name)
            for i, ep in enumerate(pool.endpoints):
                spec = WorkerSpec(role=role, model_dir=model_dir, served_name=pool_settings.served_name,
                                  port=pool_settings.port + i, max_model_len=pool_settings.max_model_len,
                                  dtype=pool_settings.dtype, kv_cache_gib=pool_settings.kv_cache_gib,
                                  pooling=(role == "reward"), extra_args=pool_settings.extra_args)
                self.supervisor.add(ManagedWorker(spec, ep, s.models_dir.parent / "logs", s.vllm_cpu_threads,
                                                  s.worker_start_timeout_s, s.worker_restart), pool)
        return pool

    @property
    def pools(self) -> list[WorkerPool]:
        return [self.policy_pool]

    @property
    def ready(self) -> bool:
        return not self.draining and all(p.ready for p in self.pools)

    async def start(self) -> None:
        await self.supervisor.start_all()
        for pool in self.pools:
            await pool.check_health()
        self._health_task = asyncio.create_task(self._health_loop(), name="worker-health")

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval_s)
            for pool in self.pools:
                try:
                    await pool.check_health()
                except Exception:  # the loop must outlive any single failed probe
                    log.exception("health check of %s failed", pool.name)

    async def stop(self) -> None:
        if self._health_task:
            self._health_task.cancel()
        await self.supervisor.stop_all()
        for pool in self.pools:
            await pool.close()
