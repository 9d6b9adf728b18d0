"""POST /v1/recommend for the request that needs nothing from the framework but its answer.

A recommendation spends more CPU in FastAPI's request machinery (eight ASGI layers, routing,
seven dependencies, the body read twice) than in its retrieval search. This ASGI middleware
answers the common request itself, from the same objects and the same use case the route runs
(service/recommend.py): a JSON body that `RecommendRequest` accepts, a loaded service, no
dependency overrides. Every other request goes to FastAPI unchanged (the body replayed), and so
does every request the fast path cannot answer with a 200: a body FastAPI would refuse, a
missing read key, a full compute queue, a field the use case refuses (InvalidRequest: a 422
there). FastAPI then produces exactly the response it always did, so errors have one source and
the OpenAPI schema is FastAPI's.

The body is validated as FastAPI's route validates it (service.strict_json.loads, as its
StrictJSONRoute does, then the model in Python mode), so a body is accepted here exactly when the
route would accept it.
"""

from __future__ import annotations

from fastapi import FastAPI, HTTPException
from fastapi.routing import APIRoute, APIRouter
from pydantic import ValidationError
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.deps import check_read_key
from service.compute import ComputeBusy
from service.recommend import InvalidRequest, RecommendContext, as_json, recommend
from service.schemas import RecommendRequest
from service.strict_json import loads

PATH = "/v1/recommend"
JSON = "application/json"


class RecommendFastPath:
    def __init__(self, app: ASGIApp, api: FastAPI, router: APIRouter) -> None:
        """router: the one holding the POST /v1/recommend route (service/api/routes/recommend.py),
        handed in by service/main.py so that this module stays below the routes."""
        self.app = app
        self.api = api
        # the route FastAPI would match (its path is the metrics label)
        self.route = next(r for r in router.routes if isinstance(r, APIRoute) and r.path == PATH
                          and "POST" in (r.methods or ()))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != PATH
                or self.api.dependency_overrides):
            await self.app(scope, receive, send)
            return
        headers: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            headers.setdefault(name, value)  # the first of a repeated header, as FastAPI's Header() reads it
        if headers.get(b"content-type", b"").split(b";")[0].strip().lower() != b"application/json":
            await self.app(scope, receive, send)
            return
        body, complete = await _read_body(receive)
        if not complete:
            return  # the client went away
        response = await self._answer(body, headers)
        if response is None:  # FastAPI answers, from the body as it came
            await self.app(scope, _replay(body, receive), send)
            return
        scope["route"] = self.route  # what the routing would set (the metrics label)
        await response(scope, receive, send)

    async def _answer(self, body: bytes, headers: dict[bytes, bytes]) -> Response | None:
        """The 200 response, or None when FastAPI should answer."""
        state = self.api.state
        rec, store, compute, settings = state.recommender, state.store, state.compute, state.settings
        if rec is None or store is None or compute is None or settings is None:
            return None
        try:
            req = RecommendRequest.model_validate(loads(body))
        except (ValueError, ValidationError):  # strict_json.BodyError is a ValueError: FastAPI's route refuses it too
            return None
        try:
            if req.history is None and req.user_id is not None:
                key = headers.get(b"x-api-key")
                check_read_key(settings, None if key is None else key.decode("latin-1"))
            ctx = RecommendContext(rec, store, state.metrics, settings.timeout_ms, state.impressions,
                                   state.experiment)
            return Response(await compute.run(as_json, recommend, ctx, req), media_type=JSON)
        except (HTTPException, InvalidRequest, ComputeBusy):  # FastAPI gives the 4xx / 503
            return None


async def _read_body(receive: Receive) -> tuple[bytes, bool]:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"", False
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), True


def _replay(body: bytes, receive: Receive) -> Receive:
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay
