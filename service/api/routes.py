"""HTTP routes: thin. Parse, build the request context, hand over to serving."""

from __future__ import annotations

import os
import time

import orjson
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.responses import Response

from ..serving.context import RequestContext
from .errors import APIError, validation_error
from .http import to_response
from ..protocol.completions import ChatCompletionRequest, CompletionRequest
from ..protocol.tools import refused_fields
from .responses_api import as_responses
from ..protocol.responses import ResponsesRequest, to_chat

router = APIRouter()


def _json(payload: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json", headers=headers)


def _context(request: Request, route: str) -> RequestContext:
    return RequestContext(
        route=route,
        request_id=request.state.request_id,
        tenant=getattr(request.state, "tenant", "anonymous"),
        key_hash=getattr(request.state, "key_hash", ""),
        headers=getattr(request.state, "headers", None) or {k.lower(): v for k, v in request.headers.items()},
        started=getattr(request.state, "arrived", None) or time.monotonic(),
    )


def _refuse(refused: tuple[str, str] | None) -> None:
    """A field that would change the answer and cannot be honoured: 400 naming it and why."""
    if refused is not None:
        name, why = refused
        raise APIError(400, f"{name} is not supported: {why}", param=name, code="unsupported_parameter")


async def _serve(request: Request, ctx: RequestContext, body: ChatCompletionRequest | CompletionRequest) -> Response:
    result = await request.app.state.serving.handle(ctx, body, request.is_disconnected)
    return to_response(result, ctx)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    _refuse(refused_fields(body.__dict__))
    return await _serve(request, _context(request, "chat"), body)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    _refuse(refused_fields(body.__dict__))
    return await _serve(request, _context(request, "completions"), body)


# The same two routes, served by api/fastpath.py for valid JSON bodies (FastAPI serves everything else).
FAST_ROUTES = {"/v1/chat/completions": (ChatCompletionRequest, chat_completions),
               "/v1/completions": (CompletionRequest, completions)}


@router.post("/v1/responses")
async def responses(body: ResponsesRequest, request: Request) -> Response:
    """The Responses API, served by the chat path (same limits, budgets, strategies, headers)."""
    _refuse(body.refused())
    try:
        chat = to_chat(body)
    except ValidationError as exc:  # e.g. a tool_choice naming no tool: the same 400 as on the chat route
        raise validation_error(RequestValidationError(exc.errors()))
    ctx = _context(request, "chat")
    ctx.path = "/v1/responses"
    return as_responses(body, await _serve(request, ctx, chat))


@router.get("/v1/models")
async def models(request: Request) -> Response:
    gw = request.app.state.gateway
    card = {"id": gw.policy.model, "object": "model", "created": gw.started_at, "owned_by": "ttc-gateway",
            "root": gw.policy.model, "parent": None, "max_model_len": gw.settings.policy.max_model_len}
    return _json({"object": "list", "data": [card]})


@router.get("/health")
async def health() -> Response:
    return _json({"status": "ok"})


@router.get("/ready")
async def ready(request: Request) -> Response:
    gw = request.app.state.gateway
    body: dict = {"ready": gw.ready, "draining": gw.draining}
    if getattr(request.state, "privileged", True):
        # Worker URLs, pids and errors: for operators (a key, or a gateway without keys), not for anyone.
        body.update(pools={p.name: p.status() for p in gw.pools}, pid=os.getpid(), time=time.time())
    if gw.ready:
        return _json(body)
    return _json(body, 503, {"Retry-After": str(gw.settings.retry_after_s)})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    body, content_type = request.app.state.gateway.metrics.render_latest()
    return Response(body, media_type=content_type)
