"""The two completion routes without Starlette's routing and FastAPI's dependency machinery, for valid requests.

Profiled on 1-token pass-through requests, the framework layers between the front door and the route function
(five middleware and router frames, two exit stacks per request, route matching, the dependency solver, a stdlib
JSON parse and an email.message parse of the content type) were a large part of the gateway's own time. At
concurrency 32 that cost is paid once per request of a burst: an engine step answers its whole batch at once, and
the gateway handles the answers one after another.

Exactly the same behaviour, by construction: a request takes this path only when it is a POST to one of the two
routes with a JSON content type, its body parses as JSON and validates as the route's model. Everything else
(invalid JSON, validation errors, other content types, a body over the limit, a client gone mid-body) is handed to
the FastAPI app with the very messages read so far replayed, so FastAPI produces its answer as before. Errors raised
while serving go through the app's own exception handlers, as Starlette's ExceptionMiddleware would call them.
"""

from __future__ import annotations

from typing import Any, Callable

import orjson
from fastapi import FastAPI
from pydantic import BaseModel, ValidationError
from starlette.requests import Request

# path -> (the body's model, the route function, called as fn(body, request)).
Routes = dict[str, tuple[type[BaseModel], Callable[..., Any]]]


class FastRoutes:
    def __init__(self, app: FastAPI, routes: Routes):
        self.app = app
        self.routes = routes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        route = self.routes.get(scope.get("path", "")) if scope["type"] == "http" else None
        if route is None or scope["method"] != "POST" or scope.get("root_path") or not _json_content(scope):
            await self.app(scope, receive, send)
            return
        messages: list[dict] = []
        failure: BaseException | None = None
        try:
            while True:
                message = await receive()
                messages.append(message)
                if message["type"] != "http.request" or not message.get("more_body", False):
                    break
        except Exception as exc:  # e.g. BodyTooLarge from the front door's guard: FastAPI meets it as before
            failure = exc
        body = None
        if failure is None and messages and messages[-1]["type"] == "http.request":
            raw = b"".join(m.get("body", b"") for m in messages)
            try:
                body = route[0].model_validate(orjson.loads(raw)) if raw else None
            except (orjson.JSONDecodeError, ValidationError, TypeError, ValueError):
                body = None
        if body is None:
            await self.app(scope, _replay(messages, failure, receive), send)
            return
        scope["app"] = self.app  # what Request.app reads; Starlette's own __call__ would have set it
        request = Request(scope, receive)
        try:
            response = await route[1](body, request)
        except Exception as exc:
            handler, unexpected = _handler_for(self.app, exc)
            if handler is None:
                raise
            await (await handler(request, exc))(scope, receive, send)
            if unexpected:
                raise  # as Starlette's ServerErrorMiddleware: answered with a 500, then raised to the server
            return
        await response(scope, receive, send)


def _json_content(scope: dict) -> bool:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-type":
            main = value.split(b";", 1)[0].strip().lower()
            return main == b"application/json"
    return False


def _handler_for(app: FastAPI, exc: Exception) -> tuple[Callable[..., Any] | None, bool]:
    """The handler Starlette would call for `exc` (its ExceptionMiddleware's, by class, else the 500 one), and
    whether it is the 500 one (after which Starlette raises the exception on)."""
    handlers = app.exception_handlers
    for cls in type(exc).__mro__:
        if cls in handlers and cls is not Exception:
            return handlers[cls], False
    return handlers.get(500) or handlers.get(Exception), True


def _replay(messages: list[dict], failure: BaseException | None, receive: Callable) -> Callable:
    pending = list(messages)

    async def replay() -> dict:
        if pending:
            return pending.pop(0)
        if failure is not None:
            raise failure
        return await receive()

    return replay
