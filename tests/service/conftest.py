"""Service test fixtures: real, throwaway redis-server processes on free loopback ports."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

REDIS_SERVER = shutil.which("redis-server")
START_TIMEOUT_S = 5.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """A redis-server child bound to 127.0.0.1, no persistence, in its own temp dir.

    ``stop()`` and ``start()`` keep the port, so tests can kill and restart the server.
    """

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start on the current port, or on a fresh free port the first time (3 tries: the
        port may be taken between probing and binding)."""
        fixed = self.port != 0
        for _ in range(1 if fixed else 3):
            if not fixed:
                self.port = free_port()
            if self._try_start():
                return
        raise RuntimeError(f"redis-server did not start; see {self.workdir / 'redis.log'}")

    def _try_start(self) -> bool:
        assert self.proc is None, "already running"
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--logfile", str(self.workdir / "redis.log"),
            "--daemonize", "no",
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.2)
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:  # exited: port taken or bad option
                    self.proc = None
                    return False
                try:
                    if client.ping():
                        return True
                except (redis.ConnectionError, redis.TimeoutError):
                    time.sleep(0.02)
        finally:
            client.close()
        self.stop()
        return False

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def _require_binary() -> str:
    if REDIS_SERVER is None:
        pytest.skip(
            "redis-server binary not found on PATH; install it (apt-get install redis-server)"
        )
    return REDIS_SERVER


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a redis-server shared by the whole session; tests isolate by key prefix."""
    binary = _require_binary()
    with tempfile.TemporaryDirectory(prefix="recsys-redis-") as tmp:
        server = RedisServer(binary, Path(tmp))
        server.start()
        try:
            yield server.url
        finally:
            server.stop()


@pytest.fixture()
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server for one test, which may stop and restart it."""
    binary = _require_binary()
    with tempfile.TemporaryDirectory(prefix="recsys-redis-") as tmp:
        server = RedisServer(binary, Path(tmp))
        server.start()
        try:
            yield server
        finally:
            server.stop()
