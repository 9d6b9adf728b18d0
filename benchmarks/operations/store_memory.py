"""Memory of the in-process history store with many distinct users (issue 15, finding 4).

    python benchmarks/operations/store_memory.py [--users 1000000] [--max-users 100000] [--history 5]

Appends `--history` events for each of `--users` distinct users (in batches of 1,000, as
POST /v1/events would) to an InMemoryStore(max_users=--max-users) and prints the process RSS
every 100k users: with the LRU cap it levels off once the cap is reached.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from service.stores import Event, InMemoryStore  # noqa: E402


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
    args = ap.parse_args()
    store = InMemoryStore(max_history=200, max_users=args.max_users)
    print(f"# python benchmarks/operations/store_memory.py --users {args.users} --max-users {args.max_users} "
          f"--history {args.history}")
    print(f"{'users sent':>12} {'held':>9} {'evicted':>9} {'RSS MiB':>9} {'s':>7}")
    print(f"{0:>12,} {len(store):>9,} {store.evictions:>9,} {rss_mib():>9.1f} {0.0:>7.1f}")
    t0, batch = time.monotonic(), 1000
    for start in range(0, args.users, batch):
        store.append_events([Event(f"user-{u:08d}", f"item-{(u * 7 + j) % 5000}", float(j), event_id=f"e{u}-{j}")
                             for u in range(start, min(start + batch, args.users)) for j in range(args.history)])
        done = min(start + batch, args.users)
        if done % 100_000 == 0 or done == args.users:
            print(f"{done:>12,} {len(store):>9,} {store.evictions:>9,} {rss_mib():>9.1f} {time.monotonic() - t0:>7.1f}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.1f} MiB; users held {len(store):,} <= cap {args.max_users:,}")
    return 0 if len(store) <= args.max_users else 1


if __name__ == "__main__":
    sys.exit(main())
