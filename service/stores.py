"""Per-user state stores: interaction history and user features (DESIGN.md §6, §8).

One interface, :class:`HistoryStore`, two implementations:

- :class:`InMemoryStore` — in-process, the default; no server needed, state dies with the worker.
- :class:`RedisStore` — shared by all API replicas (``RECSYS_REDIS_URL``), in service/redis_store.py
  with :func:`make_store`, which picks one of the two.

Layout (Redis keys carry ``key_prefix``, default ``recsys:``):

- ``hist:<user>`` — list of external item ids, oldest first, capped at ``max_history``; expires
  ``history_ttl_s`` after the user's last event (refreshed on every write; 0 = never).
- ``evid:<user>`` — list of the client ``event_id``s of the user's last ``max_history`` events
  that carried one (same TTL): an event whose id is there is a retry and is not appended again.
- ``feat:<user>`` — hash of user features, str -> str.

Bounded state: the in-process store keeps at most ``max_users`` users (least recently used
evicted, counted in ``evictions``); Redis bounds itself with ``maxmemory`` + ``volatile-lru``
(deploy/), which evicts only keys with a TTL, i.e. histories, never pending catalog updates.

Write outcomes: :class:`StoreUnavailable` from ``append_events`` means nothing was written (no
connection could be made, or the store is cooling down after an outage);
:class:`StoreOutcomeUnknown` means the request may have reached Redis (a timeout, a connection
lost after sending): the events may or may not be stored, and a retry with the same
``event_id``s is safe.

Every id is validated before the backend is touched, so bad input raises ``ValueError`` naming
the field and never writes part of a batch. A backend that cannot be reached raises
:class:`StoreUnavailable` quickly (short socket timeouts) so the service can fall back to request
history or popularity instead of answering 5xx.

Ordering: events are appended in the order given; the store does not sort by timestamp. The
service sorts a batch by ``timestamp`` before calling :meth:`HistoryStore.append_events`.
The histories keep only item ids; the durable event log (service/online_log.py) keeps every
appended event whole: a Redis Stream appended by the same script as the history, or, for the
in-process store, the ``event_log`` sink written under the store's lock (duplicates are in neither).
"""

from __future__ import annotations

import logging
import math
import threading
import unicodedata
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


logger = logging.getLogger(__name__)

MAX_ID_LEN = 256
MAX_FEATURE_VALUE_LEN = 4096
DEFAULT_MAX_HISTORY = 200
DEFAULT_MAX_USERS = 100_000
DEFAULT_HISTORY_TTL_S = 30 * 24 * 3600
# Fail fast: the request path's whole budget is tens of ms, and a dead Redis must turn into a
# fallback answer, not a hung worker.
DEFAULT_SOCKET_TIMEOUT_S = 0.2
# Unicode categories refused in ids: control characters (Cc) and lone surrogates (Cs, which
# cannot be encoded as UTF-8 and would fail inside the Redis client).
_BAD_CATEGORIES = frozenset({"Cc", "Cs"})


class StoreError(Exception):
    """A store operation failed on the backend's side (e.g. a key holding the wrong type)."""


class StoreUnavailable(StoreError):
    """The backend cannot be reached (connection refused, timeout); the cause is chained.
    From a write: nothing was written."""


class StoreOutcomeUnknown(StoreError):
    """A write was sent (or may have been) but its answer never came: it may have been applied.
    Retrying with the same event ids is safe (they are deduplicated)."""


@dataclass(frozen=True, slots=True)
class Event:
    """One user-item interaction; ``timestamp`` is Unix seconds."""

    user_id: str
    item_id: str
    timestamp: float
    type: str = "view"
    event_id: str | None = None  # client-chosen; a repeat within the user's history window is dropped
    request_id: str | None = None  # the served list the event answers (online metrics' attribution)


def id_problem(value: object) -> str | None:
    """Why ``value`` is not a usable id, or None when it is."""
    if isinstance(value, str) and 0 < len(value) <= MAX_ID_LEN and value.isprintable():
        return None  # fast path (a re-index checks millions): printable strings hold no Cc / Cs character
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    if not value:
        return "must not be empty"
    if len(value) > MAX_ID_LEN:
        return f"longer than {MAX_ID_LEN} characters ({len(value)})"
    if any(unicodedata.category(c) in _BAD_CATEGORIES for c in value):
        return "contains a control or surrogate character"
    return None


def validate_id(value: object, field: str) -> str:
    """Return ``value`` if it is a usable id, else raise ``ValueError`` naming ``field``."""
    problem = id_problem(value)
    if problem is not None:
        raise ValueError(f"{field}: {problem}")
    return value  # type: ignore[return-value]  # id_problem checked it is a str


def validate_events(events: Sequence[Event]) -> dict[str, list[tuple[str, str | None]]]:
    """Validate every event (raising before any write) and group (item id, event id) by user, in order."""
    by_user: dict[str, list[tuple[str, str | None]]] = {}
    for i, ev in enumerate(events):
        if not isinstance(ev, Event):
            raise ValueError(f"events[{i}]: must be an Event, got {type(ev).__name__}")
        validate_id(ev.user_id, f"events[{i}].user_id")
        validate_id(ev.item_id, f"events[{i}].item_id")
        validate_id(ev.type, f"events[{i}].type")
        if ev.event_id is not None:
            validate_id(ev.event_id, f"events[{i}].event_id")
        if ev.request_id is not None:
            validate_id(ev.request_id, f"events[{i}].request_id")
        ts = ev.timestamp
        if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
            raise ValueError(f"events[{i}].timestamp: must be a finite number, got {ts!r}")
        by_user.setdefault(ev.user_id, []).append((ev.item_id, ev.event_id))
    return by_user


def validate_features(features: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in features.items():
        validate_id(name, "features key")
        field = f"features[{name!r}]"
        if not isinstance(value, str):
            raise ValueError(f"{field}: must be a string, got {type(value).__name__}")
        if len(value) > MAX_FEATURE_VALUE_LEN:
            raise ValueError(f"{field}: longer than {MAX_FEATURE_VALUE_LEN} characters")
        if any(unicodedata.category(c) == "Cs" for c in value):
            raise ValueError(f"{field}: contains a surrogate character")
        out[name] = value
    return out


def check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit: must be a non-negative integer or None, got {limit!r}")


def check_max_history(max_history: int) -> int:
    if isinstance(max_history, bool) or not isinstance(max_history, int) or max_history < 1:
        raise ValueError(f"max_history: must be a positive integer, got {max_history!r}")
    return max_history


class EventSink(Protocol):
    """The durable event log of the in-process store (service.online_log.EventFileLog)."""

    def write_events(self, events: Sequence[Event]) -> None: ...


@runtime_checkable
class HistoryStore(Protocol):
    """Per-user history (capped, oldest first) and features. Thread-safe."""

    max_history: int

    def get_history(self, user_id: str, limit: int | None = None) -> list[str]:
        """The user's item ids, oldest first; only the last ``limit`` when given."""
        ...

    def get_histories(self, user_ids: Iterable[str]) -> dict[str, list[str]]:
        """Histories of many users in one round trip; unknown users map to ``[]``."""
        ...

    def append_events(self, events: Sequence[Event]) -> int:
        """Append in the order given; each user's events land together or not at all. An event
        whose ``event_id`` the user's last ``max_history`` ids hold (or an earlier event of the
        same call) is a retry: not appended.

        Returns the number of events appended (before capping to ``max_history``).
        """
        ...

    def set_user_features(self, user_id: str, features: Mapping[str, str]) -> None:
        """Merge ``features`` into the user's feature hash."""
        ...

    def get_user_features(self, user_id: str) -> dict[str, str]:
        """The user's features; ``{}`` when none."""
        ...

    def ping(self) -> bool:
        """True when the backend answers; never raises."""
        ...

    def close(self) -> None: ...


class InMemoryStore:
    """In-process store: a lock and, per user, a bounded deque of items (and one of event ids),
    for at most ``max_users`` users: the least recently used user is evicted beyond that."""

    def __init__(self, max_history: int = DEFAULT_MAX_HISTORY, max_users: int = DEFAULT_MAX_USERS,
                 event_log: EventSink | None = None) -> None:
        self.max_history = check_max_history(max_history)
        self.event_log = event_log
        if isinstance(max_users, bool) or not isinstance(max_users, int) or max_users < 1:
            raise ValueError(f"max_users: must be a positive integer, got {max_users!r}")
        self.max_users = max_users
        self.evictions = 0  # users dropped to stay within max_users
        self._lock = threading.Lock()
        # user -> (items, event ids); order = recency of use, oldest first
        self._hist: OrderedDict[str, tuple[deque[str], deque[str]]] = OrderedDict()
        self._feat: dict[str, dict[str, str]] = {}

    def __len__(self) -> int:
        return len(self._hist)

    def stats(self) -> tuple[int | None, int | None]:
        """(users evicted so far, users held)."""
        return self.evictions, len(self._hist)

    def _tail(self, user_id: str, limit: int | None) -> list[str]:
        entry = self._hist.get(user_id)
        if entry is None or limit == 0:
            return []
        self._hist.move_to_end(user_id)
        out = list(entry[0])
        return out if limit is None else out[-limit:]

    def get_history(self, user_id: str, limit: int | None = None) -> list[str]:
        validate_id(user_id, "user_id")
        check_limit(limit)
        with self._lock:
            return self._tail(user_id, limit)

    def get_histories(self, user_ids: Iterable[str]) -> dict[str, list[str]]:
        ids = [validate_id(u, f"user_ids[{i}]") for i, u in enumerate(user_ids)]
        with self._lock:
            return {u: self._tail(u, None) for u in ids}

    def append_events(self, events: Sequence[Event]) -> int:
        by_user = validate_events(events)
        if self.event_log is not None:
            return self._append_logged(events)  # one user's events in order: the same result as below
        added = 0
        with self._lock:
            for user_id, pairs in by_user.items():
                entry = self._hist.get(user_id)
                if entry is None:
                    entry = self._hist[user_id] = (deque(maxlen=self.max_history), deque(maxlen=self.max_history))
                self._hist.move_to_end(user_id)
                items, ids = entry
                for item, event_id in pairs:
                    if event_id is not None:
                        if event_id in ids:
                            continue
                        ids.append(event_id)
                    items.append(item)
                    added += 1
            self._evict()
        return added

    def _append_logged(self, events: Sequence[Event]) -> int:
        """append_events with the log written first, under the lock: the events the histories
        will take (retries left out) go to event_log, then to the histories, so both hold the
        same events in the same order. A log that cannot be written raises StoreUnavailable and
        nothing is appended."""
        assert self.event_log is not None
        with self._lock:
            appended: list[Event] = []
            seen: dict[str, set[str]] = {}
            for ev in events:
                if ev.event_id is not None:
                    ids = seen.setdefault(ev.user_id, set(self._hist[ev.user_id][1]) if ev.user_id in self._hist
                                          else set())
                    if ev.event_id in ids:
                        continue
                    ids.add(ev.event_id)
                appended.append(ev)
            try:
                self.event_log.write_events(appended)
            except OSError as exc:
                raise StoreUnavailable(f"event log not writable, nothing was appended: {exc}") from exc
            for ev in appended:
                entry = self._hist.get(ev.user_id)
                if entry is None:
                    entry = self._hist[ev.user_id] = (deque(maxlen=self.max_history), deque(maxlen=self.max_history))
                self._hist.move_to_end(ev.user_id)
                entry[0].append(ev.item_id)
                if ev.event_id is not None:
                    entry[1].append(ev.event_id)
            self._evict()
        return len(appended)

    def _evict(self) -> None:
        while len(self._hist) > self.max_users:
            old, _ = self._hist.popitem(last=False)
            self._feat.pop(old, None)
            self.evictions += 1

    def set_user_features(self, user_id: str, features: Mapping[str, str]) -> None:
        validate_id(user_id, "user_id")
        clean = validate_features(features)
        with self._lock:
            self._feat.setdefault(user_id, {}).update(clean)

    def get_user_features(self, user_id: str) -> dict[str, str]:
        validate_id(user_id, "user_id")
        with self._lock:
            return dict(self._feat.get(user_id, {}))

    def ping(self) -> bool:
        return True

    def close(self) -> None:
        pass
