"""What moving recommendations onto a compute thread costs, and what it buys (issue 15, finding 5).

    python benchmarks/serving/healthz_compute.py --artifacts DIR [--n 2000]

Loopback, bounded: starts `recsys serve` (1 worker, in-process store) over DIR and measures
(1) sequential POST /v1/recommend latency (one keep-alive connection, --n requests: the
cost of the thread hop shows here), (2) GET /healthz latency while a long batch computes
(RECSYS_TIMEOUT_MS raised so the batch really runs long: 100 requests x k=1000 with explain).
Run it on two code trees (PYTHONPATH=<old tree>) to compare.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_test import free_port, histories_of, post, sequential, start_server  # noqa: E402


def get_ms(port: int, path: str) -> float:
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        while s.recv(65536):
            pass
    return (time.perf_counter() - t0) * 1e3


def hop_us(n: int = 5000) -> tuple[float, float]:
    """Median / p99 microseconds of one empty job through service.compute.ComputeThread (the
    added cost per request, without the HTTP noise)."""
    import asyncio

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from service.compute import ComputeThread

    async def go() -> np.ndarray:
        pool, out = ComputeThread(1, 8), np.empty(n)
        for i in range(n):
            t0 = time.perf_counter()
            await pool.run(int)
            out[i] = (time.perf_counter() - t0) * 1e6
        pool.close()
        return out

    us = asyncio.run(go())
    return float(np.median(us)), float(np.percentile(us, 99))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifacts", type=Path)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--hop-only", action="store_true", help="only the in-process cost of the thread hop")
    args = ap.parse_args()
    if args.hop_only:
        med, p99 = hop_us()
        print(f"# python benchmarks/serving/healthz_compute.py --hop-only\ncompute-thread hop: median {med:.0f} us, "
              f"p99 {p99:.0f} us per request")
        return 0
    os.environ.update(RECSYS_TIMEOUT_MS="60000", RECSYS_BATCH_MAX_TOTAL_K="1000000",
                      RECSYS_BATCH_MAX_TOTAL_HISTORY="10000000")
    port = free_port()
    server = start_server(args.artifacts, port, 1, None)
    host = f"127.0.0.1:{port}"
    try:
        hist = list(histories_of(args.artifacts, 50).values())
        bodies = [post("/v1/recommend", {"history": h, "k": 10}, host) for h in hist]
        sequential(port, bodies, 200)  # warm-up
        lat = sequential(port, bodies, args.n)
        p50, p99 = np.percentile(lat, [50, 99])
        batch = post("/v1/recommend/batch", {"requests": [{"history": hist[i % len(hist)], "k": 1000, "explain": True}
                                                          for i in range(100)]}, host)
        took: list[float] = []

        def long_batch() -> None:
            t0 = time.perf_counter()
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(batch.replace(b"HTTP/1.1\r\n", b"HTTP/1.1\r\nConnection: close\r\n", 1))
                while s.recv(1 << 20):
                    pass
            took.append((time.perf_counter() - t0) * 1e3)

        health: list[float] = []
        for _ in range(3):
            t = threading.Thread(target=long_batch)
            t.start()
            time.sleep(0.05)
            while t.is_alive():
                health.append(get_ms(port, "/healthz"))
                time.sleep(0.02)
            t.join()
        print(f"# python benchmarks/serving/healthz_compute.py --artifacts {args.artifacts} --n {args.n}")
        print(f"sequential /v1/recommend ({args.n}): p50 {p50:.2f} ms, p99 {p99:.2f} ms")
        print(f"long batch (100 x k=1000, explain): {', '.join(f'{x:.0f}' for x in took)} ms")
        print(f"/healthz during the batches ({len(health)} probes): p50 {np.percentile(health, 50):.1f} ms, "
              f"max {max(health):.1f} ms")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
