"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}} with the right HTTP status. The one place
that knows which status each of the gateway's own errors (service/errors.py) is answered with."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from .. import errors as domain

log = logging.getLogger("ttc.api")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
          413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 502: "server_error",
          503: "service_unavailable", 504: "timeout_error"}

MAX_MESSAGE_CHARS = 1000  # an error body stays small whatever the input (vLLM once echoed 23 MB)


class BodyTooLarge(Exception):
    """A chunked body grew past the limit while being read; mapped to 413."""


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type_: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or _TYPES.get(status, "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + "..."
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(err: APIError, request_id: str | None = None) -> Response:
    # X-Request-Id is added to every response by the front door (once).
    headers = dict(err.headers)
    return Response(orjson.dumps(err.body()), status_code=err.status, media_type="application/json",
                    headers=headers)


# Most specific first: BudgetExceeded is an InvalidParameter.
_STATUS: tuple[tuple[type[domain.ServiceError], int], ...] = (
    (domain.InvalidParameter, 400),
    (domain.UpstreamRejected, 400),  # the worker refused the client's request: the client's fault
    (domain.NotAllowed, 403),
    (domain.UnknownModel, 404),
    (domain.QuotaExhausted, 429),
    (domain.UpstreamError, 502),
    (domain.Overloaded, 503),
    (domain.Unavailable, 503),
    (domain.DeadlineExceeded, 504),
)


def status_of(err: domain.ServiceError) -> int:
    return next((status for kind, status in _STATUS if isinstance(err, kind)), 500)


def from_service(err: domain.ServiceError) -> APIError:
    headers: dict[str, str] = {}
    if err.retry_after_s is not None:
        headers["Retry-After"] = str(err.retry_after_s)
    type_ = None
    if isinstance(err, domain.QuotaExhausted):
        # A spent cumulative budget: SDKs must not retry at once (they would on a bare 429).
        headers["x-should-retry"] = "false"
        type_ = "insufficient_quota"
    return APIError(status_of(err), err.message, param=err.param, code=err.code, type_=type_, headers=headers)


def _param_of(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts) or None


def validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {}
    param = _param_of(tuple(first.get("loc", ())))
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        msg = f"Unrecognized or unsupported request argument: {param}"
        code = "unsupported_parameter"
    elif kind == "json_invalid":
        msg = "Request body is not valid JSON"
        code, param = "invalid_json", None
    elif kind == "missing":
        msg = f"Missing required parameter: {param}"
        code = "missing_required_parameter"
    else:
        msg = f"Invalid value for {param}: {first.get('msg', 'invalid')}" if param else str(first.get("msg"))
        code = "invalid_value"
    return APIError(400, msg, param=param, code=code)


def install_handlers(app: FastAPI) -> None:
    def rid(request: Request) -> str | None:
        return getattr(request.state, "request_id", None)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return error_response(exc, rid(request))

    @app.exception_handler(domain.ServiceError)
    async def _service_error(request: Request, exc: domain.ServiceError) -> Response:
        return error_response(from_service(exc), rid(request))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        return error_response(validation_error(exc), rid(request))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        message = exc.detail if isinstance(exc.detail, str) else "HTTP error"
        if exc.status_code == 404:
            message = f"Unknown path: {request.url.path}"
        return error_response(APIError(exc.status_code, message), rid(request))

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, exc: BodyTooLarge) -> Response:
        return error_response(APIError(413, "Request body too large", code="request_too_large"), rid(request))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(APIError(500, "Internal server error", code="internal_error"), rid(request))
