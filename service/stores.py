"""Per-user state stores: interaction history and user features (DESIGN.md §6, §8).

One interface, :class:`HistoryStore`, two implementations:

- :class:`InMemoryStore` — in-process, the default; no server needed, state dies with the worker.
- :class:`RedisStore` — shared by all API replicas (``RECSYS_REDIS_URL``).

Layout (Redis keys carry ``key_prefix``, default ``recsys:``):

- ``hist:<user>`` — list of external item ids, oldest first, capped at ``max_history``.
- ``feat:<user>`` — hash of user features, str -> str.

Every id is validated before the backend is touched, so bad input raises ``ValueError`` naming
the field and never writes part of a batch. A backend that cannot be reached raises
:class:`StoreUnavailable` quickly (short socket timeouts) so the service can fall back to request
history or popularity instead of answering 5xx.

Ordering: events are appended in the order given; the store does not sort by timestamp. The
service sorts a batch by ``timestamp`` before calling :meth:`HistoryStore.append_events`.
Only item ids are stored; ``timestamp`` and ``type`` are validated but not persisted.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import unicodedata
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, cast, runtime_checkable

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.typing import EncodableT

logger = logging.getLogger(__name__)

MAX_ID_LEN = 256
MAX_FEATURE_VALUE_LEN = 4096
DEFAULT_MAX_HISTORY = 200
# Fail fast: the request path's whole budget is tens of ms, and a dead Redis must turn into a
# fallback answer, not a hung worker.
DEFAULT_SOCKET_TIMEOUT_S = 0.2
# Unicode categories refused in ids: control characters (Cc) and lone surrogates (Cs, which
# cannot be encoded as UTF-8 and would fail inside the Redis client).
_BAD_CATEGORIES = frozenset({"Cc", "Cs"})


class StoreError(Exception):
    """A store operation failed on the backend's side (e.g. a key holding the wrong type)."""


class StoreUnavailable(StoreError):
    """The backend cannot be reached (connection refused, timeout); the cause is chained."""


@dataclass(frozen=True, slots=True)
class Event:
    """One user-item interaction; ``timestamp`` is Unix seconds."""

    user_id: str
    item_id: str
    timestamp: float
    type: str = "view"


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


def validate_events(events: Sequence[Event]) -> dict[str, list[str]]:
    """Validate every event (raising before any write) and group item ids by user, in order."""
    by_user: dict[str, list[str]] = {}
    for i, ev in enumerate(events):
        if not isinstance(ev, Event):
            raise ValueError(f"events[{i}]: must be an Event, got {type(ev).__name__}")
        validate_id(ev.user_id, f"events[{i}].user_id")
        validate_id(ev.item_id, f"events[{i}].item_id")
        validate_id(ev.type, f"events[{i}].type")
        ts = ev.timestamp
        if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
            raise ValueError(f"events[{i}].timestamp: must be a finite number, got {ts!r}")
        by_user.setdefault(ev.user_id, []).append(ev.item_id)
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


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit: must be a non-negative integer or None, got {limit!r}")


def _check_max_history(max_history: int) -> int:
    if isinstance(max_history, bool) or not isinstance(max_history, int) or max_history < 1:
        raise ValueError(f"max_history: must be a positive integer, got {max_history!r}")
    return max_history


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
        """Append in the order given; each user's events land together or not at all.

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
    """In-process store: a lock and one bounded deque per user."""

    def __init__(self, max_history: int = DEFAULT_MAX_HISTORY) -> None:
        self.max_history = _check_max_history(max_history)
        self._lock = threading.Lock()
        self._hist: dict[str, deque[str]] = {}
        self._feat: dict[str, dict[str, str]] = {}

    def _tail(self, user_id: str, limit: int | None) -> list[str]:
        items = self._hist.get(user_id)
        if not items or limit == 0:
            return []
        out = list(items)
        return out if limit is None else out[-limit:]

    def get_history(self, user_id: str, limit: int | None = None) -> list[str]:
        validate_id(user_id, "user_id")
        _check_limit(limit)
        with self._lock:
            return self._tail(user_id, limit)

    def get_histories(self, user_ids: Iterable[str]) -> dict[str, list[str]]:
        ids = [validate_id(u, f"user_ids[{i}]") for i, u in enumerate(user_ids)]
        with self._lock:
            return {u: self._tail(u, None) for u in ids}

    def append_events(self, events: Sequence[Event]) -> int:
        by_user = validate_events(events)
        with self._lock:
            for user_id, items in by_user.items():
                hist = self._hist.get(user_id)
                if hist is None:
                    hist = self._hist[user_id] = deque(maxlen=self.max_history)
                hist.extend(items)
        return len(events)

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


class RedisStore:
    """Redis-backed store shared by all replicas.

    Appends run as one MULTI/EXEC transaction per call (RPUSH then LTRIM per user), so a
    batch lands whole or not at all. (Redis has no rollback: that holds because input is
    validated first and a lost connection before EXEC discards the queue; after a timeout
    the outcome is unknown, which StoreUnavailable reports.) The client retries once, immediately, on a connection
    error only (a pooled connection left stale by a Redis restart), never on a timeout: a
    timed-out write may have been applied, and retrying it could duplicate history.
    """

    def __init__(
        self,
        url: str,
        max_history: int = DEFAULT_MAX_HISTORY,
        socket_timeout: float = DEFAULT_SOCKET_TIMEOUT_S,
        key_prefix: str = "recsys:",
        cooldown_s: float = 0.0,
    ) -> None:
        if not url:
            raise ValueError("url: must not be empty")
        if not socket_timeout > 0:
            raise ValueError(f"socket_timeout: must be > 0, got {socket_timeout!r}")
        if not cooldown_s >= 0:
            raise ValueError(f"cooldown_s: must be >= 0, got {cooldown_s!r}")
        self.max_history = _check_max_history(max_history)
        self.key_prefix = key_prefix
        self.cooldown_s = cooldown_s
        self._skip_until = 0.0  # monotonic time before which calls fail fast (after an outage)
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
            decode_responses=True,
        )

    def _hist_key(self, user_id: str) -> str:
        return f"{self.key_prefix}hist:{user_id}"

    def _feat_key(self, user_id: str) -> str:
        return f"{self.key_prefix}feat:{user_id}"

    @contextmanager
    def _errors(self, op: str) -> Iterator[None]:
        """Map redis-py errors to StoreUnavailable (unreachable) or StoreError (the rest).

        After an unreachable / timed-out call, calls fail fast for cooldown_s without touching
        the network: a hung server would otherwise cost every request the full socket timeout.
        """
        if self.cooldown_s and time.monotonic() < self._skip_until:
            raise StoreUnavailable(f"redis unavailable during {op}: skipped for {self.cooldown_s}s after a failure")
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            logger.debug("redis %s failed: %r", op, exc)
            self._skip_until = time.monotonic() + self.cooldown_s
            raise StoreUnavailable(f"redis unavailable during {op}: {exc}") from exc
        except redis.RedisError as exc:
            raise StoreError(f"redis error during {op}: {exc}") from exc

    def get_history(self, user_id: str, limit: int | None = None) -> list[str]:
        validate_id(user_id, "user_id")
        _check_limit(limit)
        if limit == 0:
            return []
        start = 0 if limit is None else -limit
        with self._errors("get_history"):
            items = self._client.lrange(self._hist_key(user_id), start, -1)
        return cast(list[str], items)  # decode_responses=True

    def get_histories(self, user_ids: Iterable[str]) -> dict[str, list[str]]:
        ids = [validate_id(u, f"user_ids[{i}]") for i, u in enumerate(user_ids)]
        if not ids:
            return {}
        pipe = self._client.pipeline(transaction=False)
        for u in ids:
            pipe.lrange(self._hist_key(u), 0, -1)
        with self._errors("get_histories"):
            results = cast(list[list[str]], pipe.execute())
        return dict(zip(ids, results, strict=True))

    def append_events(self, events: Sequence[Event]) -> int:
        by_user = validate_events(events)
        if not by_user:
            return 0
        pipe = self._client.pipeline(transaction=True)
        for user_id, items in by_user.items():
            key = self._hist_key(user_id)
            pipe.rpush(key, *items)
            pipe.ltrim(key, -self.max_history, -1)
        with self._errors("append_events"):
            pipe.execute()
        return len(events)

    def set_user_features(self, user_id: str, features: Mapping[str, str]) -> None:
        validate_id(user_id, "user_id")
        clean = validate_features(features)
        if not clean:
            return
        with self._errors("set_user_features"):
            # A re-typed copy: Mapping keys are invariant, so dict[str, str] does not type-check.
            mapping: dict[EncodableT, EncodableT] = {k: v for k, v in clean.items()}
            self._client.hset(self._feat_key(user_id), mapping=mapping)

    def get_user_features(self, user_id: str) -> dict[str, str]:
        validate_id(user_id, "user_id")
        with self._errors("get_user_features"):
            feats = self._client.hgetall(self._feat_key(user_id))
        return cast(dict[str, str], feats)

    def ping(self) -> bool:
        """Whether Redis answers now (always tried; a success ends a cooldown)."""
        try:
            ok = bool(self._client.ping())
            self._skip_until = 0.0
            return ok
        except redis.RedisError as exc:
            logger.debug("redis ping failed: %r", exc)
            return False

    def close(self) -> None:
        self._client.close()


def make_store(redis_url: str | None, max_history: int = DEFAULT_MAX_HISTORY,
               cooldown_s: float = 0.0) -> HistoryStore:
    """A :class:`RedisStore` for a non-empty URL, else an :class:`InMemoryStore`."""
    if redis_url:
        logger.info("history store: redis (max_history=%d)", max_history)
        return RedisStore(redis_url, max_history=max_history, cooldown_s=cooldown_s)
    logger.info("history store: in-memory (max_history=%d)", max_history)
    return InMemoryStore(max_history=max_history)
