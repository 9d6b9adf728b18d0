"""Python client of the recsys HTTP API (sync and async, typed): see recsys_client.client."""

from recsys_client.client import AsyncRecsysClient, RecsysClient
from recsys_client.errors import (AuthError, BadRequest, Conflict, FieldError, InvalidRequest, NotFound,
                                  OutcomeUnknown, PayloadTooLarge, RecsysError, ServerError, Unavailable)
from recsys_client.models import Event, EventsAccepted, Item, Query, Recommendation, RecommendedItem, Version

__all__ = ["AsyncRecsysClient", "AuthError", "BadRequest", "Conflict", "Event", "EventsAccepted", "FieldError",
           "InvalidRequest", "Item", "NotFound", "OutcomeUnknown", "PayloadTooLarge", "Query", "Recommendation",
           "RecommendedItem", "RecsysClient", "RecsysError", "ServerError", "Unavailable", "Version"]
