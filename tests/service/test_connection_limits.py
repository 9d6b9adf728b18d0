"""Connection limits (issue 23) against a live uvicorn server on loopback, run with the service's
protocol (service/connection_limits.py) over a tiny ASGI app, its limits set by RECSYS_* as
`recsys serve` sets them. tests/e2e/test_serve.py checks that `recsys serve` itself applies them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.connection_limits import PROTOCOL
from tests.service.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
KEEP_ALIVE_S, HEADER_S, BODY_S, MAX_CONN, MAX_HEAD = 1.0, 1.5, 1.5, 24, 4096
SLACK_S = 1.5  # a loaded 2-core box: how late a close may come
LIMITS_ENV = {"RECSYS_KEEP_ALIVE_S": str(KEEP_ALIVE_S), "RECSYS_HEADER_TIMEOUT_S": str(HEADER_S),
              "RECSYS_BODY_TIMEOUT_S": str(BODY_S), "RECSYS_MAX_CONNECTIONS": str(MAX_CONN),
              "RECSYS_MAX_HEADER_BYTES": str(MAX_HEAD)}


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """GET /healthz -> "ok"; POST /echo -> the body's length, read to its end."""
    if scope["type"] != "http":
        return
    size, more = 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    body = b"ok" if scope["path"] == "/healthz" else str(size).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    port = free_port()
    code = (f"import uvicorn; uvicorn.run('tests.service.test_connection_limits:app', host='127.0.0.1', "
            f"port={port}, http={PROTOCOL!r}, log_level='warning', lifespan='off')")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **LIMITS_ENV})
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                assert get(port, "/healthz")[0] == 200
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_all(s: socket.socket) -> bytes:
    """Everything until the server closes (or resets) the connection."""
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def read_response(s: socket.socket) -> bytes:
    """One response with a Content-Length, read to its end."""
    out = b""
    while b"\r\n\r\n" not in out:
        out += s.recv(4096)
    head, _, body = out.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += s.recv(4096)
    return head + b"\r\n\r\n" + body


def get(port: int, path: str, extra: bytes = b"") -> tuple[int, float]:
    """(status, seconds) of one GET on a fresh connection."""
    t0 = time.perf_counter()
    with connect(port) as s:
        s.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n" + extra + b"Connection: close\r\n\r\n")
        reply = read_all(s)
    return int(reply.split(b" ", 2)[1]), time.perf_counter() - t0


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else 0


def test_idle_connections_closed_after_keep_alive(port: int) -> None:
    fresh = [connect(port) for _ in range(20)]  # never send a byte (main: held for ever)
    used = connect(port)  # one request, then idle (closed by uvicorn already)
    used.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_response(used).startswith(b"HTTP/1.1 200")
    t0 = time.perf_counter()
    for s in [*fresh, used]:
        with s:
            assert read_all(s) == b""
    assert KEEP_ALIVE_S - 0.2 < time.perf_counter() - t0 < KEEP_ALIVE_S + SLACK_S


def test_connection_kept_alive_while_requests_come(port: int) -> None:
    with connect(port) as s:
        for _ in range(3):  # spaced below the keep-alive timeout: one connection serves them all
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(s).startswith(b"HTTP/1.1 200")
            time.sleep(KEEP_ALIVE_S / 2)
        # two pipelined requests, and a body far larger than the head limit in the same write
        body = b"x" * (10 * MAX_HEAD)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nPOST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: "
                  + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
        reply = read_all(s)
    assert reply.count(b"HTTP/1.1 200") == 2 and reply.endswith(str(len(body)).encode())


def dribble(s: socket.socket, first: bytes, stop_after_s: float) -> tuple[bytes, float]:
    """Send `first`, then one byte every 0.1 s until the server answers or closes; (reply, seconds
    from the first byte to the close)."""
    t0 = time.perf_counter()
    s.sendall(first)
    s.settimeout(0.1)
    reply = b""
    while time.perf_counter() - t0 < stop_after_s:
        try:
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
        except TimeoutError:
            try:
                s.sendall(b"a")
            except OSError:
                break
        except ConnectionResetError:
            break
    return reply, time.perf_counter() - t0


def run_all(jobs: list[tuple[socket.socket, bytes]], stop_after_s: float) -> list[tuple[bytes, float]]:
    out: list[tuple[bytes, float]] = [(b"", 0.0)] * len(jobs)

    def one(i: int) -> None:
        with jobs[i][0] as s:
            out[i] = dribble(s, jobs[i][1], stop_after_s)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_slowloris_heads_closed_at_header_deadline(port: int) -> None:
    jobs = [(connect(port), b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ") for _ in range(6)]
    for reply, seconds in run_all(jobs, HEADER_S + 10):
        assert status_of(reply) == 408, reply[:200]
        assert HEADER_S - 0.2 < seconds < HEADER_S + SLACK_S


def test_slow_bodies_closed_at_body_deadline(port: int) -> None:
    head = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
    jobs = [(connect(port), head) for _ in range(6)]
    for reply, seconds in run_all(jobs, BODY_S + 10):
        assert status_of(reply) == 408, reply[:200]
        assert BODY_S - 0.2 < seconds < BODY_S + SLACK_S


def test_connections_over_the_cap_refused_with_503(port: int) -> None:
    held = [connect(port) for _ in range(MAX_CONN)]
    try:
        time.sleep(0.1)  # let the server accept them all
        with connect(port) as extra:
            reply = read_all(extra)
        assert status_of(reply) == 503 and b"retry-after: 1" in reply.lower()
    finally:
        for s in held:
            s.close()
    time.sleep(0.1)  # the server sees them closed
    assert get(port, "/healthz")[0] == 200


def test_head_over_the_max_gets_431_and_does_not_stall_healthz(port: int) -> None:
    assert get(port, "/healthz", b"X-Pad: " + b"a" * (MAX_HEAD // 2) + b"\r\n")[0] == 200
    assert get(port, "/healthz", b"X-Pad: " + b"a" * (2 * MAX_HEAD) + b"\r\n")[0] == 431
    # 64 MiB of one header: refused after MAX_HEAD bytes; /healthz answers quickly meanwhile
    status: list[int] = []

    def huge() -> None:
        with connect(port) as s:
            try:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * (64 << 20) + b"\r\n\r\n")
            except OSError:
                pass  # closed by the server while sending: the 431 may still be readable
            status.append(status_of(read_all(s)))
    t = threading.Thread(target=huge)
    t.start()
    times = [get(port, "/healthz")[1] for _ in range(20)]
    t.join(timeout=30)
    assert not t.is_alive()
    assert status[0] in (431, 0)  # 0: the reset reached the client before the 431 did
    assert max(times) < 0.5, times
