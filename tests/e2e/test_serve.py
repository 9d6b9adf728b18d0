"""End to end: `recsys serve` as a real process over published artifacts, with a real Redis."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from service.notify import notify_version
from service.supervisor import GRACE_S
from tests.service.conftest import free_port
from tests.service.test_api import artifacts_root, catalog  # noqa: F401  (module fixtures)


def wait_ready(proc: subprocess.Popen[bytes], base: str, timeout_s: float, log: Path | None = None) -> None:
    """Until GET /readyz answers 200; fails with the end of the server's output (`log`, else its
    stdout pipe) if it exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"recsys serve exited with {proc.returncode}; the end of its output:\n{output_tail(proc, log)}")
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail(f"recsys serve did not become ready in {timeout_s} s")


def output_tail(proc: subprocess.Popen[bytes], log: Path | None, chars: int = 3000) -> str:
    """The last `chars` of a stopped server's output: the file `log`, else its stdout pipe ('' for neither)."""
    out = log.read_bytes() if log is not None else proc.stdout.read() if proc.stdout else b""
    return out.decode(errors="replace")[-chars:]


def stop_server(proc: subprocess.Popen[bytes], log: Path | None = None) -> None:
    """SIGTERM, then as long as the product gives a stopping worker (supervisor.GRACE_S). One still
    running then is killed, and the test fails with the end of its output (`log`, else its stdout
    pipe), which names what the shutdown was waiting for."""
    proc.terminate()
    try:
        proc.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"recsys serve did not stop within {GRACE_S:.0f} s of SIGTERM; the end of its output:\n"
                    f"{output_tail(proc, log)}")


@contextmanager
def two_workers_on_redis(root: Path, redis_url: str, live_version: str, env: Mapping[str, str]) -> Iterator[str]:
    """`recsys serve` over root with 2 workers on redis_url and os.environ updated by env; yields
    its base URL once it is ready and both workers are subscribed to the version channel (each
    counts as one receiver of a notice of live_version); stops its process group after."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "recsys_cli", "serve", "--artifacts", str(root), "--redis-url", redis_url,
         "--port", str(port), "--workers", "2", "--log-level", "warning"],
        env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, base, 90)
        deadline = time.monotonic() + 30
        while notify_version(redis_url, live_version) < 2:
            assert time.monotonic() < deadline, "workers never subscribed to the version channel"
            time.sleep(0.1)
        yield base
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=15)


@pytest.fixture()
def server(artifacts_root: Path, redis_url: str) -> Iterator[str]:  # noqa: F811
    port = free_port()
    env = {**os.environ, "RECSYS_API_KEY": "", "RECSYS_ALLOW_ANONYMOUS_WRITES": "1"}  # writes open on loopback
    proc = subprocess.Popen(
        [sys.executable, "-m", "recsys_cli", "serve", "--artifacts", str(artifacts_root),
         "--redis-url", redis_url, "--port", str(port), "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, base, 60)
        yield base
    finally:
        stop_server(proc)


def test_served_process_events_change_next_recommendation(server: str, catalog: list[str]) -> None:  # noqa: F811
    user = f"e2e-{time.time_ns()}"
    first = httpx.post(f"{server}/v1/recommend", json={"user_id": user, "history": catalog[:3], "k": 5}).json()
    assert len(first["items"]) == 5
    top = first["items"][0]["item_id"]
    r = httpx.post(f"{server}/v1/events", json=[{"user_id": user, "item_id": i} for i in [*catalog[:3], top]])
    assert r.status_code in (200, 202), r.text
    hist = httpx.get(f"{server}/v1/users/{user}/history").json()
    assert top in str(hist)
    second = httpx.post(f"{server}/v1/recommend", json={"user_id": user, "k": 5}).json()
    # the item the user just interacted with is now seen, so it is not recommended again
    assert top not in [it["item_id"] for it in second["items"]]
    assert second["model_version"] == "v1"


def test_serve_bad_artifacts_is_one_line_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "recsys_cli", "serve", "--artifacts", str(tmp_path / "none"), "--port", "1"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "recsys serve: error:" in proc.stderr


def test_serve_several_workers_need_redis(artifacts_root: Path) -> None:  # noqa: F811
    env = {k: v for k, v in os.environ.items() if k != "RECSYS_REDIS_URL"}
    proc = subprocess.run(
        # a free port: the port check comes first, and `make demo` may be serving on the default 8000
        [sys.executable, "-m", "recsys_cli", "serve", "--artifacts", str(artifacts_root), "--workers", "2",
         "--port", str(free_port())],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert proc.returncode == 2 and "--workers > 1 needs --redis-url" in proc.stderr


def worker_pids(parent: int) -> set[int]:
    """The worker processes of `recsys serve` (the spawn start method also runs a resource tracker)."""
    out = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split()
    return {int(p) for p in out if b"resource_tracker" not in Path(f"/proc/{p}/cmdline").read_bytes()}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT workers are Linux only")
def test_serve_workers_have_their_own_sockets_and_a_dead_one_is_replaced(artifacts_root: Path,  # noqa: F811
                                                                        redis_url: str) -> None:
    port = free_port()
    env = {**os.environ, "RECSYS_API_KEY": ""}
    proc = subprocess.Popen(
        [sys.executable, "-m", "recsys_cli", "serve", "--artifacts", str(artifacts_root), "--redis-url", redis_url,
         "--port", str(port), "--workers", "2", "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, base, 90)
        workers = worker_pids(proc.pid)
        assert len(workers) == 2, workers
        os.kill(min(workers), 9)
        deadline = time.monotonic() + 60
        while True:  # a replacement is started on the dead worker's socket and serves
            now = worker_pids(proc.pid)
            if len(now) == 2 and min(workers) not in now:
                break
            assert time.monotonic() < deadline, f"no replacement worker: {now}"
            time.sleep(0.2)
        for _ in range(20):  # new connections, hashed over both sockets: all answered
            assert httpx.get(f"{base}/readyz", timeout=30).status_code == 200
    finally:
        stop_server(proc)
    assert proc.returncode == 0
    assert not worker_pids(proc.pid)


def test_serve_applies_the_connection_limits_in_every_worker(artifacts_root: Path, redis_url: str) -> None:  # noqa: F811
    """RECSYS_MAX_HEADER_BYTES and RECSYS_KEEP_ALIVE_S reach the spawned workers (main: a head of
    any size answered 200, an idle connection held for ever)."""
    port = free_port()
    # keep-alive 2 s, not 1: a worker starved for over a second between accepting a connection and reading
    # it may run the idle timer first (libuv runs due timers before polling I/O) and close it unanswered,
    # the likely cause of this test's one failure in CI (five jobs on two cores); 2 + 2 s stays below the
    # 5 s default, so the idle check still shows the setting reached the workers
    env = {**os.environ, "RECSYS_API_KEY": "", "RECSYS_MAX_HEADER_BYTES": "2048", "RECSYS_KEEP_ALIVE_S": "2"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "recsys_cli", "serve", "--artifacts", str(artifacts_root), "--redis-url", redis_url,
         "--port", str(port), "--workers", "2", "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, base, 90)
        for _ in range(8):  # new connections, hashed over both workers' sockets
            assert httpx.get(f"{base}/healthz", headers={"X-Pad": "a" * 1000}).status_code == 200
            assert httpx.get(f"{base}/healthz", headers={"X-Pad": "a" * 4000}).status_code == 431
        # counted per worker: some /metrics answer (new connections, hashed anew) shows them
        assert any('recsys_connections_closed_total{reason="header_too_large"}' in httpx.get(f"{base}/metrics").text
                   for _ in range(12))
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(8)]
        t0 = time.monotonic()
        for s in idle:
            with s:
                assert s.recv(1) == b""  # closed by the server
        assert time.monotonic() - t0 < 2 + 2.0
    finally:
        stop_server(proc)
