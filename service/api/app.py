"""The FastAPI application: lifespan (start/stop workers and clients), middleware, routes, error handlers."""

from __future__ import annotations

import logging
import os
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI

from ..config import Settings
from ..gateway import Gateway
from ..metrics import mark_process_dead, multiproc_dir
from .errors import install_handlers
from .middleware import FrontDoor
from .routes import router

log = logging.getLogger("ttc.api")


def create_app(settings: Settings, gateway: Gateway | None = None) -> FrontDoor:
    gw = gateway or Gateway(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gw.start()
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
    app.state.gateway = gw
    install_handlers(app)
    app.include_router(router)
    return FrontDoor(app, max_body_bytes=settings.max_body_bytes, api_key_hashes=settings.api_key_hashes,
                     protect_metrics=settings.protect_metrics)


def app_from_env() -> FrontDoor:
    """Factory for uvicorn's multi-process mode (`serve --workers N`): each process builds its own app."""
    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return create_app(settings)
