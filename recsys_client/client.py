"""Sync and async clients of the recsys HTTP API (v1), on httpx.

    from recsys_client import RecsysClient, Event
    with RecsysClient("http://127.0.0.1:8000", api_key="...") as rs:
        rs.send_events([Event("u1", "i42")])
        for item in rs.recommend(user_id="u1", k=5, filters={"genre": "Comedy"}).items:
            print(item.rank, item.item_id, item.score)

Every non-2xx answer raises a typed error (recsys_client.errors): a 422 is InvalidRequest, whose
`field` names the refused field. `send_events` gives each event without an `event_id` a fresh
one before the first attempt and retries a 503 (nothing written), a 504 (outcome unknown) and a
lost connection with the same ids, so a retried event is stored once. Reads are not retried.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

import httpx

from recsys_client.errors import OutcomeUnknown, RecsysError, Unavailable, error_for
from recsys_client.models import EventsAccepted, Event, Item, Query, Recommendation, Version

RETRYABLE = (Unavailable, OutcomeUnknown)
MAX_BACKOFF_S = 5.0
REQUEST_ID = "X-Request-ID"


def _with_ids(events: Event | Iterable[Event]) -> list[Event]:
    batch = [events] if isinstance(events, Event) else list(events)
    if not batch:
        raise ValueError("send_events needs at least one event")
    return [e if e.event_id is not None else replace(e, event_id=uuid.uuid4().hex) for e in batch]


def _parse(response: httpx.Response) -> Any:
    """The JSON of a 2xx answer, else raise its typed error."""
    rid = response.headers.get(REQUEST_ID)
    if response.is_success:
        return response.json()
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    raise error_for(response.status_code, body, rid)


def _backoff(base_s: float, attempt: int) -> float:
    return float(min(base_s * 2 ** attempt, MAX_BACKOFF_S))


class _Base:
    def __init__(self, api_key: str | None, event_retries: int, retry_backoff_s: float) -> None:
        if event_retries < 0 or retry_backoff_s < 0:
            raise ValueError(f"event_retries and retry_backoff_s must be >= 0, got {event_retries}, {retry_backoff_s}")
        self.api_key = api_key
        self.event_retries = event_retries
        self.retry_backoff_s = retry_backoff_s

    def _headers(self, request_id: str | None) -> dict[str, str]:
        headers = {} if self.api_key is None else {"X-API-Key": self.api_key}
        if request_id is not None:
            headers[REQUEST_ID] = request_id
        return headers

    @staticmethod
    def _query(user_id: str | None, history: list[str] | None, k: int, exclude: list[str] | None,
               filters: Mapping[str, str | list[str]] | None, explain: bool) -> dict[str, Any]:
        return Query(user_id, history, k, exclude, dict(filters) if filters is not None else None, explain).to_json()

    @staticmethod
    def _accepted(body: dict[str, Any], events: list[Event], attempts: int) -> EventsAccepted:
        return EventsAccepted(body["accepted"], body.get("duplicates", 0), [e.event_id or "" for e in events], attempts)


class RecsysClient(_Base):
    """Blocking client. `api_key`: sent as X-API-Key (writes, and per-user reads when the server
    has a read key). `event_retries`: further attempts of send_events after a 503 / 504 / lost
    connection, `retry_backoff_s` doubling between them (at most 5 s)."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 5.0, event_retries: int = 3,
                 retry_backoff_s: float = 0.2, transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(api_key, event_retries, retry_backoff_s)
        self._http = httpx.Client(base_url=base_url, timeout=timeout_s, transport=transport)

    def __enter__(self) -> RecsysClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, body: Any = None, request_id: str | None = None) -> httpx.Response:
        return self._http.request(method, path, json=body, headers=self._headers(request_id))

    def recommend(self, user_id: str | None = None, history: list[str] | None = None, k: int = 10,
                  exclude: list[str] | None = None, filters: Mapping[str, str | list[str]] | None = None,
                  explain: bool = False, request_id: str | None = None) -> Recommendation:
        r = self._call("POST", "/v1/recommend", self._query(user_id, history, k, exclude, filters, explain), request_id)
        return Recommendation.from_json(_parse(r), r.headers.get(REQUEST_ID))

    def recommend_batch(self, queries: Iterable[Query], request_id: str | None = None) -> list[Recommendation]:
        r = self._call("POST", "/v1/recommend/batch", {"requests": [q.to_json() for q in queries]}, request_id)
        rid = r.headers.get(REQUEST_ID)
        return [Recommendation.from_json(one, rid) for one in _parse(r)["results"]]

    def send_events(self, events: Event | Iterable[Event]) -> EventsAccepted:
        batch = _with_ids(events)
        body = [e.to_json() for e in batch]
        for attempt in range(self.event_retries + 1):
            try:
                return self._accepted(_parse(self._call("POST", "/v1/events", body)), batch, attempt + 1)
            except (*RETRYABLE, httpx.TransportError):
                if attempt == self.event_retries:
                    raise
            time.sleep(_backoff(self.retry_backoff_s, attempt))
        raise AssertionError("unreachable")

    def history(self, user_id: str) -> list[str]:
        items: list[str] = _parse(self._call("GET", f"/v1/users/{_segment(user_id)}/history"))["items"]
        return items

    def item(self, item_id: str) -> Item:
        return Item.from_json(_parse(self._call("GET", f"/v1/items/{_segment(item_id)}")))

    def put_items(self, items: Mapping[str, Mapping[str, Any]]) -> int:
        """item id -> its complete features; they are served after the next re-index. Returns the
        number of items now waiting for it."""
        body = [{"item_id": i, "features": dict(f)} for i, f in items.items()]
        pending: int = _parse(self._call("PUT", "/v1/items", body))["pending"]
        return pending

    def version(self) -> Version:
        return Version.from_json(_parse(self._call("GET", "/v1/version")))


class AsyncRecsysClient(_Base):
    """The same API as RecsysClient, awaitable."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 5.0, event_retries: int = 3,
                 retry_backoff_s: float = 0.2, transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(api_key, event_retries, retry_backoff_s)
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout_s, transport=transport)

    async def __aenter__(self) -> AsyncRecsysClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, body: Any = None, request_id: str | None = None) -> httpx.Response:
        return await self._http.request(method, path, json=body, headers=self._headers(request_id))

    async def recommend(self, user_id: str | None = None, history: list[str] | None = None, k: int = 10,
                        exclude: list[str] | None = None, filters: Mapping[str, str | list[str]] | None = None,
                        explain: bool = False, request_id: str | None = None) -> Recommendation:
        body = self._query(user_id, history, k, exclude, filters, explain)
        r = await self._call("POST", "/v1/recommend", body, request_id)
        return Recommendation.from_json(_parse(r), r.headers.get(REQUEST_ID))

    async def recommend_batch(self, queries: Iterable[Query], request_id: str | None = None) -> list[Recommendation]:
        r = await self._call("POST", "/v1/recommend/batch", {"requests": [q.to_json() for q in queries]}, request_id)
        rid = r.headers.get(REQUEST_ID)
        return [Recommendation.from_json(one, rid) for one in _parse(r)["results"]]

    async def send_events(self, events: Event | Iterable[Event]) -> EventsAccepted:
        batch = _with_ids(events)
        body = [e.to_json() for e in batch]
        for attempt in range(self.event_retries + 1):
            try:
                return self._accepted(_parse(await self._call("POST", "/v1/events", body)), batch, attempt + 1)
            except (*RETRYABLE, httpx.TransportError):
                if attempt == self.event_retries:
                    raise
            await asyncio.sleep(_backoff(self.retry_backoff_s, attempt))
        raise AssertionError("unreachable")

    async def history(self, user_id: str) -> list[str]:
        items: list[str] = _parse(await self._call("GET", f"/v1/users/{_segment(user_id)}/history"))["items"]
        return items

    async def item(self, item_id: str) -> Item:
        return Item.from_json(_parse(await self._call("GET", f"/v1/items/{_segment(item_id)}")))

    async def put_items(self, items: Mapping[str, Mapping[str, Any]]) -> int:
        body = [{"item_id": i, "features": dict(f)} for i, f in items.items()]
        pending: int = _parse(await self._call("PUT", "/v1/items", body))["pending"]
        return pending

    async def version(self) -> Version:
        return Version.from_json(_parse(await self._call("GET", "/v1/version")))


def _segment(value: str) -> str:
    """An id as one URL path segment (a "/" or "?" in an id stays part of it)."""
    from urllib.parse import quote

    return quote(value, safe="")


__all__ = ["AsyncRecsysClient", "RecsysClient", "RecsysError"]
