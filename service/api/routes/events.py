"""POST /v1/events (one event or a list) and GET /v1/users/{user_id}/history.

Write outcomes: 202 the events are stored (`duplicates` counts events whose `event_id` was
already stored: retries, not appended again); 503 nothing was written (the store could not be
reached), retry later; 504 the store did not answer in time: the events may or may not be
stored, and retrying with the same `event_id`s is safe.
"""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any

from fastapi import APIRouter, Body, HTTPException, Path, status
from fastapi.responses import JSONResponse
from pydantic import TypeAdapter

from service.api.deps import ApiKeyDep, ReadKeyDep, StoreDep, one_or_many, one_or_many_body
from service.api.strict import StrictJSONRoute
from service.api.errors import AUTH, BAD_BODY, INVALID, NOT_LOADED, READ_AUTH, UNKNOWN_OUTCOME, unprocessable
from service.schemas import ID_PATTERN, MAX_EVENTS, EventIn, EventsAccepted, EventsList, HistoryOut
from service.stores import MAX_ID_LEN, Event, StoreError, StoreOutcomeUnknown, StoreUnavailable

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["events"], route_class=StrictJSONRoute)

DEFAULT_EVENT_TYPE = "view"
_EVENTS = TypeAdapter(EventsList)
UserIdPath = Annotated[str, Path(min_length=1, max_length=MAX_ID_LEN, pattern=ID_PATTERN)]


@router.post("/events", response_model=EventsAccepted, status_code=status.HTTP_202_ACCEPTED,
             openapi_extra=one_or_many_body(EventIn, MAX_EVENTS),
             responses={**BAD_BODY, **AUTH, **NOT_LOADED, **UNKNOWN_OUTCOME})
def post_events(body: Annotated[Any, Body()], store: StoreDep, _auth: ApiKeyDep) -> EventsAccepted | JSONResponse:
    """One event or a list: validate every event, then append all in timestamp order (stable), or none."""
    batch = one_or_many(body, EventIn, _EVENTS)
    now = time.time()
    events = [_event(e, now) for e in batch]
    events.sort(key=lambda e: e.timestamp)  # stable: equal timestamps keep the order sent
    try:
        appended = store.append_events(events)
    except ValueError as exc:  # names the field, e.g. "events[0].item_id: contains a control ..."
        raise unprocessable(("body",), str(exc)) from None
    except StoreUnavailable as exc:
        logger.warning("could not append %d events (nothing written): %s", len(events), exc)
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "history store unavailable, nothing was written; "
                                                                 "retry later") from None
    except (StoreOutcomeUnknown, StoreError) as exc:
        logger.warning("outcome of appending %d events unknown: %s", len(events), exc)
        return JSONResponse(status_code=status.HTTP_504_GATEWAY_TIMEOUT, content={
            "detail": "unknown outcome: the history store did not confirm the write; the events may or may not be "
                      "stored. Safe to retry with the same event_id values (events without one may be duplicated)."})
    return EventsAccepted(accepted=appended, duplicates=len(events) - appended)


@router.get("/users/{user_id}/history", response_model=HistoryOut, responses={**INVALID, **READ_AUTH, **NOT_LOADED})
def get_history(user_id: UserIdPath, store: StoreDep, _read: ReadKeyDep) -> HistoryOut:
    try:
        items = store.get_history(user_id)
    except ValueError as exc:
        raise unprocessable(("path", "user_id"), str(exc)) from None
    except StoreError as exc:
        logger.warning("history of %r unavailable: %s", user_id, exc)
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "history store unavailable; retry later") from None
    return HistoryOut(user_id=user_id, items=items)


def _event(e: EventIn, now: float) -> Event:
    return Event(user_id=e.user_id, item_id=e.item_id, timestamp=now if e.timestamp is None else e.timestamp,
                 type=e.type or DEFAULT_EVENT_TYPE, event_id=e.event_id, request_id=e.request_id)
