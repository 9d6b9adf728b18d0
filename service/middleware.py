"""ASGI middleware: request ids, CORS, request-body size limit (413) and per-request Prometheus timing.

Plain ASGI rather than Starlette's BaseHTTPMiddleware: no extra task or body copy per request.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core.logs import request_id
from service.metrics import Metrics


class BodyLimitMiddleware:
    """413 for a body over `max_bytes()`: by Content-Length up front, else while it streams in."""

    def __init__(self, app: ASGIApp, max_bytes: Callable[[], int]) -> None:
        self.app = app
        self.limit = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit()
        length = next((value for name, value in scope["headers"] if name == b"content-length"), None)
        if length is not None:
            if not length.isdigit():
                await self._reject(send, 400, "Content-Length is not an integer")
            elif int(length) > limit:
                await self._reject(send, 413, f"request body of {int(length)} bytes exceeds {limit}")
            else:  # the server reads no more than the declared length
                await self.app(scope, receive, send)
            return
        if scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        # streamed (chunked) body: read it here up to the limit, then replay it to the app (the
        # framework turns any exception raised while it reads the body into a 400)
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # client went away
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > limit:
                await self._reject(send, 413, f"request body exceeds {limit} bytes")
                return
            if not message.get("more_body", False):
                break
        replay: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay_receive() -> Message:
            return replay.pop() if replay else await receive()

        await self.app(scope, replay_receive, send)

    @staticmethod
    async def _reject(send: Send, status: int, msg: str) -> None:
        body = json.dumps({"detail": [{"loc": ["body"], "msg": msg, "type": "body_too_large"}]}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class MetricsMiddleware:
    """Observe every HTTP request's latency under its route template (not the raw path, which
    would make one time series per user id) and count responses >= 400."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # an exception escaping the app is answered 500 by the server

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route: Any = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            m = self.metrics
            m.child(m.request_seconds, template, scope["method"], str(status)).observe(time.perf_counter() - start)
            if status >= 400:
                m.child(m.errors, template, str(status)).inc()


REQUEST_ID_HEADER = b"x-request-id"
_ID_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.:")
MAX_REQUEST_ID = 128


def _valid_request_id(value: bytes) -> bool:
    """1-128 of [A-Za-z0-9-_.:]: a client's id is logged as sent, so nothing that could forge a line."""
    return 0 < len(value) <= MAX_REQUEST_ID and all(c in _ID_CHARS for c in value)


class RequestIdMiddleware:
    """Every request gets an id: the client's X-Request-ID when it is a plain token, else a new
    one (32 hex digits). It is echoed in the response's X-Request-ID header and set in
    service.core.logs.request_id for every log line of the request (uvicorn's access line too)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == REQUEST_ID_HEADER), None)
        rid = given.decode("ascii") if given is not None and _valid_request_id(given) else uuid.uuid4().hex
        raw = rid.encode("ascii")

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID_HEADER]
                message = {**message, "headers": [*headers, (REQUEST_ID_HEADER, raw)]}
            await send(message)

        token = request_id.set(rid)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id.reset(token)


class CorsMiddleware:
    """Starlette's CORSMiddleware for the origins `origins()` names once the settings are known
    (RECSYS_CORS_ORIGINS, read at start-up); no origins: requests pass through untouched, and a
    preflight (OPTIONS) gets the API's 405."""

    def __init__(self, app: ASGIApp, origins: Callable[[], tuple[str, ...]]) -> None:
        self.app = app
        self.origins = origins
        self._built: tuple[tuple[str, ...], ASGIApp] | None = None

    def _inner(self) -> ASGIApp:
        origins = self.origins()
        if self._built is None or self._built[0] != origins:
            inner = self.app if not origins else CORSMiddleware(
                self.app, allow_origins=list(origins), allow_methods=["GET", "POST", "PUT"],
                allow_headers=["Content-Type", "X-API-Key", "X-Request-ID"], expose_headers=["X-Request-ID"],
                max_age=600)
            self._built = (origins, inner)
        return self._built[1]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self._inner()(scope, receive, send)
