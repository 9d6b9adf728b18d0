"""Hostile input against a live `recsys serve` (issue 23): raw, malformed and hostile bodies, not
only schema-derived ones (non-finite numbers, lone surrogates, deep nesting, wrong types, wrong
content types, invalid UTF-8, broken framing, big headers), sent to every route. The server
must answer each with a status below 500 (or close the connection on broken framing) within a
few seconds, its RSS must stay flat across rounds, and its log must stay small (no traceback,
never a body).

A seeded mix of fixed hostile cases and mutations of valid bodies; about 740 requests per round,
three rounds, under a minute on loopback.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_serve import stop_server, wait_ready
from tests.service.conftest import free_port
from tests.service.test_api import artifacts_root, catalog  # noqa: F401  (module fixtures)

API_KEY, READ_KEY = "fuzz-key", "fuzz-read"
TIMEOUT_S = 5.0
ROUNDS = 3
# POST / PUT routes with a JSON body; GET routes with a path parameter get hostile paths
BODY_ROUTES = [("POST", "/v1/recommend"), ("POST", "/v1/recommend/batch"), ("POST", "/v1/events"),
               ("PUT", "/v1/items"), ("POST", "/v1/admin/reload")]
GET_ROUTES = ["/healthz", "/readyz", "/metrics", "/v1/version", "/openapi.json", "/v1/items/{id}",
              "/v1/users/{id}/history"]
HOSTILE_VALUES = ["1e400", "-1e400", "NaN", "Infinity", "-Infinity", '"\\ud800"', '"a\\udfffb"', '"\\u0000"',
                  "9" * 5000, "1" * 20, "-0", "1.5", "true", "null", "[]", "{}", '""', '"' + "x" * 300 + '"',
                  "[" * 60 + "]" * 60, '"\\ud83d\\ude00"', "0.1e-400", '{"$ref":"#"}']
HOSTILE_BODIES = [b"", b"null", b"[]", b"{}", b"[" * 100_000, b"{\"a\":" * 50_000, b"\xff\xfe\x00",
                  b'{"history":["1"]', b'{"history":["1"]}}', b"\x00" * 1000, b'{"history":["1"],"history":["2"]}',
                  "\ufeff{}".encode(), b'{"k":1}' * 1000, b'{"requests":[' + b'{"history":["1"]},' * 200 + b"{}]}",
                  json.dumps({"history": ["1"] * 1001}).encode(), json.dumps([{"user_id": "u"}] * 1001).encode()]
CONTENT_TYPES = ["application/json", "text/plain", "application/x-www-form-urlencoded",
                 "multipart/form-data; boundary=x", "application/json; charset=latin-1", "application/merge-patch+json",
                 "", "application/jsonx"]
RAW_FRAMING = [
    b"POST /v1/recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: abc\r\n\r\n{}",
    b"POST /v1/recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: -5\r\n\r\n{}",
    b"POST /v1/recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
    b"Content-Length: 7\r\n\r\n{}",
    b"POST /v1/recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"zz\r\n{}\r\n0\r\n\r\n",
    b"POST /v1/recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Length: 2\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    b"POST /v1/recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}GARBAGE",
    b"POST /v1/recommend HTTP/1.0\r\nContent-Type: application/json\r\n\r\n{}",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GARBAGE\r\n\r\n",
    b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n",
    b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 32_000 + b"\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(500)) + b"\r\n",
    b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Api-Key: " + b"\xff" * 100
    + b"\r\nContent-Length: 2\r\n\r\n{}",
]


@pytest.fixture()
def server(artifacts_root: Path, tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:  # noqa: F811
    port = free_port()
    log = tmp_path / "server.log"
    env = {**os.environ, "RECSYS_API_KEY": API_KEY, "RECSYS_READ_KEY": READ_KEY, "RECSYS_RELOAD_POLL_S": "0"}
    env.pop("RECSYS_REDIS_URL", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "recsys_cli", "serve", "--artifacts", str(artifacts_root), "--port", str(port),
             "--log-level", "warning"], env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, base, 60, log)
        yield base, proc, log
    finally:
        stop_server(proc, log)


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _mutations(rng: random.Random, valid: bytes, n: int) -> Iterator[bytes]:
    """Byte-level mutations of a valid body: a token replaced by a hostile value, truncation,
    a byte flipped, a chunk duplicated."""
    text = valid.decode()
    for _ in range(n):
        how = rng.randrange(4)
        if how == 0:
            tokens = [t for t in ('"1"', "5", "true", "[", '"u1"') if t in text]
            t = rng.choice(tokens) if tokens else '"1"'
            yield text.replace(t, rng.choice(HOSTILE_VALUES), 1).encode()
        elif how == 1:
            yield valid[: rng.randrange(len(valid))]
        elif how == 2:
            b = bytearray(valid)
            b[rng.randrange(len(b))] = rng.randrange(256)
            yield bytes(b)
        else:
            i = rng.randrange(len(valid))
            yield valid[:i] + valid[i:] * rng.randrange(2, 20)


def _valid_bodies(items: list[str]) -> dict[str, list[bytes]]:
    one = {"history": items[:3], "k": 5, "exclude": items[3:4], "filters": {}, "explain": True}
    return {
        "/v1/recommend": [json.dumps(one).encode(), json.dumps({"user_id": "u1", "k": 5}).encode()],
        "/v1/recommend/batch": [json.dumps({"requests": [one, {"user_id": "u1"}]}).encode()],
        "/v1/events": [json.dumps([{"user_id": "u1", "item_id": items[0], "timestamp": 5, "type": "view",
                                    "event_id": "e1"}]).encode()],
        "/v1/items": [json.dumps({"item_id": "new", "features": {"price": 1.5}}).encode()],
        "/v1/admin/reload": [b""],
    }


def _cases(items: list[str], rng: random.Random) -> Iterator[tuple[str, str, bytes, dict[str, str]]]:
    """(method, path, body, headers) for one round."""
    valid = _valid_bodies(items)
    for method, path in BODY_ROUTES:
        bodies = [*HOSTILE_BODIES, *(b'{"history":[' + v.encode() + b'],"k":' + v.encode() + b"}"
                                     for v in HOSTILE_VALUES)]
        for body in valid[path]:
            bodies += list(_mutations(rng, body, 25)) if body else []
        for body in bodies:
            for key in (None, rng.choice((API_KEY, READ_KEY))):
                headers = {"content-type": "application/json", **({"x-api-key": key} if key else {})}
                yield method, path, body, headers
        for ct in CONTENT_TYPES:
            yield method, path, valid[path][0], {"content-type": ct, "x-api-key": API_KEY} if ct else {}
    hostile_ids = ["%ED%A0%80", "%00", "%FF%FE", "a" * 300, "..%2F..%2Fetc%2Fpasswd", "%F0%9F%98%80" * 60, "%",
                   "%zz", items[0], "-1"]
    for path in GET_ROUTES:
        for hid in hostile_ids if "{id}" in path else [""]:
            for key in (None, READ_KEY):
                yield "GET", path.replace("{id}", hid), b"", ({"x-api-key": key} if key else {})
    for method in ("DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE"):
        yield method, "/v1/recommend", b"{}", {"content-type": "application/json"}


def _raw(port: int, payload: bytes) -> int | None:
    """Send raw bytes; the first response's status, or None when the server closed without one.
    A read that times out is a hang."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as s:
        s.sendall(payload)
        try:
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        data = b""
        try:
            while b"\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    return None
                data += chunk
        except ConnectionResetError:
            return None
        except TimeoutError:
            raise AssertionError(f"no answer within {TIMEOUT_S} s to {payload[:80]!r}") from None
    return int(data.split(b" ", 2)[1])


def test_hostile_input_on_every_route_no_5xx_no_hang_flat_rss(
        server: tuple[str, subprocess.Popen[bytes], Path], catalog: list[str]) -> None:  # noqa: F811
    base, proc, log = server
    port = int(base.rsplit(":", 1)[1])
    rng = random.Random(23)
    rss: list[float] = []
    sent, statuses = 0, set()
    with httpx.Client(base_url=base, timeout=TIMEOUT_S) as client:
        for _ in range(ROUNDS):
            for method, path, body, headers in _cases(catalog, rng):
                try:
                    r = client.request(method, path, content=body, headers=headers)
                except httpx.TimeoutException:
                    raise AssertionError(f"{method} {path} hung on {body[:80]!r}") from None
                except httpx.TransportError:  # the server closed the connection: not a 5xx, not a hang
                    client.close()
                    client = httpx.Client(base_url=base, timeout=TIMEOUT_S)
                    continue
                assert r.status_code < 500, (method, path, body[:120], headers, r.status_code, r.text[:300])
                statuses.add(r.status_code)
                sent += 1
            for payload in RAW_FRAMING:
                status = _raw(port, payload)
                assert status is None or status < 500, (payload[:120], status)
                sent += 1
            assert client.get("/healthz").status_code == 200
            rss.append(_rss_mib(proc.pid))
    assert proc.poll() is None, "the server died"
    assert sent > 2000 and {200, 202, 401, 422} <= statuses, (sent, statuses)
    # the first round warms caches and allocators; later rounds must not keep growing
    assert rss[-1] - rss[1] < 15, f"RSS per round (MiB): {rss}"
    print(f"fuzz: {sent} requests, statuses {sorted(statuses)}, RSS per round (MiB) {rss}")
    text = log.read_bytes()
    assert len(text) < 64_000 and b"Traceback" not in text, text[-3000:]
