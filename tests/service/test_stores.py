"""Tests for service/stores.py: the same behaviour from the in-memory and the Redis store."""

from __future__ import annotations

import math
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from service.redis_store import RedisStore, make_store
from service.stores import (
    Event,
    HistoryStore,
    InMemoryStore,
    StoreUnavailable,
)
from tests.service.conftest import RedisServer

MakeStore = Callable[..., HistoryStore]


def ev(user: Any, item: Any, ts: Any = 0.0, type: Any = "view") -> Event:
    return Event(user_id=user, item_id=item, timestamp=ts, type=type)


@pytest.fixture(params=["memory", "redis"])
def make(request: pytest.FixtureRequest) -> Iterator[MakeStore]:
    """Factory for empty stores of the parametrised kind; Redis ones get a private key prefix."""
    created: list[HistoryStore] = []
    prefixes: list[str] = []
    url = request.getfixturevalue("redis_url") if request.param == "redis" else ""

    def factory(max_history: int = 200) -> HistoryStore:
        store: HistoryStore
        if request.param == "memory":
            store = InMemoryStore(max_history=max_history)
        else:
            prefix = f"test:{uuid.uuid4().hex}:"
            prefixes.append(prefix)
            store = RedisStore(url, max_history=max_history, key_prefix=prefix)
        created.append(store)
        return store

    yield factory
    for store in created:
        store.close()
    if prefixes:
        raw = redis.Redis.from_url(url)
        for prefix in prefixes:
            keys = list(raw.scan_iter(f"{prefix}*"))
            if keys:
                raw.delete(*keys)
        raw.close()


def test_append_get_order_and_cap(make: MakeStore) -> None:
    store = make(max_history=5)
    assert store.append_events([ev("u1", f"i{k}", k) for k in range(3)]) == 3
    assert store.get_history("u1") == ["i0", "i1", "i2"]

    # Counts appended events, then keeps only the newest max_history.
    assert store.append_events([ev("u1", f"i{k}", k) for k in range(3, 8)]) == 5
    assert store.get_history("u1") == ["i3", "i4", "i5", "i6", "i7"]
    assert store.get_history("u1", limit=2) == ["i6", "i7"]
    assert store.get_history("u1", limit=10) == ["i3", "i4", "i5", "i6", "i7"]
    assert store.get_history("u1", limit=0) == []
    assert store.get_history("nobody") == []
    assert store.append_events([]) == 0


def test_one_call_longer_than_cap_keeps_its_tail(make: MakeStore) -> None:
    store = make(max_history=3)
    store.append_events([ev("u", f"i{k}") for k in range(10)])
    assert store.get_history("u") == ["i7", "i8", "i9"]


def test_batch_for_several_users_keeps_each_users_order(make: MakeStore) -> None:
    store = make()
    store.append_events([ev("a", "x")])
    batch = [ev("a", "a1"), ev("b", "b1"), ev("c", "c1"), ev("a", "a2"), ev("b", "b2")]
    assert store.append_events(batch) == 5
    assert store.get_history("a") == ["x", "a1", "a2"]
    assert store.get_history("b") == ["b1", "b2"]
    assert store.get_history("c") == ["c1"]


def test_get_histories(make: MakeStore) -> None:
    store = make()
    store.append_events([ev("a", "1"), ev("b", "2"), ev("a", "3")])
    assert store.get_histories(["a", "b", "ghost", "a"]) == {
        "a": ["1", "3"],
        "b": ["2"],
        "ghost": [],
    }
    assert store.get_histories([]) == {}


def test_features_round_trip_and_merge(make: MakeStore) -> None:
    store = make()
    assert store.get_user_features("u") == {}
    store.set_user_features("u", {"age": "30", "country": "fr", "bio": "é ü 👍 a:b"})
    store.set_user_features("u", {"age": "31"})
    store.set_user_features("u", {})
    assert store.get_user_features("u") == {"age": "31", "country": "fr", "bio": "é ü 👍 a:b"}
    assert store.get_user_features("other") == {}
    # Features and history of one user do not collide.
    store.append_events([ev("u", "i")])
    assert store.get_history("u") == ["i"]


def test_unusual_but_valid_ids_round_trip(make: MakeStore) -> None:
    store = make()
    ids = ["ユーザー:1", "with space", "emoji 👍🏽", "x" * 256, "hist:nested", "*?[]"]
    store.append_events([ev(u, u) for u in ids])
    assert store.get_histories(ids) == {u: [u] for u in ids}


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (ev("", "i"), r"events\[2\]\.user_id: must not be empty"),
        (ev("u\x00", "i"), r"events\[2\]\.user_id: contains a control"),
        (ev(123, "i"), r"events\[2\]\.user_id: must be a string, got int"),
        (ev("u", "x" * 257), r"events\[2\]\.item_id: longer than 256 characters"),
        (ev("u", "a\nb"), r"events\[2\]\.item_id: contains a control"),
        (ev("u", "\ud800"), r"events\[2\]\.item_id: contains a control or surrogate"),
        (ev("u", None), r"events\[2\]\.item_id: must be a string, got NoneType"),
        (ev("u", "i", math.nan), r"events\[2\]\.timestamp: must be a finite number"),
        (ev("u", "i", math.inf), r"events\[2\]\.timestamp: must be a finite number"),
        (ev("u", "i", "1700000000"), r"events\[2\]\.timestamp: must be a finite number"),
        (ev("u", "i", True), r"events\[2\]\.timestamp: must be a finite number"),
        (ev("u", "i", type=""), r"events\[2\]\.type: must not be empty"),
        ({"user_id": "u", "item_id": "i"}, r"events\[2\]: must be an Event, got dict"),
    ],
)
def test_bad_event_names_field_and_writes_nothing(
    make: MakeStore, bad: Any, message: str
) -> None:
    store = make()
    store.append_events([ev("u1", "old")])
    with pytest.raises(ValueError, match=message):
        store.append_events([ev("u1", "new"), ev("u2", "new"), bad])
    assert store.get_histories(["u1", "u2", "u"]) == {"u1": ["old"], "u2": [], "u": []}


def test_bad_reads_and_features_name_the_field(make: MakeStore) -> None:
    store = make()
    with pytest.raises(ValueError, match=r"^user_id: must not be empty"):
        store.get_history("")
    with pytest.raises(ValueError, match=r"^limit: must be a non-negative integer"):
        store.get_history("u", limit=-1)
    with pytest.raises(ValueError, match=r"^user_ids\[1\]: contains a control"):
        store.get_histories(["ok", "bad\x07"])
    with pytest.raises(ValueError, match=r"^user_id: longer than 256"):
        store.get_user_features("u" * 300)
    with pytest.raises(ValueError, match=r"^user_id: contains a control"):
        store.set_user_features("u\r", {"a": "1"})
    with pytest.raises(ValueError, match=r"^features key: must not be empty"):
        store.set_user_features("u", {"a": "1", "": "x"})
    with pytest.raises(ValueError, match=r"^features\['b'\]: must be a string, got int"):
        store.set_user_features("u", {"a": "1", "b": 3})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match=r"^features\['b'\]: longer than 4096"):
        store.set_user_features("u", {"a": "1", "b": "v" * 4097})
    assert store.get_user_features("u") == {}  # the valid "a" was not written either


def test_concurrent_appends_keep_every_event(make: MakeStore) -> None:
    store = make(max_history=1000)
    n_threads, n_calls = 8, 40
    start = threading.Barrier(n_threads)
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            start.wait()
            for k in range(n_calls):
                # One call touches a hot shared user and the thread's own user.
                store.append_events([ev("hot", f"t{t}-{k}"), ev(f"own{t}", f"t{t}-{k}")])
        except BaseException as exc:  # surfaced below; a thread cannot fail the test itself
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []

    hot = store.get_history("hot")
    assert len(hot) == n_threads * n_calls
    for t in range(n_threads):
        expected = [f"t{t}-{k}" for k in range(n_calls)]
        assert [i for i in hot if i.startswith(f"t{t}-")] == expected  # per-thread order kept
        assert store.get_history(f"own{t}") == expected


def test_concurrent_appends_respect_cap(make: MakeStore) -> None:
    store = make(max_history=7)

    def worker(t: int) -> None:
        for k in range(30):
            store.append_events([ev("hot", f"t{t}-{k}")])

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    hot = store.get_history("hot")
    assert len(hot) == 7
    assert len(set(hot)) == 7


def test_make_store_and_bad_config(redis_url: str) -> None:
    assert isinstance(make_store(None, 10), InMemoryStore)
    assert isinstance(make_store("", 10), InMemoryStore)
    store = make_store(redis_url, 10)
    try:
        assert isinstance(store, RedisStore)
        assert isinstance(store, HistoryStore)
        assert store.max_history == 10
        assert store.ping() is True
    finally:
        store.close()
    for bad in (0, -1, True):
        with pytest.raises(ValueError, match=r"^max_history: must be a positive integer"):
            InMemoryStore(max_history=bad)
        with pytest.raises(ValueError, match=r"^max_history: must be a positive integer"):
            RedisStore(redis_url, max_history=bad)
    with pytest.raises(ValueError, match=r"^socket_timeout: must be > 0"):
        RedisStore(redis_url, socket_timeout=0)


def test_redis_key_layout(redis_url: str) -> None:
    """Other components (and operators) read these keys: hist:<user> list, feat:<user> hash."""
    prefix = f"layout-{uuid.uuid4().hex}:"
    store = RedisStore(redis_url, max_history=3, key_prefix=prefix)
    raw = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        store.append_events([ev("u1", f"i{k}") for k in range(5)])
        store.set_user_features("u1", {"age": "30"})
        assert raw.type(f"{prefix}hist:u1") == "list"
        assert raw.lrange(f"{prefix}hist:u1", 0, -1) == ["i2", "i3", "i4"]
        assert raw.hgetall(f"{prefix}feat:u1") == {"age": "30"}
    finally:
        raw.delete(f"{prefix}hist:u1", f"{prefix}feat:u1")
        raw.close()
        store.close()


def _store_ops(store: RedisStore) -> dict[str, Callable[[], object]]:
    return {
        "get_history": lambda: store.get_history("u"),
        "get_histories": lambda: store.get_histories(["u", "v"]),
        "append_events": lambda: store.append_events([ev("u", "x")]),
        "set_user_features": lambda: store.set_user_features("u", {"a": "1"}),
        "get_user_features": lambda: store.get_user_features("u"),
    }


def test_redis_down_fails_fast_then_recovers_on_restart(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url, max_history=10)
    try:
        store.append_events([ev("u", "before")])
        assert store.get_history("u") == ["before"]

        port = redis_server.port
        redis_server.stop()
        for name, op in _store_ops(store).items():
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable, match=f"during {name}") as info:
                op()
            assert time.monotonic() - t0 < 1.0, name
            assert isinstance(info.value.__cause__, redis.ConnectionError), name
        t0 = time.monotonic()
        assert store.ping() is False
        assert time.monotonic() - t0 < 1.0
        # Validation comes before any I/O: bad input is a ValueError even with Redis down.
        with pytest.raises(ValueError, match=r"events\[0\]\.user_id"):
            store.append_events([ev("", "x")])

        redis_server.start()
        assert redis_server.port == port
        assert store.ping() is True
        assert store.append_events([ev("u", "after")]) == 1
        assert store.get_history("u") == ["after"]  # no persistence: earlier state is gone
    finally:
        store.close()


def test_redis_hung_server_times_out_fast(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url, max_history=10, socket_timeout=0.2)
    assert redis_server.proc is not None
    pid = redis_server.proc.pid
    try:
        store.append_events([ev("u", "a")])
        os.kill(pid, signal.SIGSTOP)  # accepts TCP (kernel backlog) but never answers
        try:
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable, match="during get_history") as info:
                store.get_history("u")
            assert time.monotonic() - t0 < 1.0
            assert isinstance(info.value.__cause__, redis.TimeoutError)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert store.get_history("u") == ["a"]
    finally:
        store.close()


def test_redis_cooldown_fails_fast_after_an_outage_until_ping(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url, max_history=10, socket_timeout=0.2, cooldown_s=30.0)
    assert redis_server.proc is not None
    pid = redis_server.proc.pid
    try:
        store.append_events([ev("u", "a")])
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(StoreUnavailable, match="during get_history"):
                store.get_history("u")  # pays the socket timeout once
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable, match="skipped for 30.0s after a failure"):
                store.get_history("u")
            assert time.monotonic() - t0 < 0.05  # no network wait while cooling down
        finally:
            os.kill(pid, signal.SIGCONT)
        with pytest.raises(StoreUnavailable, match="skipped"):
            store.append_events([ev("u", "b")])  # still cooling down: nothing written
        assert store.ping() is True  # a successful ping ends the cooldown
        assert store.get_history("u") == ["a"]
    finally:
        store.close()
    with pytest.raises(ValueError, match="cooldown_s"):
        RedisStore(redis_server.url, cooldown_s=-1)


# --- issue 15: idempotent events (finding 6) and bounded state (finding 4) ---


def evid(user: str, item: str, event_id: str | None) -> Event:
    return Event(user_id=user, item_id=item, timestamp=0.0, event_id=event_id)


def test_event_ids_are_deduplicated_within_the_history_window(make: MakeStore) -> None:
    store = make(max_history=3)
    assert store.append_events([evid("u", "a", "e1"), evid("u", "b", "e2")]) == 2
    assert store.append_events([evid("u", "a", "e1"), evid("u", "b", "e2")]) == 0  # a retry: nothing appended
    assert store.append_events([evid("u", "c", "e3"), evid("u", "c", "e3"), evid("u", "x", None)]) == 2
    assert store.get_history("u") == ["b", "c", "x"]  # capped at 3; events without an id always count
    assert store.append_events([evid("v", "a", "e1")]) == 1  # ids are per user
    # the window holds the last max_history ids: e1 has left it (e2, e3 and e4 are newer)
    store.append_events([evid("u", "d", "e4")])
    assert store.append_events([evid("u", "a", "e1")]) == 1
    assert store.get_history("u") == ["x", "d", "a"]
    with pytest.raises(ValueError, match=r"events\[0\]\.event_id"):
        store.append_events([evid("u", "a", "bad\x00")])


def test_in_memory_store_is_an_lru_of_at_most_max_users() -> None:
    store = InMemoryStore(max_history=5, max_users=3)
    for u in ("a", "b", "c"):
        store.append_events([ev(u, "i")])
    store.get_history("a")  # a is now the most recently used
    store.append_events([ev("d", "i")])  # evicts b, the least recently used
    assert len(store) == 3 and store.evictions == 1
    assert store.get_history("b") == [] and store.get_history("a") == ["i"] and store.get_history("d") == ["i"]
    with pytest.raises(ValueError, match="max_users"):
        InMemoryStore(max_users=0)


def test_redis_history_keys_get_a_ttl_refreshed_on_write(redis_url: str) -> None:
    prefix = f"ttl-{uuid.uuid4().hex}:"
    store = RedisStore(redis_url, key_prefix=prefix, history_ttl_s=1000)
    raw = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        store.append_events([evid("u", "a", "e1")])
        assert 990 < raw.ttl(f"{prefix}hist:u") <= 1000 and 990 < raw.ttl(f"{prefix}evid:u") <= 1000
        raw.expire(f"{prefix}hist:u", 10)
        store.append_events([evid("u", "b", None)])
        assert raw.ttl(f"{prefix}hist:u") > 990  # refreshed by the write
        forever = RedisStore(redis_url, key_prefix=prefix + "x:", history_ttl_s=0)
        forever.append_events([ev("u", "a")])
        assert raw.ttl(f"{prefix}x:hist:u") == -1  # 0 = no expiry
        forever.close()
        with pytest.raises(ValueError, match="history_ttl_s"):
            RedisStore(redis_url, history_ttl_s=-1)
    finally:
        for key in raw.scan_iter(f"{prefix}*"):
            raw.delete(key)
        raw.close()
        store.close()


def test_a_frozen_redis_write_is_an_unknown_outcome_and_a_retry_is_safe(redis_server: RedisServer) -> None:
    """Issue 15, finding 6: with Redis frozen (SIGSTOP) a write times out, yet Redis applies it
    when it resumes. That is StoreOutcomeUnknown, not StoreUnavailable; a retry with the same
    event id then does not duplicate the history."""
    from service.stores import StoreOutcomeUnknown

    store = RedisStore(redis_server.url, max_history=10, socket_timeout=0.2)
    assert redis_server.proc is not None
    pid = redis_server.proc.pid
    try:
        store.append_events([evid("u", "a", "e1")])
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(StoreOutcomeUnknown, match="outcome of append_events unknown"):
                store.append_events([evid("u", "b", "e2")])
        finally:
            os.kill(pid, signal.SIGCONT)
        assert store.append_events([evid("u", "b", "e2")]) == 0  # it had been applied: the retry is dropped
        assert store.get_history("u") == ["a", "b"]
        redis_server.stop()
        with pytest.raises(StoreUnavailable) as info:  # connection refused: known not written
            store.append_events([evid("u", "c", "e3")])
        assert not isinstance(info.value, StoreOutcomeUnknown)
    finally:
        store.close()


def test_eviction_metrics_follow_the_store(redis_url: str) -> None:
    from service.metrics import Metrics

    m = Metrics()
    store = InMemoryStore(max_history=2, max_users=2)
    store.append_events([ev(u, "i") for u in ("a", "b", "c", "d")])
    m.observe_store(*store.stats())
    m.observe_store(*store.stats())  # read twice: counted once
    text = m.render()[0].decode()
    assert "recsys_store_evictions_total 2.0" in text and "recsys_store_users 2.0" in text
    evicted, users, _ = RedisStore(redis_url).stats()
    assert isinstance(evicted, int) and evicted >= 0 and users is None
