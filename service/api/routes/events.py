"""POST /v1/events (one event or a list) and GET /v1/users/{user_id}/history."""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any

from fastapi import APIRouter, Body, HTTPException, status
from pydantic import TypeAdapter

from service.api.deps import ApiKeyDep, StoreDep, one_or_many, one_or_many_body
from service.schemas import MAX_EVENTS, EventIn, EventsAccepted, EventsList, HistoryOut
from service.stores import Event, StoreError

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["events"])

DEFAULT_EVENT_TYPE = "view"
_EVENTS = TypeAdapter(EventsList)


@router.post("/events", response_model=EventsAccepted, status_code=status.HTTP_202_ACCEPTED,
             openapi_extra=one_or_many_body(EventIn, MAX_EVENTS))
def post_events(body: Annotated[Any, Body()], store: StoreDep, _auth: ApiKeyDep) -> EventsAccepted:
    """One event or a list: validate every event, then append all in timestamp order (stable), or none."""
    batch = one_or_many(body, EventIn, _EVENTS)
    now = time.time()
    events = [_event(e, now) for e in batch]
    events.sort(key=lambda e: e.timestamp)  # stable: equal timestamps keep the order sent
    try:
        accepted = store.append_events(events)
    except ValueError as exc:  # names the field, e.g. "events[0].item_id: contains a control ..."
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    except StoreError as exc:
        logger.warning("could not append %d events: %s", len(events), exc)
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "history store unavailable; retry later") from None
    return EventsAccepted(accepted=accepted)


@router.get("/users/{user_id}/history", response_model=HistoryOut)
def get_history(user_id: str, store: StoreDep) -> HistoryOut:
    try:
        items = store.get_history(user_id)
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    except StoreError as exc:
        logger.warning("history of %r unavailable: %s", user_id, exc)
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "history store unavailable; retry later") from None
    return HistoryOut(user_id=user_id, items=items)


def _event(e: EventIn, now: float) -> Event:
    return Event(user_id=e.user_id, item_id=e.item_id, timestamp=now if e.timestamp is None else e.timestamp,
                 type=e.type or DEFAULT_EVENT_TYPE)
