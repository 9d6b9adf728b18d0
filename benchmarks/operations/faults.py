"""Faults under load (issue 15): Redis killed and restarted, Redis frozen, a corrupt version then
a good one published, all while traffic runs at a fraction of the measured peak.

    python benchmarks/operations/faults.py --artifacts DIR [--fraction 0.8] [--workers 1] [--poll 2]

Loopback only, bounded: about 45 s of traffic. Starts an append-only redis-server and `recsys
serve` (Redis store, CURRENT polled every --poll s) over a scratch copy of DIR's live version,
seeds stored histories, measures the peak rate (closed loop, 8 in flight, 4 s), then sends
--fraction of it open loop: 90 % POST /v1/recommend by user_id (a stored-history read), 10 %
POST /v1/events with a fresh user and event_id each. Timeline (s): 0-6 baseline; 6 kill -9
Redis, 8 restart it (same port, same AOF); 14 SIGSTOP Redis, 19 SIGCONT; 25 publish a version
with a truncated catalog.npz and flip CURRENT, 31 publish a good one. Reports per window the
recommend count, 5xx and p50 / p99 latency, event outcomes (202 / 503 / 504), acknowledged (202)
events missing from Redis at the end, and how long after the flip the good version answered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))  # load_test.py
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from load_test import Client, free_port, histories_of, post, seed, start_server  # noqa: E402
from service.contract.layout import CATALOG, CURRENT, MANIFEST  # noqa: E402

WINDOWS = [("baseline", 0, 6), ("redis killed (6-8 s) + restart", 6, 14), ("redis frozen 5 s (14-19 s)", 14, 25),
           ("corrupt then good version (25-31 s)", 25, 36), ("after", 36, 42)]
DURATION = 42.0


class Redis:
    """redis-server with an append-only file, restartable on the same port and folder."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "yes", "--dir", str(self.folder)], stdout=subprocess.DEVNULL)
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

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)


async def peak_rate(client: Client, bodies: list[bytes], seconds: float = 4.0, inflight: int = 8) -> float:
    done = 0
    stop = time.perf_counter() + seconds

    async def worker(k: int) -> None:
        nonlocal done
        i = k
        while time.perf_counter() < stop:
            status, _ = await client.send(bodies[i % len(bodies)])
            i += inflight
            done += status == 200
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(inflight)))
    return done / (time.perf_counter() - t0)


def copy_version(root: Path, src: Path, name: str) -> None:
    shutil.copytree(src, root / name)
    m = json.loads((root / name / MANIFEST).read_text())
    m["version"] = name
    (root / name / MANIFEST).write_text(json.dumps(m))


def set_current(root: Path, name: str) -> None:
    tmp = root / ".CURRENT.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / CURRENT)


async def run(args: argparse.Namespace) -> int:
    from service.artifacts import current_version

    src = Path(args.artifacts)
    live = current_version(src)
    with tempfile.TemporaryDirectory(prefix="recsys-faults-") as tmp:
        root = Path(tmp) / "artifacts"
        root.mkdir()
        copy_version(root, src / live, "v1")
        set_current(root, "v1")
        redis = Redis(Path(tmp))
        redis.start()
        port = free_port()
        server = start_server(root, port, args.workers, redis.url, poll_s=args.poll)
        host = f"127.0.0.1:{port}"
        client = Client("127.0.0.1", port)
        try:
            histories = histories_of(src, 200)
            await seed(client, histories, host)
            users = list(histories)
            recs = [post("/v1/recommend", {"user_id": u, "k": 10}, host) for u in users]
            peak = await peak_rate(client, recs)
            rate = args.fraction * peak
            print(f"# python benchmarks/operations/faults.py --artifacts {args.artifacts} --fraction {args.fraction} "
                  f"--workers {args.workers} --poll {args.poll}")
            print(f"peak {peak:.0f} rps (closed loop, 8 in flight); running at {rate:.0f} rps "
                  f"({args.fraction:.0%}), 90 % recommend / 10 % events")
            log: list[tuple[float, str, int, float]] = []  # (t since start, kind, status, ms)
            acked: list[tuple[str, str]] = []  # (user, item) of 202 events
            start = time.perf_counter() + 0.05
            version_at: dict[str, float] = {}

            async def one(i: int, due: float) -> None:
                is_event = i % 10 == 9
                if is_event:
                    user, item = f"fault-{i}", f"{i % 50 + 1}"
                    raw = post("/v1/events", {"user_id": user, "item_id": item, "event_id": f"ev-{i}"}, host)
                else:
                    raw = recs[i % len(recs)]
                try:
                    status, _ = await client.send(raw)
                except (OSError, RuntimeError, asyncio.IncompleteReadError, ValueError):
                    status = 0
                log.append((due - start, "event" if is_event else "recommend", status,
                            (time.perf_counter() - due) * 1e3))
                if is_event and status == 202:
                    acked.append((user, item))

            async def traffic() -> None:
                n = int(rate * DURATION)
                tasks = []
                for i in range(n):
                    due = start + i / rate
                    delay = due - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    tasks.append(asyncio.get_running_loop().create_task(one(i, due)))
                await asyncio.gather(*tasks)

            async def at(t: float) -> None:
                await asyncio.sleep(max(0.0, start + t - time.perf_counter()))

            async def watch_version() -> None:
                probe = Client("127.0.0.1", port)
                get = f"GET /v1/version HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
                while time.perf_counter() < start + DURATION:
                    try:
                        status, body = await probe.send(get)
                        if status == 200:
                            version_at.setdefault(json.loads(body)["model_version"], time.perf_counter() - start)
                    except (OSError, asyncio.IncompleteReadError, ValueError):
                        pass
                    await asyncio.sleep(0.05)
                probe.close()

            async def faults() -> dict[str, float]:
                marks: dict[str, float] = {}
                await at(6)
                redis.kill9()
                await at(8)
                await asyncio.to_thread(redis.start)
                await at(14)
                redis.signal(signal.SIGSTOP)
                await at(19)
                redis.signal(signal.SIGCONT)
                copy_version(root, root / "v1", "bad")
                data = (root / "bad" / CATALOG).read_bytes()
                (root / "bad" / CATALOG).write_bytes(data[: len(data) // 2])
                copy_version(root, root / "v1", "good")  # written before the clock, as a publish writes its folder
                await at(25)
                set_current(root, "bad")
                await at(31)
                set_current(root, "good")
                marks["good_flip"] = time.perf_counter() - start
                return marks

            results = await asyncio.gather(traffic(), faults(), watch_version())
            marks = results[1]
        finally:
            client.close()
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)

        import redis as redis_py

        raw = redis_py.Redis.from_url(redis.url, decode_responses=True)
        lost = sum(item not in raw.lrange(f"recsys:hist:{user}", 0, -1) for user, item in acked)
        raw.close()
        redis.proc.terminate()  # type: ignore[union-attr]

    print(f"\n{'window':38s} {'recommend':>9s} {'5xx':>4s} {'p50 ms':>8s} {'p99 ms':>8s}   events 202/503/504/other")
    for name, lo, hi in WINDOWS:
        rec = [(s, ms) for t, k, s, ms in log if k == "recommend" and lo <= t < hi]
        ev = Counter(s for t, k, s, _ in log if k == "event" and lo <= t < hi)
        lat = np.array([ms for s, ms in rec if s == 200])
        p50, p99 = (np.percentile(lat, [50, 99]) if lat.size else (float("nan"),) * 2)
        other = sum(v for s, v in ev.items() if s not in (202, 503, 504))
        print(f"{name:38s} {len(rec):>9d} {sum(s >= 500 or s == 0 for s, _ in rec):>4d} {p50:>8.1f} {p99:>8.1f}   "
              f"{ev[202]}/{ev[503]}/{ev[504]}/{other}")
    statuses = Counter(s for _, k, s, _ in log if k == "recommend")
    print(f"\nrecommend statuses: {dict(statuses)}")
    print(f"acknowledged events: {len(acked)}, missing from Redis afterwards: {lost}")
    good = version_at.get("good")
    flip = marks.get("good_flip")
    served = "never" if good is None or flip is None else f"{good - flip:.2f} s after the flip (poll {args.poll} s)"
    print(f"versions seen: {sorted(version_at, key=version_at.get)}; 'bad' served: {'bad' in version_at}; "
          f"good version answered {served}")
    return 0 if lost == 0 and not any(s >= 500 or s == 0 for s in statuses) and "bad" not in version_at else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifacts", required=True, type=Path)
    ap.add_argument("--fraction", type=float, default=0.8)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--poll", type=float, default=2.0)
    return asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
