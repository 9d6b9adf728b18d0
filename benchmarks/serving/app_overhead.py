"""What the HTTP application adds to a recommendation, without sockets or a server.

    python benchmarks/serving/app_overhead.py --artifacts DIR [--reps 3000]

Calls the ASGI app in-process (lifespan run, in-process store) and times, per call: GET /healthz
(the framework's floor), POST /v1/recommend with a 30-item history, and Recommender.recommend()
on the same history (the pipeline alone). recommend - direct is what routing, validation,
dependencies, middleware, metrics and JSON cost; the rest of an end-to-end figure is the
server (uvicorn), loopback TCP, the client and the store.

Each figure is given twice: wall-clock p50 and process CPU-time p50 (time.process_time, every
thread of the process: the compute thread included). On a machine whose cores are shared with
other work, wall time also counts the time spent waiting for a core; CPU time does not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


async def call(app: object, method: str, path: str, body: bytes = b"") -> bytes:
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2), "state": {}}
    sent = False
    out: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, object]) -> None:
        out.append(message)

    await app(scope, receive, send)  # type: ignore[operator]
    return out[-1]["body"]  # type: ignore[return-value]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", required=True, type=Path)
    ap.add_argument("--reps", type=int, default=3000)
    args = ap.parse_args()
    os.environ.update(RECSYS_ARTIFACTS=str(args.artifacts), RECSYS_RELOAD_POLL_S="0")
    from service.main import create_app

    app = create_app()

    async def run() -> dict[str, float]:
        times: dict[str, list[float]] = {"GET /healthz": [], "POST /v1/recommend": [], "recommend() alone": []}
        cpu: dict[str, list[float]] = {k: [] for k in times}
        async with app.router.lifespan_context(app):
            rec = app.state.recommender
            n = rec.v.num_items
            for i in range(args.reps):
                hist = [str(rec.v.item_ids[1 + (i * 7 + j) % n]) for j in range(30)]
                body = json.dumps({"history": hist, "k": 10}).encode()
                c0, t0 = time.process_time(), time.perf_counter()
                await call(app, "GET", "/healthz")
                c1, t1 = time.process_time(), time.perf_counter()
                await call(app, "POST", "/v1/recommend", body)
                c2, t2 = time.process_time(), time.perf_counter()
                rec.recommend(hist, 10, None, explain=False, timeout_ms=100.0)
                c3, t3 = time.process_time(), time.perf_counter()
                for key, dt, dc in zip(times, (t1 - t0, t2 - t1, t3 - t2), (c1 - c0, c2 - c1, c3 - c2)):
                    times[key].append(dt * 1e3)
                    cpu[key].append(dc * 1e3)
        skip = args.reps // 10
        return ({k: float(np.median(v[skip:])) for k, v in times.items()},
                {k: float(np.median(v[skip:])) for k, v in cpu.items()})

    med, cpu_med = asyncio.run(run())
    for k, v in med.items():
        print(f"{k:22s} p50 {v:7.3f} ms   cpu p50 {cpu_med[k]:7.3f} ms")
    print(f"{'app adds to recommend':22s}     {med['POST /v1/recommend'] - med['recommend() alone']:7.3f} ms   "
          f"cpu     {cpu_med['POST /v1/recommend'] - cpu_med['recommend() alone']:7.3f} ms")
    print(f"load average {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
