"""The FastAPI application: lifespan (start/stop workers and clients), middleware, routes, error handlers."""

from __future__ import annotations

import gc
import logging
import os
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Protocol

from fastapi import FastAPI

from ..config import Settings
from ..metrics import Metrics, mark_process_dead, multiproc_dir
from ..serving.handler import Serving
from .errors import install_handlers
from .middleware import FrontDoor
from .fastpath import FastRoutes
from .routes import FAST_ROUTES, router

log = logging.getLogger("ttc.api")


class Runtime(Protocol):
    """What the app needs of the gateway's long-lived parts (built by service/gateway.py, the composition root,
    which imports this module and never the other way round)."""

    settings: Settings
    serving: Serving
    metrics: Metrics
    admission: Any
    policy: Any
    draining: bool
    started_at: int

    @property
    def ready(self) -> bool: ...

    @property
    def pools(self) -> list[Any]: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def freeze_startup_heap() -> None:
    """Moves everything alive after startup (~150k objects: FastAPI, pydantic, math-verify, the tables) out of the
    collector's reach. Otherwise each full collection scans them all: measured 50-140 ms of a stalled event loop,
    about once every 4000 requests, all of it tail latency for the requests in flight."""
    gc.collect()
    gc.freeze()


def create_app(settings: Settings, gw: Runtime) -> FrontDoor:

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gw.start()
        freeze_startup_heap()
        log.info("ttc-gateway ready on %s:%d (policy model %s)", settings.host, settings.port, gw.policy.model)
        try:
            yield
        finally:
            gw.draining = True
            await gw.stop()
            if multiproc_dir():
                mark_process_dead(os.getpid())  # its live gauges leave the sums; its counters stay
            log.info("ttc-gateway stopped")

    app = FastAPI(title="ttc-gateway", version="0.1.0", lifespan=lifespan)
    app.state.gateway = gw  # /v1/models, /ready, /metrics
    app.state.serving = gw.serving  # the completion routes
    install_handlers(app)
    app.include_router(router)
    return FrontDoor(FastRoutes(app, FAST_ROUTES), max_body_bytes=settings.max_body_bytes, api_key_hashes=settings.api_key_hashes,
                     protect_metrics=settings.protect_metrics)
