"""Strict request bodies and error answers that always render (issue 23).

- :class:`StrictJSONRoute`: the route class of every router with a JSON body. It parses the body
  with service.strict_json (no NaN / inf, no lone surrogate, nesting at most MAX_DEPTH) before
  FastAPI does, and hands FastAPI the parsed value; a body it refuses is a 422 naming the field,
  after the route's key check (a client without the key gets its 401, not a description of its
  body). The fast path (service/fast_path.py) parses with the same function, so a body is refused
  the same way on both paths.
- :func:`validation_error`: the 422 handler. FastAPI's echoes each error's `input`, which fails
  to render when it holds what the body parser let through (the 500s of issue 23); this one keeps
  an input only when it renders as strict JSON in a few hundred bytes.
- :class:`ServerErrorLog`: an exception that escapes a route is answered 500 and logged in at
  most a few KiB (type, message cut short, the last frames; never the request body), not the
  server's full traceback with every chained exception's text.
"""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import Callable, Coroutine, Iterable, Iterator
from typing import Any

from fastapi import Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.deps import check_api_key, check_read_key, require_api_key
from service.core.config import Settings
from service.strict_json import BodyError, loads

logger = logging.getLogger(__name__)

MAX_INPUT_BYTES = 256  # an error's `input` is echoed only when it renders in this much
MAX_ERRORS = 64  # errors listed in one 422
MAX_LOG_MESSAGE = 500  # characters of an unhandled exception's message that are logged
MAX_LOG_FRAMES = 8
JSON = "application/json"


def wants_json(content_type: str | None) -> bool:
    """Whether FastAPI parses a body of this content type as JSON (strict content types: a body
    without one stays bytes): application/json or application/*+json."""
    if not content_type:
        return False
    main = content_type.split(";", 1)[0].strip().lower()
    kind, _, sub = main.partition("/")
    return kind == "application" and (sub == "json" or sub.endswith("+json"))


class StrictJSONRoute(APIRoute):
    """An APIRoute whose JSON body is parsed by service.strict_json.loads."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler
        needs_api_key = _depends_on(self, require_api_key)

        async def strict(request: Request) -> Response:
            if wants_json(request.headers.get("content-type")):
                body = await request.body()
                if body:
                    try:
                        request._json = loads(body)  # what Request.json() returns to FastAPI from here on
                    except BodyError as exc:
                        settings: Settings = request.app.state.settings
                        key = request.headers.get("x-api-key")
                        if needs_api_key:
                            check_api_key(settings, key)
                        elif _names_a_user(body):
                            check_read_key(settings, key)
                        raise RequestValidationError([{"type": "json_invalid", "loc": exc.loc, "msg": exc.msg,
                                                       "input": None}]) from None
            return await handler(request)

        return strict


def _depends_on(route: APIRoute, call: Callable[..., Any]) -> bool:
    stack = list(route.dependant.dependencies)
    while stack:
        dep = stack.pop()
        if dep.call is call:
            return True
        stack.extend(dep.dependencies)
    return False


def _names_a_user(body: bytes) -> bool:
    """Whether a recommend body the strict parser refused asks for a stored history (user_id
    without history, in it or in any request of a batch), read as leniently as json allows: the
    read key is checked before the body is described. False for anything json cannot read."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return False
    requests: list[Any] = [obj]
    if isinstance(obj, dict) and isinstance(obj.get("requests"), list):
        requests = obj["requests"]
    return any(isinstance(r, dict) and r.get("user_id") is not None and r.get("history") is None for r in requests)


def _renders(value: Any) -> bool:
    try:
        return len(json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")) <= MAX_INPUT_BYTES
    except (TypeError, ValueError):  # UnicodeEncodeError is a ValueError
        return False


def _text(value: object) -> str:
    """A string that encodes to UTF-8 (lone surrogates escaped)."""
    return str(value).encode("utf-8", "backslashreplace").decode("utf-8")


def safe_errors(errors: Any) -> list[dict[str, Any]]:
    """Validation errors reduced to what always renders: loc, msg, type, and input / ctx only
    when small and strict JSON."""
    out: list[dict[str, Any]] = []
    for e in list(errors)[:MAX_ERRORS]:
        item: dict[str, Any] = {"type": _text(e.get("type", "value_error")),
                                "loc": [p if isinstance(p, int) else _text(p) for p in e.get("loc") or ()],
                                "msg": _text(e.get("msg", ""))}
        if "input" in e and _renders(e["input"]):
            item["input"] = e["input"]
        ctx = e.get("ctx")
        if isinstance(ctx, dict):
            ctx = {_text(k): v if _renders(v) else _text(v)[:MAX_INPUT_BYTES] for k, v in ctx.items()}
            item["ctx"] = ctx
        out.append(item)
    return out


async def validation_error(request: Request, exc: Exception) -> Response:
    """The 422 of every route: {"detail": [{loc, msg, type[, input][, ctx]}]}, always renderable."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    body = json.dumps({"detail": safe_errors(errors)}, ensure_ascii=False, allow_nan=False).encode("utf-8")
    return Response(body, status_code=422, media_type=JSON)


class ServerErrorLog:
    """Outer ASGI middleware: an exception from the app -> a 500 (when nothing was sent yet) and
    one bounded log record, instead of the server's unbounded traceback."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:  # noqa: BLE001  every escaping error: one bounded record, a 500
            frames = "".join(traceback.format_tb(exc.__traceback__)[-MAX_LOG_FRAMES:])
            logger.error("unhandled %s on %s %s: %s\n%s", type(exc).__name__, scope.get("method"),
                         _text(scope.get("path", ""))[:200], _text(exc)[:MAX_LOG_MESSAGE], frames[-4000:])
            if not started:
                body = b'{"detail":"internal error"}'
                await send({"type": "http.response.start", "status": 500,
                            "headers": [(b"content-type", JSON.encode()), (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})


def _leaf_routes(routes: Iterable[BaseRoute]) -> Iterator[BaseRoute]:
    """Every route, included routers' routes flattened (FastAPI wraps an included router)."""
    for route in routes:
        sub = getattr(route, "original_router", None)
        if sub is not None:
            yield from _leaf_routes(sub.routes)
        else:
            yield route


async def method_not_allowed(request: Request, exc: Exception) -> Response:
    """HTTP errors as FastAPI renders them, except that a 405's `Allow` lists every method of the
    path: FastAPI keeps one route per method, and Starlette names only the first route's methods
    (GET for GET / PUT / DELETE /v1/admin/experiment)."""
    assert isinstance(exc, StarletteHTTPException)
    response = await http_exception_handler(request, exc)
    if exc.status_code == 405:
        path = request.url.path
        methods: set[str] = set()
        for route in _leaf_routes(request.app.routes):
            if isinstance(route, Route | APIRoute) and route.methods and route.path_regex.match(path):
                methods |= route.methods
        if methods:
            response.headers["Allow"] = ", ".join(sorted(methods))
    return response
