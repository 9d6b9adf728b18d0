"""What recording every served list costs POST /v1/recommend (issue 25, "Cost"): latency with the
impression log on (RECSYS_IMPRESSION_SAMPLE_RATE=1) vs off (0), and the log's bytes per impression.

    python benchmarks/serving/impression_log_cost.py --artifacts DIR [--n 2000] [--rounds 4] [--out FILE]

Two `recsys serve` processes (1 worker each) on one throwaway redis-server, identical but for the
sample rate; requests carry their history (no store read), k=10, one keep-alive connection, one
request at a time (load_test.sequential). The two servers are measured in alternating rounds so
that a change in the machine's load falls on both. Bytes per impression: Redis's MEMORY USAGE of
the impressions stream / its length, and the mean record (JSON) length.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

import numpy as np
import redis

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from load_test import free_port, post, sequential, start_redis, start_server  # noqa: E402

ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
from service.artifacts import load_current  # noqa: E402
from service.online_log import impressions_stream  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, required=True)
    ap.add_argument("--n", type=int, default=2000, help="requests per server per round")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = ap.parse_args()
    items = [str(x) for x in load_current(args.artifacts).item_ids[1:].tolist()]
    rng = np.random.default_rng(0)
    host = "127.0.0.1"
    bodies = [post("/v1/recommend", {"history": [items[j] for j in rng.integers(0, len(items), 20)], "k": 10}, host)
              for _ in range(200)]
    rproc, url = start_redis()
    procs = []
    ports = {}
    try:
        for name, rate in (("off", "0"), ("on", "1")):
            os.environ["RECSYS_IMPRESSION_SAMPLE_RATE"] = rate
            ports[name] = free_port()
            procs.append(start_server(args.artifacts, ports[name], 1, url))
        lat: dict[str, list[np.ndarray]] = {"off": [], "on": []}
        for name in ("off", "on"):
            sequential(ports[name], bodies, 200)  # warm-up
        for _ in range(args.rounds):
            for name in ("off", "on"):
                lat[name].append(sequential(ports[name], bodies, args.n))
        client = redis.Redis.from_url(url)
        key = impressions_stream()
        count = int(client.xlen(key))
        mem = int(client.memory_usage(key, samples=0) or 0)
        records = [fields[b"r"] for _id, fields in client.xrange(key, count=1000)]
        rec_len = float(np.mean([len(r) for r in records])) if records else float("nan")
        client.close()
    finally:
        for p in procs:
            p.terminate()
            p.wait()
        rproc.terminate()
    lines = [f"# {shlex.join([sys.executable.split('/')[-1], *sys.argv])}",
             f"# {args.rounds} rounds x {args.n} sequential requests per server, history of 20 in the request, k=10",
             f"{'impression log':16s} {'p50 ms':>8s} {'p99 ms':>8s} {'mean ms':>8s}"]
    p = {}
    for name in ("off", "on"):
        a = np.concatenate(lat[name])
        p[name] = (np.percentile(a, 50), np.percentile(a, 99), a.mean())
        lines.append(f"{name:16s} {p[name][0]:8.3f} {p[name][1]:8.3f} {p[name][2]:8.3f}")
    lines.append(f"{'on - off':16s} {p['on'][0] - p['off'][0]:+8.3f} {p['on'][1] - p['off'][1]:+8.3f} "
                 f"{p['on'][2] - p['off'][2]:+8.3f}")
    per_round = [float(np.percentile(b, 50) - np.percentile(a, 50)) for a, b in zip(lat["off"], lat["on"], strict=True)]
    lines.append("p50 on - off per round: " + " ".join(f"{d:+.3f}" for d in per_round))
    lines.append(f"impressions stream: {count} entries, {mem} bytes in Redis = {mem / max(count, 1):.0f} B / impression; "
                 f"record (JSON, 10 items) {rec_len:.0f} B")
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
