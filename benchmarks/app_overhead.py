"""What the HTTP application adds to a recommendation, without sockets or a server.

    python benchmarks/app_overhead.py --artifacts DIR [--reps 3000]

Calls the ASGI app in-process (lifespan run, in-process store) and times, per call: GET /healthz
(the framework's floor), POST /v1/recommend with a 30-item history, and Recommender.recommend()
on the same history (the pipeline alone). recommend - direct is what routing, validation,
dependencies, middleware, metrics and JSON cost; the rest of an end-to-end figure is the
server (uvicorn), loopback TCP, the client and the store.
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
        async with app.router.lifespan_context(app):
            rec = app.state.recommender
            n = rec.v.num_items
            for i in range(args.reps):
                hist = [str(rec.v.item_ids[1 + (i * 7 + j) % n]) for j in range(30)]
                body = json.dumps({"history": hist, "k": 10}).encode()
                t0 = time.perf_counter()
                await call(app, "GET", "/healthz")
                t1 = time.perf_counter()
                await call(app, "POST", "/v1/recommend", body)
                t2 = time.perf_counter()
                rec.recommend(hist, 10, None, explain=False, timeout_ms=100.0)
                t3 = time.perf_counter()
                for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                    times[key].append(dt * 1e3)
        return {k: float(np.median(v[args.reps // 10:])) for k, v in times.items()}

    med = asyncio.run(run())
    for k, v in med.items():
        print(f"{k:22s} p50 {v:7.3f} ms")
    print(f"{'app adds to recommend':22s}     {med['POST /v1/recommend'] - med['recommend() alone']:7.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
