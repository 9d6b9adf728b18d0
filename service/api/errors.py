"""Error bodies of the v1 API, in one place so the OpenAPI document lists every status a route
can answer and every 422 has the same shape.

422 (and the middleware's 413): ``{"detail": [{"loc": [...], "msg": "...", "type": "..."}]}``,
FastAPI's validation-error list, also for checks made after parsing (filters, store-refused
ids, batch limits): raise :func:`unprocessable`. Every other error: ``{"detail": "..."}``.
"""

from __future__ import annotations

from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel


class ErrorOut(BaseModel):
    detail: str


class ErrorItem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorOut(BaseModel):
    detail: list[ErrorItem]


def unprocessable(loc: tuple[str | int, ...], msg: str, kind: str = "value_error") -> RequestValidationError:
    """A 422 in the one shape, for a check made after parsing."""
    return RequestValidationError([{"type": kind, "loc": loc, "msg": msg, "input": None}])


def _doc(text: str, model: type[BaseModel] = ErrorOut) -> dict[str, Any]:
    return {"model": model, "description": text}


BAD_BODY: dict[int | str, dict[str, Any]] = {
    400: _doc("the body could not be read (e.g. not UTF-8, or a bad Content-Length)"),
    413: _doc("the body is larger than RECSYS_MAX_BODY_BYTES", ValidationErrorOut),
    422: _doc("a field is invalid; `loc` names it", ValidationErrorOut),
}
INVALID: dict[int | str, dict[str, Any]] = {422: _doc("a field is invalid; `loc` names it", ValidationErrorOut)}
NOT_LOADED: dict[int | str, dict[str, Any]] = {
    503: _doc("no artifact version loaded yet, the store is down, or the worker is busy (RECSYS_COMPUTE_QUEUE)")}
AUTH: dict[int | str, dict[str, Any]] = {
    401: _doc("missing or wrong X-API-Key"),
    403: _doc("writes are disabled: no RECSYS_API_KEY and RECSYS_ALLOW_ANONYMOUS_WRITES is not set"),
}
READ_AUTH: dict[int | str, dict[str, Any]] = {401: _doc("per-user reads need X-API-Key (RECSYS_READ_KEY is set)")}
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: _doc("no such item in the served version")}
CONFLICT: dict[int | str, dict[str, Any]] = {409: _doc("the version CURRENT names does not load; the old one is kept")}
UNKNOWN_OUTCOME: dict[int | str, dict[str, Any]] = {
    504: _doc("the store did not answer in time: the write may or may not have happened; "
              "safe to retry with the same event_id")}
