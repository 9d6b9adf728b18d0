"""PUT /v1/items without Redis at many pending items (issue 23, finding 6).

    python benchmarks/operations/catalog_put.py [--pending 60000] [--calls 20] [--items 1]

Fills <tmp>/catalog_pending.jsonl with --pending distinct items (as puts of 1,000), then times
--calls puts of --items new items each, as the route calls them (FileCatalogUpdates.put, fsync
included), and prints the median and max per call. On main each put re-read and parsed the
whole file to count the pending items; now it reads only what was appended since its last call.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from service.catalog_updates import FileCatalogUpdates  # noqa: E402
from service.contract.catalog import ItemUpdate  # noqa: E402


def item(i: int) -> ItemUpdate:
    return ItemUpdate(f"item-{i:08d}", {"genre": ["a", "b"], "category": "x", "price": 1.5})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pending", type=int, default=60_000)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--items", type=int, default=1)
    args = ap.parse_args()
    print(f"# python benchmarks/operations/catalog_put.py --pending {args.pending} --calls {args.calls} "
          f"--items {args.items}")
    with tempfile.TemporaryDirectory() as tmp:
        updates = FileCatalogUpdates(Path(tmp) / "catalog_pending.jsonl")
        for start in range(0, args.pending, 1000):
            updates.put([item(i) for i in range(start, min(start + 1000, args.pending))])
        times, n = [], args.pending
        for _ in range(args.calls):
            batch = [item(i) for i in range(n, n + args.items)]
            t0 = time.perf_counter()
            pending = updates.put(batch)
            times.append((time.perf_counter() - t0) * 1000)
            n += args.items
        size = (Path(tmp) / "catalog_pending.jsonl").stat().st_size
    print(f"pending {pending:,} items, file {size / 2**20:.1f} MiB; put of {args.items} item(s): median "
          f"{statistics.median(times):.2f} ms, max {max(times):.2f} ms over {args.calls} calls")
    return 0 if pending == n else 1


if __name__ == "__main__":
    sys.exit(main())
