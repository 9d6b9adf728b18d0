"""Memory of the in-process history store with many distinct users (issue 15, finding 4).

    python benchmarks/operations/store_memory.py [--users 1000000] [--max-users 100000] [--history 5]
    python benchmarks/operations/store_memory.py --worst-case --users 2000 --history 200   (issue 23)

Appends `--history` events for each of `--users` distinct users (in batches of 1,000 events, as
POST /v1/events would) to an InMemoryStore(max_users=--max-users, max_bytes=--max-bytes) and
prints the process RSS and the store's byte count as it goes: with the LRU caps it levels off
once a cap is reached. --worst-case: every user, item and event id is 256 characters of
four-byte characters, each event has an event id, and each history is read back as UTF-8 once
(as a pydantic response would), so every id also caches its UTF-8 form.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from pydantic import TypeAdapter  # noqa: E402

from service.stores import DEFAULT_MAX_STORE_BYTES, MAX_ID_LEN, Event, InMemoryStore  # noqa: E402


def worst_id(kind: str, *n: int) -> str:
    tail = f"{kind}{'-'.join(map(str, n))}"
    return "\U0001f600" * (MAX_ID_LEN - len(tail)) + tail


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--max-users", type=int, default=100_000)
    ap.add_argument("--history", type=int, default=5)
    ap.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_STORE_BYTES)
    ap.add_argument("--worst-case", action="store_true")
    args = ap.parse_args()
    store = InMemoryStore(max_history=200, max_users=args.max_users, max_bytes=args.max_bytes)
    print(f"# python benchmarks/operations/store_memory.py --users {args.users} --max-users {args.max_users} "
          f"--history {args.history} --max-bytes {args.max_bytes}{' --worst-case' if args.worst_case else ''}")
    print(f"{'users sent':>12} {'held':>9} {'evicted':>9} {'store MiB':>10} {'RSS MiB':>9} {'s':>7}")

    def row(done: int) -> None:
        print(f"{done:>12,} {len(store):>9,} {store.evictions:>9,} {store.nbytes / 2**20:>10.1f} {rss_mib():>9.1f} "
              f"{time.monotonic() - t0:>7.1f}", flush=True)

    t0 = time.monotonic()
    row(0)
    as_json = TypeAdapter(list[str])
    per_batch = max(1, 1000 // args.history)
    report = max(per_batch, args.users // 10)
    for start in range(0, args.users, per_batch):
        users = range(start, min(start + per_batch, args.users))
        if args.worst_case:
            store.append_events([Event(worst_id("u", u), worst_id("i", u, j), float(j), event_id=worst_id("e", u, j))
                                 for u in users for j in range(args.history)])
            for u in users:
                as_json.dump_json(store.get_history(worst_id("u", u)))
        else:
            store.append_events([Event(f"user-{u:08d}", f"item-{(u * 7 + j) % 5000}", float(j), event_id=f"e{u}-{j}")
                                 for u in users for j in range(args.history)])
        done = users.stop
        if done % report < per_batch or done == args.users:
            row(done)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.1f} MiB; users held {len(store):,} <= cap {args.max_users:,}; store "
          f"{store.nbytes / 2**20:.1f} MiB <= cap {args.max_bytes / 2**20:.1f} MiB")
    return 0 if len(store) <= args.max_users and store.nbytes <= args.max_bytes else 1


if __name__ == "__main__":
    sys.exit(main())
