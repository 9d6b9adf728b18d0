"""Connection limits (issue 23): idle, slowloris, slow-body, big-header and over-the-cap runs
against a live server, before (main's settings: uvicorn's own httptools protocol, timeout_keep_alive
5 s, nothing else) and after (`recsys serve` with the RECSYS_* connection limits).

    python benchmarks/operations/connection_limits.py --artifacts DIR [--idle 200] [--slow 50]
        [--big 4] [--big-mib 64] [--over 50] [--only before|after]

Loopback only, bounded counts, one worker, the in-process store. Each scenario runs while a probe
sends GET /healthz on a fresh connection every 50 ms (for 5 s at least); a scenario is watched for its limit + 5 s
(the limit: keep-alive for idle, the head deadline for slowloris, the body deadline for slow
bodies), and a connection counts as "closed in time" when the server closed it within limit + 1 s
of its start (after: the limits the server was started with; before: the same yardsticks).
Scenarios:
  idle       --idle connections that never send a byte
  slowloris  --slow connections sending a request head one byte a second, never finishing it
  slow body  --slow POST /v1/events with Content-Length 10000, the body one byte a second
  big header --big requests one after another, each with one header of --big-mib MiB
  over cap   max_connections + --over idle connections opened at once (after: the ones over the
             cap answered 503 at once; before: all held)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from service.connection_limits import ConnectionLimits  # noqa: E402
from service.core.config import Settings  # noqa: E402

HOST = "127.0.0.1"
MIN_PROBE_S = 5.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def start(artifacts: Path, port: int, before: bool, env_extra: dict[str, str]) -> subprocess.Popen[bytes]:
    """main's `recsys serve` is uvicorn.run(app, host, port, log_level) over httptools; after is
    today's `recsys serve`."""
    env = {**os.environ, "RECSYS_ARTIFACTS": str(artifacts), "RECSYS_RELOAD_POLL_S": "0", **env_extra}
    if before:
        code = (f"import uvicorn; uvicorn.run('service.main:app', host={HOST!r}, port={port}, "
                f"log_level='error', http='httptools')")
        cmd = [sys.executable, "-c", code]
    else:
        cmd = [sys.executable, "-m", "recsys_cli", "serve", "--artifacts", str(artifacts), "--host", HOST,
               "--port", str(port), "--log-level", "error"]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=1) as s:
                s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if b" 200 " in s.recv(1024):
                    return proc
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        time.sleep(0.2)
    raise RuntimeError("server not ready after 120 s")


@dataclass
class Outcome:
    opened: int = 0
    closed_at: list[float] = field(default_factory=list)  # seconds from a connection's start
    statuses: Counter[str] = field(default_factory=Counter)


def status_of(reply: bytes) -> str:
    return reply.split(b" ", 2)[1].decode() if reply.startswith(b"HTTP/1.") else "not HTTP"


async def watch(reader: asyncio.StreamReader, t0: float, window: float, out: Outcome,
                feed: Callable[[], Awaitable[None]] | None = None) -> None:
    """Read until the server closes (recorded) or the window ends; `feed` is awaited once a second."""
    reply = b""
    end = t0 + window
    while (left := end - time.perf_counter()) > 0:
        try:
            chunk = await asyncio.wait_for(reader.read(65536), min(left, 1.0))
        except TimeoutError:
            if feed is not None:
                try:
                    await feed()
                except OSError:
                    pass
            continue
        except OSError:
            out.closed_at.append(time.perf_counter() - t0)
            out.statuses[status_of(reply) if reply else "reset"] += 1
            return
        if not chunk:
            out.closed_at.append(time.perf_counter() - t0)
            out.statuses[status_of(reply) if reply else "closed"] += 1
            return
        reply += chunk
    out.statuses[(status_of(reply) + " then held") if reply else "held"] += 1


async def idle(port: int, n: int, window: float) -> Outcome:
    out = Outcome()

    async def one() -> None:
        t0 = time.perf_counter()
        reader, writer = await asyncio.open_connection(HOST, port)
        out.opened += 1
        await watch(reader, t0, window, out)
        writer.close()
    await asyncio.gather(*(one() for _ in range(n)))
    return out


async def dribble(port: int, n: int, window: float, first: bytes) -> Outcome:
    out = Outcome()

    async def one() -> None:
        t0 = time.perf_counter()
        reader, writer = await asyncio.open_connection(HOST, port)
        out.opened += 1
        writer.write(first)

        async def feed() -> None:
            writer.write(b"a")
            await writer.drain()
        await watch(reader, t0, window, out, feed)
        writer.close()
    await asyncio.gather(*(one() for _ in range(n)))
    return out


async def big_header(port: int, n: int, mib: int, window: float) -> Outcome:
    out = Outcome()
    pad = b"a" * (1 << 20)
    for _ in range(n):
        t0 = time.perf_counter()
        reader, writer = await asyncio.open_connection(HOST, port)
        out.opened += 1

        async def send() -> None:
            try:
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: ")
                for _ in range(mib):
                    writer.write(pad)
                    await writer.drain()
                writer.write(b"\r\n\r\n")
                await writer.drain()
            except OSError:
                pass
        sender = asyncio.create_task(send())
        await watch(reader, t0, window, out)
        sender.cancel()
        writer.close()
    return out


async def over_cap(port: int, n: int, window: float) -> Outcome:
    out = Outcome()

    async def one() -> None:
        t0 = time.perf_counter()
        try:
            reader, writer = await asyncio.open_connection(HOST, port)
        except OSError:
            out.statuses["refused"] += 1
            return
        out.opened += 1
        await watch(reader, t0, window, out)
        writer.close()
    await asyncio.gather(*(one() for _ in range(n)))
    return out


async def probe(stop: asyncio.Event, times: list[float], failures: Counter[str]) -> None:
    """GET /healthz on a fresh connection every 50 ms; latency, or why it failed."""
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port_of_probe[0]), 5)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            reply = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            status = status_of(reply)
            if status == "200":
                times.append(time.perf_counter() - t0)
            else:
                failures[status] += 1
        except (OSError, TimeoutError) as exc:
            failures[type(exc).__name__] += 1
        await asyncio.sleep(max(0.0, 0.05 - (time.perf_counter() - t0)))


port_of_probe = [0]


async def scenario(port: int, run: Awaitable[Outcome]) -> tuple[Outcome, list[float], Counter[str]]:
    port_of_probe[0] = port
    stop = asyncio.Event()
    times: list[float] = []
    failures: Counter[str] = Counter()
    task = asyncio.create_task(probe(stop, times, failures))
    t0 = time.perf_counter()
    out = await run
    await asyncio.sleep(max(0.0, MIN_PROBE_S - (time.perf_counter() - t0)))  # enough probes for a p99
    stop.set()
    await task
    return out, times, failures


def row(label: str, name: str, limit_s: float, out: Outcome, times: list[float], failures: Counter[str]) -> str:
    in_time = sum(1 for t in out.closed_at if t <= limit_s + 1.0)
    p = (lambda q: f"{1000 * float(np.percentile(times, q)):.1f}") if times else (lambda q: "-")
    fails = sum(failures.values())
    seen = ", ".join(f"{k} {v}" for k, v in out.statuses.most_common())
    return (f"{label:<7} {name:<11} {out.opened:>5} {limit_s:>7.1f} {in_time:>9} {len(out.closed_at):>7} "
            f"{p(50):>7} {p(99):>7} {fails:>6}  {seen}")


async def run_config(label: str, port: int, limits: ConnectionLimits, args: argparse.Namespace) -> list[str]:
    rows = []
    lim = limits.keep_alive_s
    out = await scenario(port, idle(port, args.idle, lim + 5))
    rows.append(row(label, "idle", lim, *out))
    lim = limits.header_timeout_s
    out = await scenario(port, dribble(port, args.slow, lim + 5, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "))
    rows.append(row(label, "slowloris", lim, *out))
    lim = limits.body_timeout_s  # the head is sent at once
    head = b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10000\r\n\r\n"
    out = await scenario(port, dribble(port, args.slow, lim + 5, head))
    rows.append(row(label, "slow body", lim, *out))
    out = await scenario(port, big_header(port, args.big, args.big_mib, 10.0))
    rows.append(row(label, "big header", 1.0, *out))
    lim = limits.keep_alive_s
    out = await scenario(port, over_cap(port, limits.max_connections + args.over, lim + 5))
    rows.append(row(label, "over cap", lim, *out))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", type=Path, required=True)
    p.add_argument("--idle", type=int, default=200)
    p.add_argument("--slow", type=int, default=50)
    p.add_argument("--big", type=int, default=4)
    p.add_argument("--big-mib", type=int, default=64)
    p.add_argument("--over", type=int, default=50)
    p.add_argument("--only", choices=("before", "after"))
    args = p.parse_args()
    limits = ConnectionLimits.from_settings(Settings())
    print("# python " + " ".join(shlex.quote(a) for a in sys.argv))
    print(f"# limits (after; also the yardsticks of before): {limits}")
    print("# closed in time: closed by the server within limit + 1 s of the connection's start; healthz: GET "
          "/healthz on a fresh connection every 50 ms during the scenario (ms), fails = non-200 or no answer in 5 s")
    print(f"{'config':<7} {'scenario':<11} {'conns':>5} {'limit s':>7} {'in time':>9} {'closed':>7} "
          f"{'hz p50':>7} {'hz p99':>7} {'fails':>6}  what the connections saw")
    for label in ("before", "after"):
        if args.only not in (None, label):
            continue
        port = free_port()
        proc = start(args.artifacts, port, label == "before", {})
        try:
            for line in asyncio.run(run_config(label, port, limits, args)):
                print(line, flush=True)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
