"""The durable online log: rotated JSON Lines (write, rotate, tail), the in-process store's event
log (exactly what the histories took), the impression log's background writer (a failing sink is
counted, never raised), the Redis store's event stream (same script as the history), and the
online metrics join (attribution by request_id and by window, click-through, Wilson intervals,
interleaving credit) on hand-computed cases."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pytest
import redis

from service.contract.online_log import (EVENTS_FILE_PREFIX, Impression, ImpressionItem, LoggedEvent, dumps,
                                         load_impression, log_file_name)
from service.online_log import (EventFileLog, ImpressionLog, JsonlReader, RotatingJsonl, StreamBound,
                                StreamReader, log_files, read_events)
from service.online_metrics import OnlineJoin, wilson
from service.redis_store import RedisStore
from service.stores import Event, InMemoryStore


def test_jsonl_rotates_and_the_reader_tails_complete_lines_only(tmp_path: Path) -> None:
    log = RotatingJsonl(tmp_path, "events", max_bytes=30)
    reader = JsonlReader(tmp_path, "events")
    log.write(['{"a":1}', '{"a":2}'])  # 16 bytes: stays in file 0
    assert reader.read_new() == ['{"a":1}', '{"a":2}']
    log.write(['{"a":3}', '{"a":4}'])  # 32 bytes: file 0 is full, the next write opens file 1
    log.write(['{"a":5}'])
    assert [seq for seq, _ in log_files(tmp_path, "events")] == [0, 1]
    with open(tmp_path / log_file_name("events", 1), "ab") as fh:
        fh.write(b'{"a":')  # a line being written
    assert reader.read_new() == ['{"a":3}', '{"a":4}', '{"a":5}']
    with open(tmp_path / log_file_name("events", 1), "ab") as fh:
        fh.write(b'6}\n')
    assert reader.read_new() == ['{"a":6}']
    assert reader.read_new() == []
    log.close()
    again = RotatingJsonl(tmp_path, "events", max_bytes=30, keep_files=1)  # reopens the newest file
    again.write(['{"a":7}', '{"a":8}'])  # file 1: 16 + 16 bytes
    again.close()
    assert [seq for seq, _ in log_files(tmp_path, "events")] == [2]  # rotated; keep_files=1 deleted 0 and 1


def test_in_process_store_logs_exactly_what_the_histories_took(tmp_path: Path) -> None:
    store = InMemoryStore(event_log=EventFileLog(RotatingJsonl(tmp_path, EVENTS_FILE_PREFIX, max_bytes=200)))
    batch = [Event("u1", "a", 10.0, "click", "e1", "r1"), Event("u1", "b", 11.0), Event("u2", "a", 12.0, "view", "e1"),
             Event("u1", "c", 13.0, "click", "e1")]  # the last: a retry of e1 within the call
    assert store.append_events(batch) == 3
    assert store.append_events([Event("u1", "z", 14.0, "click", "e1")]) == 0  # a retry: in neither
    store.append_events([Event("u3", f"i{n}", 20.0 + n) for n in range(5)])  # rotates past 200 bytes
    logged = list(read_events(str(tmp_path)))
    assert len(log_files(tmp_path, EVENTS_FILE_PREFIX)) > 1
    assert logged[:3] == [LoggedEvent("u1", "a", "click", 10.0, "e1", "r1"), LoggedEvent("u1", "b", "view", 11.0),
                          LoggedEvent("u2", "a", "view", 12.0, "e1")]
    for user in ("u1", "u2", "u3"):
        assert [e.item_id for e in logged if e.user_id == user] == store.get_history(user)


class _BrokenLog:
    def write_events(self, events: Sequence[Event]) -> None:
        raise OSError("disk full")


def test_in_process_store_appends_nothing_when_its_log_fails() -> None:
    from service.stores import StoreUnavailable
    store = InMemoryStore(event_log=_BrokenLog())
    with pytest.raises(StoreUnavailable, match="disk full"):
        store.append_events([Event("u1", "a", 1.0)])
    assert store.get_history("u1") == []


class _ListSink:
    def __init__(self, fail: bool = False) -> None:
        self.lines: list[str] = []
        self.fail = fail

    def write(self, lines: Sequence[str]) -> None:
        if self.fail:
            raise ConnectionError("redis down")
        self.lines.extend(lines)

    def close(self) -> None:
        pass


def test_impression_log_writes_in_the_background_and_counts_failures() -> None:
    sink = _ListSink()
    log = ImpressionLog(sink, rate=1.0)
    assert log.record("r1", "u1", "v1", [("a", 2.5, None), ("b", None, "arm-b")], "exp", "arm-a")
    assert log.flush()
    imp = load_impression(sink.lines[0])
    assert (imp.request_id, imp.user_id, imp.version, imp.experiment, imp.arm, imp.sampled) == (
        "r1", "u1", "v1", "exp", "arm-a", 1.0)
    assert imp.items == (ImpressionItem("a", 0, 2.5, None), ImpressionItem("b", 1, None, "arm-b"))
    errors: list[tuple[str, int]] = []
    broken = ImpressionLog(_ListSink(fail=True), on_error=lambda reason, n: errors.append((reason, n)))
    broken.record("r2", None, "v1", [("a", 1.0, None)])  # never raises
    assert broken.flush()
    assert (broken.failed, errors) == (1, [("write_failed", 1)])
    none = ImpressionLog(_ListSink(), rate=0.0)
    assert not none.record("r3", None, "v1", [])
    for lg in (log, broken, none):
        lg.close()


def test_impression_log_writes_what_arrives_within_the_linger_as_one_batch() -> None:
    class _Batches(_ListSink):
        def __init__(self) -> None:
            super().__init__()
            self.batches: list[int] = []

        def write(self, lines: Sequence[str]) -> None:
            self.batches.append(len(lines))
            super().write(lines)

    sink = _Batches()
    log = ImpressionLog(sink, linger_s=0.5)
    for i in range(5):
        assert log.record(f"r{i}", None, "v1", [("a", None, None)])
    assert log.flush()
    log.close()
    assert sink.batches == [5]
    assert [load_impression(line).request_id for line in sink.lines] == ["r0", "r1", "r2", "r3", "r4"]
    with pytest.raises(ValueError, match="linger_s: must be >= 0, got -1"):
        ImpressionLog(_ListSink(), linger_s=-1)


def test_impression_sampling_keeps_about_the_rate() -> None:
    sink = _ListSink()
    log = ImpressionLog(sink, rate=0.25)
    kept = sum(log.record(f"r{i}", None, "v1", [("a", None, None)]) for i in range(4000))
    log.close()
    assert 800 < kept < 1200  # binomial(4000, 0.25): sd 27
    assert len(sink.lines) == kept and load_impression(sink.lines[0]).sampled == 0.25


def test_redis_store_appends_history_and_stream_in_one_step(redis_url: str) -> None:
    prefix = "test-online-log:"
    store = RedisStore(redis_url, key_prefix=prefix, event_log=StreamBound(maxlen=1000))
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.delete(store.events_stream)
    assert store.append_events([Event("u1", "a", 1.0, "click", "e1", "r1"), Event("u1", "b", 2.0),
                                Event("u2", "c", 3.0, "view", "e1")]) == 3
    assert store.append_events([Event("u1", "a", 1.0, "click", "e1", "r1")]) == 0  # retry: in neither
    logged = [e for e in (load_event_line(x) for x in StreamReader(client, store.events_stream).read_new())]
    assert logged == [LoggedEvent("u1", "a", "click", 1.0, "e1", "r1"), LoggedEvent("u1", "b", "view", 2.0),
                      LoggedEvent("u2", "c", "view", 3.0, "e1")]
    assert store.get_history("u1") == ["a", "b"]
    host = redis_url.removeprefix("redis://")
    assert list(read_events(f"redis://{host}?key={store.events_stream}")) == logged  # the log: source's reader
    aged = RedisStore(redis_url, key_prefix=prefix, event_log=StreamBound(max_age_s=3600))
    aged.append_events([Event("u3", "d", 4.0)])  # MINID trimming keeps recent entries
    assert client.xlen(store.events_stream) == 4
    client.close()


def load_event_line(line: str) -> LoggedEvent:
    from service.contract.online_log import load_event
    return load_event(line)


def _imp(rid: str, user: str | None, items: list[str], ts: float, version: str = "v1", arm: str | None = None,
         sources: list[str] | None = None) -> Impression:
    return Impression(rid, user, version, "exp" if arm else None, arm,
                      tuple(ImpressionItem(i, p, 1.0 / (p + 1), None if sources is None else sources[p])
                            for p, i in enumerate(items)), ts)


def test_join_attributes_by_request_id_then_by_window() -> None:
    j = OnlineJoin(window_s=100.0, ks=(1, 2, 3))
    j.add_impression(_imp("r1", "u1", ["a", "b", "c"], 1000.0))
    j.add_impression(_imp("r2", "u1", ["b", "d", "e"], 1010.0))
    j.add_impression(_imp("r3", "u2", ["a", "b", "c"], 1020.0))
    assert j.add_event(LoggedEvent("u1", "b", "click", 1030.0, request_id="r1"))  # exact: r1 position 1
    assert j.add_event(LoggedEvent("u1", "b", "click", 1031.0))  # window: the latest showing b is r2, position 0
    assert j.add_event(LoggedEvent("u1", "b", "click", 1032.0))  # r2's b again: counted once
    assert not j.add_event(LoggedEvent("u1", "z", "click", 1033.0))  # never shown
    assert j.add_event(LoggedEvent("u2", "c", "click", 1040.0, request_id="nope"))  # unknown id: window, r3 pos 2
    assert not j.add_event(LoggedEvent("u2", "a", "click", 1200.0))  # r3 is 180 s old: outside the window
    assert (j.events, j.attributed, j.duplicate_clicks) == (6, {"request_id": 1, "window": 3}, 1)
    (g,) = j.snapshot({"v1": 10})["groups"]
    assert g["impressions"] == 3
    # shown: 3 at each position; clicked: pos 0 (r2's b), pos 1 (r1's b), pos 2 (r3's c)
    assert {p: (c["successes"], c["n"]) for p, c in g["ctr_at_position"].items()} == {
        "0": (1, 3), "1": (1, 3), "2": (1, 3)}
    assert {k: (c["successes"], c["n"]) for k, c in g["ctr_at_k"].items()} == {"1": (1, 3), "2": (2, 6), "3": (3, 9)}
    assert {k: (c["successes"], c["n"]) for k, c in g["hit_rate_at_k"].items()} == {"1": (1, 3), "2": (2, 3),
                                                                                      "3": (3, 3)}
    assert g["coverage"] == {"items": 5, "catalog": 10, "share": 0.5}


def test_wilson_interval_matches_the_formula() -> None:
    lo0 = wilson(0, 10)
    assert lo0["rate"] == 0.0 and lo0["low"] == 0.0
    assert lo0["high"] == pytest.approx(1.96 ** 2 / (10 + 1.96 ** 2))  # x = 0: z^2 / (n + z^2)
    w = wilson(30, 100)
    p, n, z = 0.3, 100, 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert (w["low"], w["high"]) == pytest.approx((centre - half, centre + half))
    assert (w["low"], w["high"]) == pytest.approx((0.2189, 0.3958), abs=1e-4)  # tables' value for 30/100
    assert wilson(0, 0)["rate"] is None


def test_interleaving_credits_clicks_and_wins_to_the_contributing_source() -> None:
    j = OnlineJoin(window_s=100.0)
    j.add_impression(_imp("r1", "u1", ["a", "b", "c"], 0.0, arm="mix", sources=["A", "B", "A"]))
    j.add_impression(_imp("r2", "u2", ["a", "b"], 0.0, arm="mix", sources=["B", "A"]))
    j.add_impression(_imp("r3", "u3", ["a", "b"], 0.0, arm="mix", sources=["A", "B"]))
    j.add_event(LoggedEvent("u1", "a", "click", 1.0, request_id="r1"))  # A
    j.add_event(LoggedEvent("u1", "c", "click", 2.0, request_id="r1"))  # A: r1 won by A
    j.add_event(LoggedEvent("u2", "a", "click", 1.0, request_id="r2"))  # B: r2 won by B
    j.add_event(LoggedEvent("u3", "a", "click", 1.0, request_id="r3"))  # A then B: a tie
    j.add_event(LoggedEvent("u3", "b", "click", 2.0, request_id="r3"))
    inter = j.snapshot()["interleaving"]["exp"]
    assert inter["ties"] == 1 and inter["decided"] == 2
    assert {s: (v["clicks"], v["wins"]) for s, v in inter["sources"].items()} == {"A": (3, 1), "B": (2, 1)}
    assert inter["sources"]["A"]["win_share"]["rate"] == 0.5


def test_records_round_trip_and_bad_records_are_named() -> None:
    imp = _imp("r1", None, ["a"], 5.0, sources=["A"])
    assert load_impression(dumps(imp)) == imp
    with pytest.raises(ValueError, match=r"impression.items\[0\].position"):
        load_impression('{"request_id":"r","version":"v","items":[{"item_id":"a","position":-1}],"ts":1}')
    with pytest.raises(ValueError, match="impression.sampled"):
        load_impression('{"request_id":"r","version":"v","items":[],"ts":1,"sampled":0}')
