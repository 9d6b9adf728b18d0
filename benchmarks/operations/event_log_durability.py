"""Nothing lost (issue 25): acknowledged events under a Redis kill -9 and restart at --rate events/s
are all in the durable event log (the events stream) and in the histories, and the two agree.

    python benchmarks/operations/event_log_durability.py --artifacts DIR [--rate 50] [--seconds 12] [--out FILE]

One `recsys serve` (1 worker, Redis store, events stream on); a redis-server with an append-only
file (appendfsync everysec, the deployed default; faults.Redis). Open loop: --rate POST /v1/events
per second, each one event of a new user with its own event_id; Redis is killed (SIGKILL) at 40 %
of the run and restarted on the same folder 2 s later. An event is acknowledged on a 202. After
the run, for every user: the stream's events (read back with the `log:` source's reader) and the
history (LRANGE) must hold the same items, and every acknowledged event must be in both.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import redis

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent / "serving"))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
from faults import Redis  # noqa: E402
from load_test import free_port, start_server  # noqa: E402

from service.online_log import read_events  # noqa: E402


async def traffic(base: str, rate: float, seconds: float, rs: Redis) -> tuple[dict[int, int], float]:
    status: dict[int, int] = {}
    start = time.monotonic()
    n = int(rate * seconds)
    async with httpx.AsyncClient(base_url=base, timeout=5.0) as http:
        async def one(i: int) -> None:
            await asyncio.sleep(max(start + i / rate - time.monotonic(), 0.0))
            try:
                r = await http.post("/v1/events", json={"user_id": f"d{i}", "item_id": f"it{i % 50}",
                                                        "event_id": f"e{i}", "type": "click"})
                status[i] = r.status_code
            except httpx.HTTPError:
                status[i] = 0

        async def fault() -> float:
            await asyncio.sleep(0.4 * seconds)
            rs.kill9()
            t = time.monotonic() - start
            await asyncio.sleep(2.0)
            await asyncio.to_thread(rs.start)
            return t

        results = await asyncio.gather(fault(), *(one(i) for i in range(n)))
    return status, float(results[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, required=True)
    ap.add_argument("--rate", type=float, default=50.0)
    ap.add_argument("--seconds", type=float, default=12.0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="event-log-durability-") as tmp:
        rs = Redis(Path(tmp))
        rs.start()
        port = free_port()
        server = start_server(args.artifacts, port, 1, rs.url)
        try:
            status, killed_at = asyncio.run(traffic(f"http://127.0.0.1:{port}", args.rate, args.seconds, rs))
            client = redis.Redis.from_url(rs.url, decode_responses=True)
            logged: dict[str, list[str]] = {}
            for ev in read_events(rs.url):
                logged.setdefault(ev.user_id, []).append(ev.item_id)
            users = [f"d{i}" for i in status]
            pipe = client.pipeline(transaction=False)
            for u in users:
                pipe.lrange(f"recsys:hist:{u}", 0, -1)
            hist = dict(zip(users, pipe.execute(), strict=True))
            client.close()
        finally:
            server.terminate()
            server.wait()
            rs.kill9()
    acked = [i for i, s in status.items() if s == 202]
    lost_log = [i for i in acked if logged.get(f"d{i}") != [f"it{i % 50}"]]
    lost_hist = [i for i in acked if hist[f"d{i}"] != [f"it{i % 50}"]]
    disagree = [u for u in users if logged.get(u, []) != hist[u]]
    unacked_but_stored = sum(1 for i, s in status.items() if s != 202 and hist[f"d{i}"])
    lines = [f"# {shlex.join([Path(sys.executable).name, *sys.argv])}",
             f"# redis appendonly yes, appendfsync everysec; kill -9 at {killed_at:.1f} s, restart 2 s later",
             f"sent {len(status)} events at {args.rate:g}/s over {args.seconds:g} s; answers: "
             + ", ".join(f"{k}: {v}" for k, v in sorted(Counter(status.values()).items())),
             f"acknowledged (202): {len(acked)}",
             f"acknowledged but missing from the events stream: {len(lost_log)}",
             f"acknowledged but missing from the histories: {len(lost_hist)}",
             f"users whose stream events and history differ: {len(disagree)}",
             f"not acknowledged but stored (in both, as retries are safe): {unacked_but_stored}"]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 1 if lost_log or lost_hist or disagree else 0


if __name__ == "__main__":
    raise SystemExit(main())
