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

Bounded state: the in-process store keeps at most ``max_users`` users taking at most ``max_bytes``
bytes (least recently used evicted beyond either, counted in ``evictions``); Redis bounds itself with ``maxmemory`` + ``volatile-lru``
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
import sys
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
# The in-process store's byte cap (RECSYS_MAX_STORE_BYTES). A user with max_history = 200 events of
# worst-case ids (256 characters of four-byte characters, an event id each) takes ~440 KB, so
# the user cap alone allowed ~44 GB; 256 MiB holds ~600 such users, or ~140k users of short ids.
DEFAULT_MAX_STORE_BYTES = 256 << 20
MIN_STORE_BYTES = 1 << 20
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


class _User:
    """One user of the in-process store: items and event ids (bounded deques), features, and
    the bytes all of it takes (`nbytes`, kept up to date by the store)."""

    __slots__ = ("items", "ids", "features", "nbytes")

    def __init__(self, max_history: int) -> None:
        self.items: deque[str] = deque(maxlen=max_history)
        self.ids: deque[str] = deque(maxlen=max_history)
        self.features: dict[str, str] = {}
        self.nbytes = 0


# What one user costs beyond its strings and deques: the OrderedDict entry (hash table slot and
# linked-list node), the _User object and its empty features dict; measured with tracemalloc
# (tests/service/test_store_bytes.py checks the whole count against tracemalloc).
_USER_OVERHEAD = 48 + 72 + sys.getsizeof(_User(1)) + sys.getsizeof({})


def _size(s: str) -> int:
    """What `s` may take: a non-ASCII string also caches its UTF-8 form once something reads it
    as UTF-8 (a pydantic response, a regex), and sys.getsizeof counts that cache; count it always."""
    if s.isascii():
        return sys.getsizeof(s)
    utf8 = len(s.encode("utf-8", "surrogatepass"))
    return sys.getsizeof(s.encode("utf-8", "surrogatepass").decode("utf-8", "surrogatepass")) + utf8 + 1


def _own(s: str) -> str:
    """A copy of a non-ASCII string without a cached UTF-8 form (the request's parser may have
    left one), so the store holds no more than `_size` counts; ASCII strings keep no cache."""
    return s if s.isascii() else s.encode("utf-8", "surrogatepass").decode("utf-8", "surrogatepass")


class InMemoryStore:
    """In-process store: a lock and, per user, a bounded deque of items (and one of event ids),
    for at most ``max_users`` users taking at most ``max_bytes`` bytes together: the least
    recently used users are evicted beyond either.

    Bytes are counted as Python holds them: ``sys.getsizeof`` of every id string (a 256-character
    id of four-byte characters takes 1,100 bytes), of each deque and the per-user overhead, so
    ``nbytes`` is an upper bound of what the store holds (a string shared by two users is counted
    twice). With ``event_log``, every appended event is written there first (service/online_log.py)."""

    def __init__(self, max_history: int = DEFAULT_MAX_HISTORY, max_users: int = DEFAULT_MAX_USERS,
                 max_bytes: int = DEFAULT_MAX_STORE_BYTES, event_log: EventSink | None = None) -> None:
        self.max_history = check_max_history(max_history)
        self.event_log = event_log
        if isinstance(max_users, bool) or not isinstance(max_users, int) or max_users < 1:
            raise ValueError(f"max_users: must be a positive integer, got {max_users!r}")
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < MIN_STORE_BYTES:
            raise ValueError(f"max_bytes: must be an integer >= {MIN_STORE_BYTES}, got {max_bytes!r}")
        self.max_users = max_users
        self.max_bytes = max_bytes
        self.evictions = 0  # users dropped to stay within max_users / max_bytes
        self.nbytes = 0  # what every user together takes (see the class docstring)
        self._lock = threading.Lock()
        # user -> its state; order = recency of use, oldest first
        self._hist: OrderedDict[str, _User] = OrderedDict()

    def __len__(self) -> int:
        return len(self._hist)

    def stats(self) -> tuple[int | None, int | None, int | None]:
        """(users evicted so far, users held, bytes held)."""
        return self.evictions, len(self._hist), self.nbytes

    def _tail(self, user_id: str, limit: int | None) -> list[str]:
        entry = self._hist.get(user_id)
        if entry is None or limit == 0:
            return []
        self._hist.move_to_end(user_id)
        out = list(entry.items)
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

    def _user(self, user_id: str) -> _User:
        """The user's entry, created when new, moved to most recently used (lock held)."""
        entry = self._hist.get(user_id)
        if entry is None:
            entry = self._hist[user_id] = _User(self.max_history)
            entry.nbytes = _size(user_id) + _USER_OVERHEAD + sys.getsizeof(entry.items) + sys.getsizeof(entry.ids)
            self.nbytes += entry.nbytes
        self._hist.move_to_end(user_id)
        return entry

    @staticmethod
    def _push(dq: deque[str], value: str) -> int:
        """Append to a bounded deque; the change in bytes (the string dropped off the front, the
        deque's own blocks)."""
        before = sys.getsizeof(dq) + (_size(dq[0]) if len(dq) == dq.maxlen else 0)
        value = _own(value)
        dq.append(value)
        return _size(value) + sys.getsizeof(dq) - before

    def _evict(self) -> None:
        """Drop least recently used users beyond max_users or max_bytes (lock held); the most
        recent user is kept (it fits: max_bytes >= MIN_STORE_BYTES, far above one user's cap)."""
        while len(self._hist) > self.max_users or (self.nbytes > self.max_bytes and len(self._hist) > 1):
            _, old = self._hist.popitem(last=False)
            self.nbytes -= old.nbytes
            self.evictions += 1

    def append_events(self, events: Sequence[Event]) -> int:
        validate_events(events)
        with self._lock:
            # retries (an event id the user's last ids hold, or an earlier event of this call) left out
            appended: list[Event] = []
            seen: dict[str, set[str]] = {}
            for ev in events:
                if ev.event_id is not None:
                    entry = self._hist.get(ev.user_id)
                    ids = seen.setdefault(ev.user_id, set(entry.ids) if entry is not None else set())
                    if ev.event_id in ids:
                        continue
                    ids.add(ev.event_id)
                appended.append(ev)
            if self.event_log is not None:
                # the log first: the histories and the log hold the same events in the same order
                try:
                    self.event_log.write_events(appended)
                except OSError as exc:
                    raise StoreUnavailable(f"event log not writable, nothing was appended: {exc}") from exc
            for ev in appended:
                entry = self._user(ev.user_id)
                grew = self._push(entry.items, ev.item_id)
                if ev.event_id is not None:
                    grew += self._push(entry.ids, ev.event_id)
                entry.nbytes += grew
                self.nbytes += grew
            self._evict()
        return len(appended)

    def set_user_features(self, user_id: str, features: Mapping[str, str]) -> None:
        validate_id(user_id, "user_id")
        clean = validate_features(features)
        with self._lock:
            entry = self._user(user_id)
            before = sys.getsizeof(entry.features) + sum(_size(k) + _size(v) for k, v in entry.features.items())
            entry.features.update(clean)
            grew = sys.getsizeof(entry.features) + sum(_size(k) + _size(v) for k, v in entry.features.items()) - before
            entry.nbytes += grew
            self.nbytes += grew
            self._evict()

    def get_user_features(self, user_id: str) -> dict[str, str]:
        validate_id(user_id, "user_id")
        with self._lock:
            entry = self._hist.get(user_id)
            return {} if entry is None else dict(entry.features)

    def ping(self) -> bool:
        return True

    def close(self) -> None:
        pass
