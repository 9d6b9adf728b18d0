"""The in-process store is bounded by bytes as well as users (issue 23, finding 4):
RECSYS_MAX_STORE_BYTES, least recently used users evicted beyond it, `recsys_store_bytes` on
/metrics (service/stores.py).

On main the store counted users only: 200 events per user with 256-character ids of four-byte
characters cost ~436 KB per user, ~44 GB at the default 100k users.
"""

from __future__ import annotations

import gc
import tracemalloc
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import TypeAdapter

from service.core.config import Settings
from service.main import create_app
from service.stores import MAX_ID_LEN, Event, InMemoryStore
from tests.service.test_api import artifacts_root  # noqa: F401  (module fixture)

FOUR_BYTES = "\U0001f600"  # one character, four bytes in UTF-8, four in CPython's str


def worst_id(kind: str, *n: int) -> str:
    """A MAX_ID_LEN-character id of four-byte characters, unique per (kind, n)."""
    tail = f"{kind}{'-'.join(map(str, n))}"
    return FOUR_BYTES * (MAX_ID_LEN - len(tail)) + tail


def worst_events(user: int, history: int) -> list[Event]:
    uid = worst_id("u", user)
    return [Event(uid, worst_id("i", user, j), float(j), event_id=worst_id("e", user, j)) for j in range(history)]


def _traced(base: int) -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0] - base


def test_worst_case_ids_stay_within_the_byte_cap_measured_by_tracemalloc() -> None:
    cap, history, users = 8 << 20, 200, 40  # ~35 MB uncapped
    tracemalloc.start()
    try:
        base = _traced(0)
        store = InMemoryStore(max_history=history, max_users=100_000, max_bytes=cap)
        for u in range(users):
            store.append_events(worst_events(u, history))
            held = _traced(base)
            assert held <= store.nbytes <= cap, (u, store.nbytes, held)
        # reading a history as UTF-8 (what a pydantic response does) makes each id cache its
        # UTF-8 form, which the count already holds: still within the cap
        as_json = TypeAdapter(list[str])
        for u in range(users):
            as_json.dump_json(store.get_history(worst_id("u", u)))
        held = _traced(base)
        assert held <= store.nbytes <= cap, (store.nbytes, held)
        assert held >= 0.7 * store.nbytes, (store.nbytes, held)  # an upper bound, not a wild one
    finally:
        tracemalloc.stop()
    per_user = store.nbytes / len(store)
    assert 800_000 < per_user < 900_000  # 2 x 200 ids of 1,100 bytes + 1,025 of UTF-8, plus the deques
    assert len(store) == cap // int(per_user) and store.evictions == users - len(store)
    # least recently used first: the newest users are kept
    assert store.get_history(worst_id("u", users - 1))[-1] == worst_id("i", users - 1, history - 1)
    assert store.get_history(worst_id("u", 0)) == []


def test_eviction_is_least_recently_used_by_reads_too() -> None:
    store = InMemoryStore(max_history=100, max_bytes=1 << 20)
    for u in range(2):
        store.append_events(worst_events(u, 100))
    assert store.get_history(worst_id("u", 0))  # user 0 read: now more recent than user 1
    store.append_events(worst_events(2, 100))  # over 1 MiB: one user must go
    assert store.evictions == 1 and store.get_history(worst_id("u", 1)) == []
    assert store.get_history(worst_id("u", 0)) and store.get_history(worst_id("u", 2))


def test_bytes_follow_the_history_cap_and_features() -> None:
    store = InMemoryStore(max_history=5)
    store.append_events([Event("u", f"i{j:02d}", float(j)) for j in range(5)])
    full = store.nbytes
    store.append_events([Event("u", f"j{j:02d}", float(j)) for j in range(50)])  # same-size ids replace old ones
    assert store.nbytes == full
    store.set_user_features("u", {"age": "x" * 1000})
    assert store.nbytes > full + 1000 and store.get_user_features("u") == {"age": "x" * 1000}
    store.set_user_features("v", {"a": "b"})  # features only: still a user the caps count
    assert len(store) == 2


@pytest.mark.parametrize("bad", [0, 1000, True, "1"])
def test_bad_byte_caps_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        InMemoryStore(max_bytes=bad)  # type: ignore[arg-type]


def test_store_bytes_on_metrics_and_the_setting(artifacts_root: Path) -> None:  # noqa: F811
    app = create_app(Settings(artifacts=artifacts_root, allow_anonymous_writes=True, max_store_bytes=1 << 20,
                              reload_poll_s=0))
    with TestClient(app) as c:
        for u in range(4):
            events = [{"user_id": e.user_id, "item_id": e.item_id, "event_id": e.event_id} for e in worst_events(u, 100)]
            assert c.post("/v1/events", json=events).status_code == 202
        rows = {r.split()[0]: float(r.split()[1]) for r in c.get("/metrics").text.splitlines()
                if r.startswith(("recsys_store_bytes ", "recsys_store_users ", "recsys_store_evictions_total "))}
    assert 0 < rows["recsys_store_bytes"] <= 1 << 20
    assert rows["recsys_store_users"] == 2 and rows["recsys_store_evictions_total"] == 2
