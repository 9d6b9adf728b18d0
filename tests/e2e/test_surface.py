"""End to end, the integration surface of issue 24 against `recsys serve` as a real process with
a real Redis: the Python client (recsys_client), JSON logs on one stream with a request id on
every line of a request, and CORS (a browser's preflight).

One server for the module (JSON logs, CORS for one origin, an API key, its own redis-server that
tests stop and restart); its stderr and stdout go to files the log test reads.
"""

from __future__ import annotations

import asyncio
import compileall
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from recsys_client import (AsyncRecsysClient, AuthError, Event, InvalidRequest, NotFound, Query, RecsysClient,
                           Unavailable)
from tests.e2e.test_serve import stop_server, wait_ready
from tests.service.conftest import RedisServer, _require_binary, free_port
from tests.service.test_api import artifacts_root, catalog  # noqa: F401  (module fixtures)

KEY = "surface-key"
ORIGIN = "https://shop.example.com"


@dataclass
class Live:
    base: str
    redis: RedisServer
    stderr: Path
    stdout: Path

    def restart_redis_in(self, delay_s: float) -> threading.Thread:
        thread = threading.Thread(target=lambda: (time.sleep(delay_s), self.redis.start()), daemon=True)
        thread.start()
        return thread


@pytest.fixture(scope="module")
def live(artifacts_root: Path) -> Iterator[Live]:  # noqa: F811
    binary = _require_binary()
    with tempfile.TemporaryDirectory(prefix="recsys-surface-") as tmp:
        redis = RedisServer(binary, Path(tmp))
        redis.start()
        port = free_port()
        env = {**os.environ, "RECSYS_API_KEY": KEY, "RECSYS_READ_KEY": "", "RECSYS_RELOAD_POLL_S": "0",
               "RECSYS_LOG_FORMAT": "json", "RECSYS_CORS_ORIGINS": ORIGIN, "RECSYS_STORE_COOLDOWN_S": "0.2"}
        err, out = Path(tmp) / "stderr.log", Path(tmp) / "stdout.log"
        with err.open("wb") as err_f, out.open("wb") as out_f:
            proc = subprocess.Popen(
                [sys.executable, "-m", "recsys_cli", "serve", "--artifacts", str(artifacts_root), "--redis-url",
                 redis.url, "--port", str(port), "--log-level", "info"], env=env, stdout=out_f, stderr=err_f)
            base = f"http://127.0.0.1:{port}"
            try:
                wait_ready(proc, base, 60, err)
                yield Live(base, redis, err, out)
            finally:
                stop_server(proc, err)
                redis.stop()


# --- the Python client ---


def test_client_recommend_batch_item_version(live: Live, catalog: list[str]) -> None:  # noqa: F811
    with RecsysClient(live.base, api_key=KEY) as rs:
        user = f"client-{time.time_ns()}"
        sent = rs.send_events([Event(user, i) for i in catalog[:3]])
        assert (sent.accepted, sent.duplicates, sent.attempts) == (3, 0, 1) and len(set(sent.event_ids)) == 3
        assert rs.history(user) == catalog[:3]
        rec = rs.recommend(user_id=user, k=5, explain=True)
        assert len(rec.items) == 5 and not set(rec.item_ids) & set(catalog[:3])
        assert rec.model_version == "v1" and rec.scored_by == rec.served_by.split(";")[0]
        assert [it.rank for it in rec.items] == [1, 2, 3, 4, 5] and all(it.stages for it in rec.items)
        assert rec.request_id is not None and re.fullmatch(r"[0-9a-f]{32}", rec.request_id)
        batch = rs.recommend_batch([Query(history=catalog[:3], k=5), Query(k=2)])
        assert batch[0].item_ids == rec.item_ids and batch[1].scored_by == "popularity" and len(batch[1].items) == 2
        item = rs.item(catalog[0])
        assert item.item_id == catalog[0] and item.index >= 1
        version = rs.version()
        assert version.model_version == "v1" and version.item_count == len(catalog)


def test_async_client_gives_the_same_answers(live: Live, catalog: list[str]) -> None:  # noqa: F811
    async def run() -> tuple[list[str], int, str]:
        async with AsyncRecsysClient(live.base, api_key=KEY) as rs:
            rec = await rs.recommend(history=catalog[:3], k=5)
            item = await rs.item(catalog[1])
            return rec.item_ids, item.index, (await rs.version()).model_version

    ids, index, version = asyncio.run(run())
    with RecsysClient(live.base) as rs:
        assert ids == rs.recommend(history=catalog[:3], k=5).item_ids
        assert index == rs.item(catalog[1]).index and version == "v1"


def test_client_errors_are_typed_and_a_422_names_the_field(live: Live, catalog: list[str]) -> None:  # noqa: F811
    with RecsysClient(live.base) as rs:
        with pytest.raises(InvalidRequest) as bad_k:
            rs.recommend(history=catalog[:2], k=0)
        assert bad_k.value.status == 422 and bad_k.value.field == "k"
        with pytest.raises(InvalidRequest) as bad_filter:
            rs.recommend(history=catalog[:2], filters={"no_such_feature": "x"})
        assert bad_filter.value.field.startswith("filters")
        with pytest.raises(InvalidRequest) as bad_batch:
            rs.recommend_batch([Query(k=1), Query(k=0)])
        assert bad_batch.value.field == "requests.1.k"
        with pytest.raises(NotFound):
            rs.item("no-such-item")
        with pytest.raises(AuthError) as no_key:  # writes need the key
            rs.send_events(Event("u", catalog[0]))
        assert no_key.value.status == 401 and no_key.value.request_id


def test_event_retries_reuse_the_event_id_so_a_retry_is_stored_once(live: Live, catalog: list[str]) -> None:  # noqa: F811
    user = f"retry-{time.time_ns()}"
    with RecsysClient(live.base, api_key=KEY, event_retries=0) as once:
        live.redis.stop()
        try:
            with pytest.raises(Unavailable):  # 503: the store is down, nothing written
                once.send_events(Event(user, catalog[0]))
        except BaseException:
            live.redis.start()
            raise
        # Redis comes back while the client retries (0.25, 0.5, 1, 2, 4 s apart)
        restart = live.restart_redis_in(1.0)
        try:
            with RecsysClient(live.base, api_key=KEY, event_retries=6, retry_backoff_s=0.25) as rs:
                sent = rs.send_events([Event(user, catalog[1]), Event(user, catalog[2])])
        finally:
            restart.join(timeout=30)
        assert sent.attempts > 1 and (sent.accepted, sent.duplicates) == (2, 0)
        # the same ids again (a retry whose first answer was lost): not stored twice
        again = once.send_events([Event(user, catalog[1], event_id=sent.event_ids[0]),
                                  Event(user, catalog[2], event_id=sent.event_ids[1])])
        assert (again.accepted, again.duplicates) == (0, 2)
        assert once.history(user) == [catalog[1], catalog[2]]


# --- logs: one stream, JSON lines, a request id on every line of a request ---


def _log_lines(live: Live) -> list[dict[str, object]]:
    lines = [line for line in live.stderr.read_text().splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # every line is one JSON object


def test_json_logs_carry_the_request_id_on_every_line_of_a_request(live: Live, catalog: list[str]) -> None:  # noqa: F811
    given = f"surface-{time.time_ns()}"
    r = httpx.post(f"{live.base}/v1/recommend", json={"history": catalog[:2], "k": 3}, headers={"X-Request-ID": given})
    assert r.status_code == 200 and r.headers["x-request-id"] == given
    made = httpx.get(f"{live.base}/v1/version").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    forged = httpx.get(f"{live.base}/healthz", headers={"X-Request-ID": "x\" injected"}).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", forged)  # not a plain token: replaced, never logged as sent
    # a request that logs a warning on the compute thread: the stored history is unreachable
    warned = f"surface-warn-{time.time_ns()}"
    live.redis.stop()
    try:
        r = httpx.post(f"{live.base}/v1/recommend", json={"user_id": "someone", "k": 3},
                       headers={"X-Request-ID": warned, "X-API-Key": KEY})
    finally:
        live.redis.start()
    assert r.status_code == 200 and r.json()["served_by"].endswith("store_unavailable") and r.headers[
        "x-request-id"] == warned
    time.sleep(0.3)  # the access line is written as the answer goes out
    records = _log_lines(live)
    assert {"ts", "level", "logger", "message"} <= set(records[0])
    assert any(rec["logger"] == "uvicorn.error" for rec in records)  # uvicorn's lines on the same stream
    mine = [rec for rec in records if rec.get("request_id") == given]
    assert [rec["logger"] for rec in mine] == ["uvicorn.access"] and "/v1/recommend" in str(mine[0]["message"])
    theirs = [rec for rec in records if rec.get("request_id") == warned]
    assert {rec["logger"] for rec in theirs} == {"service.recommend", "uvicorn.access"}, theirs
    assert all(rec.get("request_id") for rec in records if rec["logger"] == "uvicorn.access")
    assert not any("faiss" in str(rec["logger"]) for rec in records)  # start-up noise silenced
    assert live.stdout.read_text() == ""  # one stream


# --- CORS ---


def test_cors_preflight_allows_the_configured_origin_only(live: Live) -> None:
    ask = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type,x-api-key"}
    ok = httpx.options(f"{live.base}/v1/recommend", headers={"Origin": ORIGIN, **ask})
    assert ok.status_code == 200, ok.text
    assert ok.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in ok.headers["access-control-allow-methods"]
    assert {"content-type", "x-api-key"} <= set(ok.headers["access-control-allow-headers"].lower().split(", "))
    other = httpx.options(f"{live.base}/v1/recommend", headers={"Origin": "https://evil.example", **ask})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    # the actual call: the browser may read the answer and its request id
    r = httpx.post(f"{live.base}/v1/recommend", json={"k": 2}, headers={"Origin": ORIGIN})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()


# --- a client generated from the live /openapi.json by a standard generator ---

GENERATED_CALLS = """
import json, sys
from recsys_api import AuthenticatedClient
from recsys_api.api.recommend import recommend
from recsys_api.api.events import post_events
from recsys_api.api.catalog import get_version
from recsys_api.models import RecommendRequest, RecommendResponse, EventIn, EventsAccepted
base, key, history = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
client = AuthenticatedClient(base_url=base, token=key, prefix="", auth_header_name="X-API-Key")
rec = recommend.sync(client=client, body=RecommendRequest(history=history, k=3))
assert isinstance(rec, RecommendResponse), rec
sent = post_events.sync(client=client, body=EventIn(user_id="generated", item_id=history[0], event_id="gen-1"))
assert isinstance(sent, EventsAccepted), sent
print(json.dumps({"items": [it.item_id for it in rec.items], "scored_by": str(rec.scored_by),
                  "accepted": sent.accepted + sent.duplicates, "version": get_version.sync(client=client).model_version}))
"""


def test_a_generated_client_compiles_and_calls_the_api(live: Live, catalog: list[str], tmp_path: Path) -> None:  # noqa: F811
    bin_dir = str(Path(sys.executable).parent)
    exe = shutil.which("openapi-python-client", path=bin_dir) or shutil.which("openapi-python-client")
    if exe is None:
        pytest.skip("openapi-python-client is not installed (pip install '.[test]')")
    doc = tmp_path / "openapi.json"
    doc.write_text(httpx.get(f"{live.base}/openapi.json").text)
    out = tmp_path / "gen" / "recsys_api"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}  # its ruff post-hook
    proc = subprocess.run([exe, "generate", "--path", str(doc), "--output-path", str(out), "--meta", "none"],
                          capture_output=True, text=True, timeout=300, env=env)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Warning" not in report, report  # every schema understood
    assert compileall.compile_dir(str(out), quiet=1)
    call = subprocess.run([sys.executable, "-c", GENERATED_CALLS, live.base, KEY, json.dumps(catalog[:3])],
                          capture_output=True, text=True, timeout=120, cwd=out.parent)
    assert call.returncode == 0, call.stderr
    got = json.loads(call.stdout)
    with RecsysClient(live.base) as rs:
        assert got["items"] == rs.recommend(history=catalog[:3], k=3).item_ids
    assert got["scored_by"] in ("rerank", "prerank", "retrieval") and got["accepted"] == 1 and got["version"] == "v1"
