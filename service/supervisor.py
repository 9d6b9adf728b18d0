"""`recsys serve --workers N` on Linux: N uvicorn processes, each with its own listening socket.

Why not uvicorn's own `--workers`: its workers share one listening socket, and the worker that
wakes first accepts every connection waiting. A client that opens its keep-alive pool in one
burst (the load benchmark's 32 connections, an API gateway's pool) then sends most of its
traffic to one worker while the other core idles: measured at 150 rps on 2 workers, one
worker's threads used 4.3 ms of CPU per request of the whole run and the other 0.8 ms, and
the peak rate moved with whichever worker won the burst. Here every worker listens on its own
socket of one SO_REUSEPORT group, and the kernel spreads new connections over the group by
their address hash, so a pool of connections is split evenly whatever its timing.

The parent binds the N sockets and keeps them: a worker that dies is replaced on the same
socket, so connections hashed to it wait in its backlog instead of being refused. A worker that
exits before it starts serving (a bad version, a broken app) stops the whole server, as
uvicorn does. SIGINT / SIGTERM stop the workers gracefully (uvicorn's shutdown; killed after
`GRACE_S`).
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import socket
import threading
from multiprocessing.context import SpawnProcess
from typing import Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE

logger = logging.getLogger("uvicorn.error")

GRACE_S = 30.0  # how long a stopping worker may take to finish its requests
CHECK_S = 0.5  # how often dead workers are looked for
_spawn = multiprocessing.get_context("spawn")


def reuse_port_supported() -> bool:
    return hasattr(socket, "SO_REUSEPORT")


def bind_group(host: str, port: int, count: int) -> list[socket.socket]:
    """`count` listening TCP sockets on host:port in one SO_REUSEPORT group (port 0: one free
    port, chosen by the first bind)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]
            sock.listen(2048)
            sock.set_inheritable(True)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


def _serve(config_kwargs: dict[str, Any], sock: socket.socket) -> None:
    """In a worker process: one uvicorn server on `sock`."""
    uvicorn.Server(uvicorn.Config(**config_kwargs)).run(sockets=[sock])  # Config() sets up logging


class Supervisor:
    """Runs len(sockets) workers, one per socket, until SIGINT / SIGTERM."""

    def __init__(self, config_kwargs: dict[str, Any], sockets: list[socket.socket]) -> None:
        if not sockets:
            raise ValueError("the supervisor needs at least one socket")
        self.config_kwargs = {**config_kwargs, "workers": 1}
        self.sockets = sockets
        self.workers: list[SpawnProcess] = []
        self.should_exit = threading.Event()

    def _start(self, sock: socket.socket) -> SpawnProcess:
        proc = _spawn.Process(target=_serve, args=(self.config_kwargs, sock), daemon=False)
        proc.start()
        return proc

    def run(self) -> int:
        """Serve until told to stop; 0, or 3 when a worker failed to start."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.should_exit.set())
        self.workers = [self._start(sock) for sock in self.sockets]
        code = 0
        while not self.should_exit.wait(CHECK_S):
            for i, proc in enumerate(self.workers):
                if proc.is_alive():
                    continue
                proc.join()
                if proc.exitcode == STARTUP_FAILURE:
                    logger.error("worker %s failed to start; stopping", proc.pid)
                    self.should_exit.set()
                    code = STARTUP_FAILURE
                    break
                logger.warning("worker %s exited with %s; starting a new one on its socket", proc.pid, proc.exitcode)
                self.workers[i] = self._start(self.sockets[i])
        self.stop()
        return code

    def stop(self) -> None:
        for proc in self.workers:
            if proc.is_alive():
                proc.terminate()  # SIGTERM: uvicorn finishes its requests, runs the lifespan shutdown
        for proc in self.workers:
            proc.join(GRACE_S)
            if proc.is_alive():
                logger.warning("worker %s did not stop in %.0f s; killing it", proc.pid, GRACE_S)
                proc.kill()
                proc.join()
        for sock in self.sockets:
            sock.close()
