"""The Redis-backed :class:`RedisStore` (shared by all API replicas, ``RECSYS_REDIS_URL``) and
:func:`make_store`, which picks it or the in-process store. The interface, the key layout, the
validation and the error contract are in service/stores.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.typing import EncodableT

from service.contract.online_log import RECORD_FIELD
from service.online_log import StreamBound, event_record, events_stream
from service.stores import (
    DEFAULT_HISTORY_TTL_S,
    DEFAULT_MAX_HISTORY,
    DEFAULT_MAX_STORE_BYTES,
    DEFAULT_MAX_USERS,
    DEFAULT_SOCKET_TIMEOUT_S,
    Event,
    EventSink,
    HistoryStore,
    InMemoryStore,
    StoreError,
    StoreOutcomeUnknown,
    StoreUnavailable,
    check_limit,
    check_max_history,
    validate_events,
    validate_features,
    validate_id,
)

logger = logging.getLogger(__name__)


class RedisStore:
    """Redis-backed store shared by all replicas.

    Appends run as one Lua script per call (_APPEND_LUA: dedupe by event id, RPUSH, LTRIM,
    EXPIRE per user), so a batch lands whole or not at all (input is validated first; Redis
    has no rollback if the script itself fails, which StoreOutcomeUnknown reports). After a
    timeout the outcome is unknown (StoreOutcomeUnknown). The client retries once, immediately,
    on a connection error only (a pooled connection left stale by a Redis restart), never on a
    timeout: a timed-out write may have been applied; events with an event_id are safe to
    retry either way.
    """

    def __init__(
        self,
        url: str,
        max_history: int = DEFAULT_MAX_HISTORY,
        socket_timeout: float = DEFAULT_SOCKET_TIMEOUT_S,
        key_prefix: str = "recsys:",
        cooldown_s: float = 0.0,
        history_ttl_s: int = DEFAULT_HISTORY_TTL_S,
        event_log: StreamBound | None = None,
    ) -> None:
        """event_log: append every appended event to the ``<key_prefix>log:events`` stream, in
        the same script as the history (service/online_log.py), trimmed to this bound."""
        if not url:
            raise ValueError("url: must not be empty")
        if not socket_timeout > 0:
            raise ValueError(f"socket_timeout: must be > 0, got {socket_timeout!r}")
        if not cooldown_s >= 0:
            raise ValueError(f"cooldown_s: must be >= 0, got {cooldown_s!r}")
        if isinstance(history_ttl_s, bool) or not isinstance(history_ttl_s, int) or history_ttl_s < 0:
            raise ValueError(f"history_ttl_s: must be a non-negative integer (0 = no expiry), got {history_ttl_s!r}")
        self.max_history = check_max_history(max_history)
        self.key_prefix = key_prefix
        self.cooldown_s = cooldown_s
        self.history_ttl_s = history_ttl_s
        self.event_log = event_log
        self.events_stream = events_stream(key_prefix)
        self._skip_until = 0.0  # monotonic time before which calls fail fast (after an outage)
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
            decode_responses=True,
        )
        self._append = self._client.register_script(_APPEND_LUA)

    def _hist_key(self, user_id: str) -> str:
        return f"{self.key_prefix}hist:{user_id}"

    def _feat_key(self, user_id: str) -> str:
        return f"{self.key_prefix}feat:{user_id}"

    def _ids_key(self, user_id: str) -> str:
        return f"{self.key_prefix}evid:{user_id}"

    @contextmanager
    def _write_errors(self, op: str) -> Iterator[None]:
        """_errors for a write, telling "not written" (StoreUnavailable: no connection could be
        made, or cooling down) from "may have been written" (StoreOutcomeUnknown: the command may
        have reached Redis: a timeout, a connection lost while waiting, an error inside the script)."""
        try:
            with self._errors(op):
                yield
        except StoreUnavailable as exc:
            cause = exc.__cause__
            if cause is None or (isinstance(cause, redis.ConnectionError) and "connecting to" in str(cause)):
                raise
            raise StoreOutcomeUnknown(f"outcome of {op} unknown: {cause}") from cause
        except StoreError as exc:
            raise StoreOutcomeUnknown(f"outcome of {op} unknown: {exc}") from exc.__cause__

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
        check_limit(limit)
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
        keys: list[str] = []
        trim = [] if self.event_log is None else self.event_log.args()
        args: list[EncodableT] = [self.max_history, self.history_ttl_s, len(trim), *trim]
        records = _records_by_user(events) if self.event_log is not None else {}
        for user_id, pairs in by_user.items():
            keys += [self._hist_key(user_id), self._ids_key(user_id)]
            args.append(len(pairs))
            logged = records.get(user_id)
            for j, (item, event_id) in enumerate(pairs):
                args += [item, event_id or "", "" if logged is None else logged[j]]
        if self.event_log is not None:
            keys.append(self.events_stream)
        with self._write_errors("append_events"):
            added = self._append(keys=keys, args=args)
        return int(cast(int, added))

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

    def stats(self) -> tuple[int | None, int | None, int | None]:
        """(keys Redis evicted under maxmemory since it started, None, None): (None, None, None)
        when Redis does not answer (never raises). Redis bounds its bytes itself (maxmemory)."""
        try:
            with self._errors("stats"):
                info = cast(dict[str, object], self._client.info("stats"))
        except StoreError:
            return None, None, None
        evicted = info.get("evicted_keys")
        return (int(evicted) if isinstance(evicted, int | str) else None), None, None

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


# One script per append: every user's events land together (a script runs atomically), event ids
# already in the user's window are skipped, both lists are capped and their TTL refreshed, and each
# appended event's record goes to the events stream (the last key, when logging) in the same step.
# KEYS: hist, evid per user[, events stream]. ARGV: max_history, ttl_s (0 = none), t = number of trim
# args (0 or 3: MAXLEN ~ n | MINID ~ id), then per user: n, n x (item, event_id or "", record or "").
_APPEND_LUA = """
local maxh, ttl, t = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local trim, a, added = {}, 4 + t, 0
for i = 1, t do trim[i] = ARGV[3 + i] end
local users = #KEYS
local stream = nil
if t > 0 then stream = KEYS[#KEYS]; users = users - 1 end
for u = 1, users, 2 do
  local hist, ids = KEYS[u], KEYS[u + 1]
  local n = tonumber(ARGV[a]); a = a + 1
  for i = 1, n do
    local item, eid, rec = ARGV[a], ARGV[a + 1], ARGV[a + 2]; a = a + 3
    if eid == '' or not redis.call('LPOS', ids, eid) then
      redis.call('RPUSH', hist, item); added = added + 1
      if eid ~= '' then redis.call('RPUSH', ids, eid) end
      if stream then redis.call('XADD', stream, trim[1], trim[2], trim[3], '*', '%s', rec) end
    end
  end
  redis.call('LTRIM', hist, -maxh, -1)
  redis.call('LTRIM', ids, -maxh, -1)
  if ttl > 0 then
    redis.call('EXPIRE', hist, ttl)
    redis.call('EXPIRE', ids, ttl)
  end
end
return added
""" % RECORD_FIELD

def _records_by_user(events: Sequence[Event]) -> dict[str, list[str]]:
    """Each event's log record, grouped by user in order (as validate_events groups the events)."""
    out: dict[str, list[str]] = {}
    for e in events:
        out.setdefault(e.user_id, []).append(
            event_record(e.user_id, e.item_id, e.type, e.timestamp, e.event_id, e.request_id))
    return out


def make_store(redis_url: str | None, max_history: int = DEFAULT_MAX_HISTORY, cooldown_s: float = 0.0,
               max_users: int = DEFAULT_MAX_USERS, history_ttl_s: int = DEFAULT_HISTORY_TTL_S,
               max_bytes: int = DEFAULT_MAX_STORE_BYTES, stream_bound: StreamBound | None = None,
               event_log: EventSink | None = None) -> HistoryStore:
    """A :class:`RedisStore` for a non-empty URL (logging events to its stream under
    stream_bound), else an :class:`InMemoryStore` (logging events to event_log)."""
    if redis_url:
        logger.info("history store: redis (max_history=%d, history_ttl_s=%d, event stream %s)", max_history,
                    history_ttl_s, "off" if stream_bound is None else stream_bound)
        return RedisStore(redis_url, max_history=max_history, cooldown_s=cooldown_s, history_ttl_s=history_ttl_s,
                          event_log=stream_bound)
    logger.info("history store: in-memory (max_history=%d, max_users=%d, max_bytes=%d, event log %s)", max_history,
                max_users, max_bytes, "off" if event_log is None else "on")
    return InMemoryStore(max_history=max_history, max_users=max_users, max_bytes=max_bytes, event_log=event_log)
