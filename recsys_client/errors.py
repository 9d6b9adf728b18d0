"""Typed errors of the recsys API: one class per answer a caller handles differently."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FieldError:
    """One entry of a 422: `loc` is the path of the refused field (e.g. ("body", "k"))."""

    loc: tuple[str | int, ...]
    msg: str
    type: str

    @property
    def field(self) -> str:
        """The field's path without its location kind: "k", "requests.1.filters.genre", "user_id"."""
        parts = self.loc[1:] if self.loc and self.loc[0] in ("body", "path", "query", "header") else self.loc
        return ".".join(map(str, parts))


class RecsysError(Exception):
    """Any answer other than success; `status` is the HTTP status, `detail` the server's message
    and `request_id` the X-Request-ID the server logged the request under."""

    def __init__(self, status: int, detail: str, request_id: str | None = None) -> None:
        super().__init__(f"{status}: {detail}" + (f" (request id {request_id})" if request_id else ""))
        self.status = status
        self.detail = detail
        self.request_id = request_id


class BadRequest(RecsysError):
    """400: the body could not be read."""


class AuthError(RecsysError):
    """401 (missing or wrong X-API-Key) or 403 (writes are disabled on this server)."""


class NotFound(RecsysError):
    """404: e.g. an item the served version does not have."""


class Conflict(RecsysError):
    """409: the version to reload does not load (the old one is kept)."""


class PayloadTooLarge(RecsysError):
    """413: the body is larger than the server accepts."""


class InvalidRequest(RecsysError):
    """422: a field was refused; `errors` lists every refused field, `field` names the first."""

    def __init__(self, status: int, errors: list[FieldError], request_id: str | None = None) -> None:
        super().__init__(status, "; ".join(f"{e.field}: {e.msg}" for e in errors) or "invalid request", request_id)
        self.errors = errors

    @property
    def field(self) -> str:
        return self.errors[0].field if self.errors else ""


class Unavailable(RecsysError):
    """503: nothing was done (no version loaded, the store is down, the server is busy); retry later."""


class OutcomeUnknown(RecsysError):
    """504: the server could not confirm a write; it may or may not have happened. Retrying an
    event with the same event_id is safe (the client does so)."""


class ServerError(RecsysError):
    """Any other 5xx."""


BY_STATUS: dict[int, type[RecsysError]] = {400: BadRequest, 401: AuthError, 403: AuthError, 404: NotFound,
                                           409: Conflict, 413: PayloadTooLarge, 503: Unavailable, 504: OutcomeUnknown}


def error_for(status: int, body: Any, request_id: str | None) -> RecsysError:
    """The typed error of a non-2xx answer (body: its parsed JSON, or its text)."""
    detail = body.get("detail") if isinstance(body, dict) else body
    if status in (413, 422) and isinstance(detail, list):
        errors = [FieldError(tuple(e.get("loc", ())), str(e.get("msg", "")), str(e.get("type", "")))
                  for e in detail if isinstance(e, dict)]
        if status == 422:
            return InvalidRequest(status, errors, request_id)
        return PayloadTooLarge(status, "; ".join(e.msg for e in errors), request_id)
    cls = BY_STATUS.get(status, ServerError if status >= 500 else RecsysError)
    return cls(status, str(detail), request_id)
