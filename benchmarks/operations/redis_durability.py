"""Event durability with Redis `appendfsync everysec` (Compose's and Kubernetes' default) and
`always` (issue 23): acknowledged events lost when Redis is killed, and the events/s each allows.

    python benchmarks/operations/redis_durability.py --artifacts DIR [--rate 50] [--seconds 12]

Loopback only. One `recsys serve` (1 worker, Redis store) stays up; for each setting a fresh
append-only redis-server (on a real disk: --dir under the system temp folder) takes the same
port. Per setting:
  events/s   closed loop for 4 s, POST /v1/events: one event per request (16 in flight), then
             batches of 100 events (4 in flight);
  kill -9    --rate events/s open loop for --seconds s, each event a new user and event_id;
             Redis is killed (SIGKILL) at 40 % of the run and restarted (same folder) 2 s later.
             An event counts as acknowledged on a 202, as lost when Redis, once restarted, lacks it.
  Two crashes: "process" is a plain kill -9 (the kernel keeps what Redis wrote: its page cache
  survives); "host" runs Redis under unsynced_aof.c, which holds what Redis writes to its AOF
  in memory until Redis fsyncs it, so the kill -9 loses what a power loss or kernel crash would.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "serving"))  # load_test.py
sys.path.insert(0, str(HERE))
from faults import Redis  # noqa: E402
from load_test import Client, free_port, post, start_server  # noqa: E402


class FsyncRedis(Redis):
    """faults.Redis with an appendfsync setting and, optionally, the unsynced-AOF shim."""

    def __init__(self, folder: Path, port: int, fsync: str, shim: Path | None) -> None:
        super().__init__(folder)
        self.port, self.fsync, self.shim = port, fsync, shim

    def start(self) -> None:
        env = {**os.environ, **({"LD_PRELOAD": str(self.shim)} if self.shim else {})}
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
               "--appendfsync", self.fsync, "--dir", str(self.folder)]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
        self.wait_ping()

    def wait_ping(self) -> None:
        import socket
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not answer PING in 10 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()


def build_shim(out: Path) -> Path:
    so = out / "unsynced_aof.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(so), str(HERE / "unsynced_aof.c"), "-ldl"], check=True)
    return so


async def closed_loop(client: Client, make: Callable[[int], bytes], inflight: int, seconds: float) -> float:
    """Requests answered 202 per second."""
    ok = 0
    stop = time.perf_counter() + seconds

    async def worker(k: int) -> None:
        nonlocal ok
        i = k
        while time.perf_counter() < stop:
            status, _ = await client.send(make(i))
            ok += status == 202
            i += inflight
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(inflight)))
    return ok / (time.perf_counter() - t0)


async def throughput(port: int, tag: str) -> tuple[float, float]:
    host = f"127.0.0.1:{port}"
    client = Client("127.0.0.1", port)
    single = await closed_loop(client, lambda i: post(
        "/v1/events", {"user_id": f"tp-{tag}-{i}", "item_id": str(i % 50 + 1), "event_id": f"tp-{tag}-{i}"},
        host), 16, 4.0)
    batch = 100 * await closed_loop(client, lambda i: post(
        "/v1/events", [{"user_id": f"tb-{tag}-{i}-{j}", "item_id": str(j % 50 + 1), "event_id": f"tb-{tag}-{i}-{j}"}
                       for j in range(100)], host), 4, 4.0)  # type: ignore[arg-type]
    client.close()
    return single, batch


async def kill_run(port: int, redis: FsyncRedis, rate: float, seconds: float, tag: str
                   ) -> tuple[list[tuple[str, str]], Counter[int], list[float]]:
    host = f"127.0.0.1:{port}"
    client = Client("127.0.0.1", port)
    acked: list[tuple[str, str]] = []
    statuses: Counter[int] = Counter()
    lat: list[float] = []  # ms of the 202s before the kill
    start = time.perf_counter() + 0.05
    kill_at = 0.4 * seconds

    async def one(i: int, due: float) -> None:
        user, item = f"k-{tag}-{i}", str(i % 50 + 1)
        raw = post("/v1/events", {"user_id": user, "item_id": item, "event_id": f"k-{tag}-{i}"}, host)
        try:
            status, _ = await client.send(raw)
        except (OSError, RuntimeError, asyncio.IncompleteReadError, ValueError):
            status = 0
        statuses[status] += 1
        if status == 202:
            acked.append((user, item))
            if due - start < kill_at:
                lat.append((time.perf_counter() - due) * 1e3)

    async def traffic() -> None:
        tasks = []
        for i in range(int(rate * seconds)):
            due = start + i / rate
            if (delay := due - time.perf_counter()) > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.get_running_loop().create_task(one(i, due)))
        await asyncio.gather(*tasks)

    async def fault() -> None:
        await asyncio.sleep(max(0.0, start + kill_at - time.perf_counter()))
        redis.kill9()
        await asyncio.sleep(2.0)
        await asyncio.to_thread(redis.start)

    await asyncio.gather(traffic(), fault())
    client.close()
    return acked, statuses, lat


def lost_of(url: str, acked: list[tuple[str, str]]) -> int:
    import redis as redis_py

    raw = redis_py.Redis.from_url(url, decode_responses=True)
    pipe = raw.pipeline(transaction=False)
    for user, _ in acked:
        pipe.lrange(f"recsys:hist:{user}", 0, -1)
    lost = sum(item not in hist for (_, item), hist in zip(acked, pipe.execute(), strict=True))
    raw.close()
    return lost


async def run(args: argparse.Namespace) -> int:
    print("# python " + " ".join(shlex.quote(a) for a in sys.argv))
    print(f"# {os.cpu_count()} CPUs (shared); Redis {subprocess.run(['redis-server', '--version'], capture_output=True, text=True).stdout.split()[2]}; "
          f"AOF on {tempfile.gettempdir()} (a real disk, not tmpfs)")
    print(f"{'appendfsync':<11} {'crash':<8} {'ev/s 1/req':>10} {'ev/s 100/req':>12} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'sent':>5} {'acked':>6} {'lost':>5}  statuses")
    worst = 0
    with tempfile.TemporaryDirectory(prefix="recsys-durability-") as tmp:
        shim = build_shim(Path(tmp))
        port, redis_port = free_port(), free_port()
        first = FsyncRedis(Path(tmp) / "r0", redis_port, "everysec", None)
        first.folder.mkdir()
        first.start()
        server = start_server(Path(args.artifacts), port, 1, first.url)
        first.stop()
        try:
            for n, (fsync, crash) in enumerate([(f, c) for f in ("everysec", "always") for c in ("process", "host")]):
                redis = FsyncRedis(Path(tmp) / f"r{n + 1}", redis_port, fsync, shim if crash == "host" else None)
                redis.folder.mkdir()
                redis.start()
                await asyncio.sleep(1.5)  # past the store's cool-down after the previous Redis went away
                single, batch = await throughput(port, f"{n}") if crash == "process" else (float("nan"),) * 2
                acked, statuses, lat = await kill_run(port, redis, args.rate, args.seconds, f"{n}")
                lost = lost_of(redis.url, acked)
                worst = max(worst, lost if fsync == "always" else 0)
                redis.stop()
                p50, p99 = np.percentile(lat, [50, 99]) if lat else (float("nan"),) * 2
                print(f"{fsync:<11} {crash:<8} {single:>10.0f} {batch:>12.0f} {p50:>7.1f} {p99:>7.1f} "
                      f"{sum(statuses.values()):>5} {len(acked):>6} {lost:>5}  {dict(sorted(statuses.items()))}",
                      flush=True)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    return 1 if worst else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifacts", required=True, type=Path)
    ap.add_argument("--rate", type=float, default=50.0)
    ap.add_argument("--seconds", type=float, default=12.0)
    return asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
