"""End to end, the feedback loop's logs (issue 25, items 1-3) against `recsys serve` as a real
process with a real Redis: every accepted event in the events stream (and the histories agree),
every served list in the impressions stream under its request id, events attributed by
request_id and by window, and GET /v1/online-metrics on a small scripted traffic, with Wilson
intervals; then the same log read back as a training data set (`log:redis://...`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from service.contract.online_log import load_impression
from service.online_log import StreamReader, events_stream, impressions_stream, read_events
from tests.e2e.test_serve import stop_server, wait_ready
from tests.service.conftest import RedisServer, _require_binary, free_port
from tests.service.test_api import artifacts_root, catalog  # noqa: F401  (module fixtures)

KEY = "online-key"
H = {"X-API-Key": KEY}


@dataclass
class Live:
    base: str
    redis: RedisServer


@pytest.fixture(scope="module")
def live(artifacts_root: Path) -> Iterator[Live]:  # noqa: F811
    binary = _require_binary()
    with tempfile.TemporaryDirectory(prefix="recsys-online-") as tmp:
        rs = RedisServer(binary, Path(tmp))
        rs.start()
        port = free_port()
        env = {**os.environ, "RECSYS_API_KEY": KEY, "RECSYS_READ_KEY": "", "RECSYS_RELOAD_POLL_S": "0",
               "RECSYS_ATTRIBUTION_WINDOW_S": "600"}
        log = Path(tmp) / "server.log"  # a file, not a pipe nobody reads: an info-level log would fill one
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "recsys_cli", "serve", "--artifacts", str(artifacts_root),
                                     "--redis-url", rs.url, "--port", str(port)], env=env, stdout=out,
                                    stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_ready(proc, base, 60, log)
            yield Live(base, rs)
        finally:
            stop_server(proc, log)
            rs.stop()


def test_events_impressions_attribution_and_metrics(live: Live, catalog: list[str]) -> None:  # noqa: F811
    client = redis.Redis.from_url(live.redis.url, decode_responses=True)
    with httpx.Client(base_url=live.base, timeout=10) as http:
        served = {}
        for n in range(4):  # four users, one list of 5 each; the answer and the header carry the same id
            r = http.post("/v1/recommend", json={"user_id": f"u{n}", "history": catalog[n:n + 3], "k": 5},
                          headers={"X-Request-ID": f"req-{n}"})
            assert r.status_code == 200
            assert r.json()["request_id"] == r.headers["x-request-id"] == f"req-{n}"
            served[n] = [it["item_id"] for it in r.json()["items"]]
        batch = http.post("/v1/recommend/batch", json={"requests": [{"history": catalog[:2], "k": 3}]},
                          headers={"X-Request-ID": "b"}).json()
        assert batch["results"][0]["request_id"] == "b-0"
        # u0 clicks its position 0 by request id; u1 its position 2 without one (window); u2 an item
        # it was never shown; u3 nothing; u0 clicks position 0 again (counted once)
        events = [{"user_id": "u0", "item_id": served[0][0], "type": "click", "request_id": "req-0", "event_id": "x0"},
                  {"user_id": "u1", "item_id": served[1][2], "type": "click", "event_id": "x1"},
                  {"user_id": "u2", "item_id": "never-shown", "type": "click", "event_id": "x2"},
                  {"user_id": "u0", "item_id": served[0][0], "type": "click", "event_id": "x3"}]
        assert http.post("/v1/events", json=events, headers=H).json() == {"accepted": 4, "duplicates": 0}
        assert http.post("/v1/events", json=events[:1], headers=H).json() == {"accepted": 0, "duplicates": 1}
        m = http.get("/v1/online-metrics").json()
        metrics_text = http.get("/metrics").text
    # the events stream holds every accepted event once, as sent, and agrees with the histories
    logged = [e for e in read_events(f"{live.redis.url}?key={events_stream()}")]
    assert [(e.user_id, e.item_id, e.event_id, e.request_id) for e in logged] == sorted(
        [(e["user_id"], e["item_id"], e["event_id"], e.get("request_id")) for e in events], key=lambda t: t[0])
    for user in ("u0", "u1", "u2"):
        assert client.lrange(f"recsys:hist:{user}", 0, -1) == [e.item_id for e in logged if e.user_id == user]
    # the impressions stream: one record per served list, under its request id, items in order
    imps = {i.request_id: i for i in map(load_impression, StreamReader(client, impressions_stream()).read_new())}
    assert set(imps) == {"req-0", "req-1", "req-2", "req-3", "b-0"}
    assert [it.item_id for it in imps["req-1"].items] == served[1]
    assert [it.position for it in imps["req-1"].items] == [0, 1, 2, 3, 4]
    assert imps["req-1"].user_id == "u1" and imps["b-0"].user_id is None and imps["req-1"].sampled == 1.0
    # metrics: 5 lists (4 of 5 items, 1 of 3); clicks at position 0 (u0) and 2 (u1)
    assert m["events"] == 4 and m["attributed"] == {"request_id": 1, "window": 2} and m["duplicate_clicks"] == 1
    assert m["interval"].startswith("wilson")
    (g,) = m["groups"]
    assert g["impressions"] == 5 and g["experiment"] is None and g["arm"] is None
    assert (g["ctr_at_position"]["0"]["successes"], g["ctr_at_position"]["0"]["n"]) == (1, 5)
    assert (g["ctr_at_position"]["2"]["successes"], g["ctr_at_position"]["2"]["n"]) == (1, 5)
    assert (g["ctr_at_position"]["4"]["successes"], g["ctr_at_position"]["4"]["n"]) == (0, 4)
    assert (g["ctr_at_k"]["5"]["successes"], g["ctr_at_k"]["5"]["n"]) == (2, 23)
    hr = g["hit_rate_at_k"]["1"]
    assert (hr["successes"], hr["n"], hr["rate"]) == (1, 5, 0.2) and hr["low"] < 0.2 < hr["high"]
    assert g["coverage"]["catalog"] == len(catalog) and 0 < g["coverage"]["items"] <= 23
    assert f'recsys_online_impressions{{arm="",experiment="",version="{g["version"]}"}} 5.0' in metrics_text
    assert 'recsys_online_hit_rate_at_k{arm="",experiment="",k="1"' in metrics_text
    client.close()


def test_the_log_is_a_training_data_set(live: Live) -> None:
    from training.data.sources import load
    with httpx.Client(base_url=live.base, timeout=10) as http:
        sent = [{"user_id": "t1", "item_id": f"new-item-{n}", "timestamp": 1000.0 + n, "event_id": f"t{n}"}
                for n in range(3)]
        assert http.post("/v1/events", json=sent, headers=H).status_code == 202
    ds = load(f"log:{live.redis.url}")
    logged = list(read_events(live.redis.url))
    assert ds.users.size == len(logged)  # every logged event, nothing else
    t1 = list(ds.user_ids).index("t1")
    seq = ds.items[ds.offsets[t1]:ds.offsets[t1 + 1]]
    assert [str(ds.item_ids[i]) for i in seq] == ["new-item-0", "new-item-1", "new-item-2"]  # new items included
    assert ds.timestamps[ds.offsets[t1]:ds.offsets[t1 + 1]].tolist() == [1000, 1001, 1002]
