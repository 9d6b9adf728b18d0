"""Hot swap under load: time from the CURRENT flip to answers from the new version, and the
requests that failed meanwhile.

    python benchmarks/operations/hot_swap.py --artifacts DIR [--rate 100] [--swaps 3] [--workers 2] [--redis]

Starts `recsys serve` over a scratch copy of DIR's live version, sends requests at a fixed
rate (open loop, as benchmarks/serving/load_test.py), and --swaps times publishes a new version (a
copy of the live one under a new name, written before the clock starts, as `recsys reindex`
writes its folder before it flips), flips CURRENT and, with Redis, announces it on pub/sub.
Reports per swap: ms from the flip to the first answer from the new version, ms to the last
answer from the old one, and failed requests (non-200 or connection errors) over the run; and the
resident memory of the workers (sampled every 50 ms from /proc: RSS, private anon, mapped file)
before the flip (one version held) and its peak until the swap is over (two versions held).
--tree serves with the code of another checkout (as benchmarks/serving/load_test.py --compare-ref).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))  # load_test.py
from load_test import Client, free_port, histories_of, post, seed, start_redis, start_server  # noqa: E402
from service.contract.layout import MANIFEST  # noqa: E402


def copy_version(root: Path, src: Path, name: str) -> None:
    shutil.copytree(src, root / name)
    manifest = json.loads((root / name / MANIFEST).read_text())
    manifest["version"] = name
    (root / name / MANIFEST).write_text(json.dumps(manifest))


def workers_of(pid: int) -> list[int]:
    """The server's worker processes (its children; the server itself with --workers 1)."""
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(x) for x in (task / "children").read_text().split()]
    return kids or [pid]


def memory_of(pid: int) -> tuple[float, float, float]:
    """(RSS, RssAnon, RssFile) MiB of a process."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024
    return fields.get("VmRSS", 0.0), fields.get("RssAnon", 0.0), fields.get("RssFile", 0.0)


def worker_memory(pid: int) -> list[tuple[float, float, float]]:
    return [memory_of(w) for w in sorted(workers_of(pid))]


async def peak_memory(pid: int) -> list[tuple[float, float, float]]:
    """Per worker, the sample with the highest RSS, until cancelled."""
    peak = worker_memory(pid)
    try:
        while True:
            await asyncio.sleep(0.05)
            now = worker_memory(pid)
            peak = [max(a, b) for a, b in zip(peak, now)]
    except asyncio.CancelledError:
        return peak


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", required=True, type=Path)
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--swaps", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--redis", action="store_true", help="start a redis-server (needed for --workers > 1)")
    ap.add_argument("--poll-s", type=float, default=5.0, help="RECSYS_RELOAD_POLL_S of the server")
    ap.add_argument("--tree", type=Path, help="serve with the code of this checkout (default: this one)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from service.artifacts import current_version
    from service.notify import notify_version
    from training.publish.versions import set_current

    live = current_version(args.artifacts)
    scratch = Path(tempfile.mkdtemp(prefix="recsys-swap-"))
    copy_version(scratch, args.artifacts / live, "swap0")
    set_current(scratch, "swap0")
    redis_proc, redis_url = start_redis() if args.redis else (None, None)
    hist = histories_of(args.artifacts, 300)
    port = free_port()
    server = start_server(scratch, port, args.workers, redis_url, poll_s=args.poll_s,
                          tree=args.tree.resolve() if args.tree else None)
    host = f"127.0.0.1:{port}"
    answers: list[tuple[float, str]] = []
    errors = 0
    rows = []

    async def run() -> None:
        client = Client("127.0.0.1", port)
        await seed(client, hist, host)
        bodies = [post("/v1/recommend", {"user_id": u, "k": 10}, host) for u in hist]
        stop = asyncio.Event()

        async def one(i: int) -> None:
            nonlocal errors
            try:
                status, body = await client.send(bodies[i % len(bodies)])
            except (OSError, RuntimeError, asyncio.IncompleteReadError, ValueError):
                errors += 1
                return
            if status != 200:
                errors += 1
                return
            answers.append((time.perf_counter(), json.loads(body)["model_version"]))

        async def load() -> None:
            start, i, tasks = time.perf_counter(), 0, []
            while not stop.is_set():
                delay = start + i / args.rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(i)))
                i += 1
            await asyncio.gather(*tasks)

        loader = asyncio.create_task(load())
        await asyncio.sleep(2.0)
        for s in range(1, args.swaps + 1):
            name = f"swap{s}"
            await asyncio.to_thread(copy_version, scratch, scratch / "swap0", name)
            await asyncio.sleep(1.0)
            before = worker_memory(server.pid)
            sampler = asyncio.create_task(peak_memory(server.pid))
            flipped = time.perf_counter()
            set_current(scratch, name)
            if redis_url:
                notify_version(redis_url, name)
            while True:
                await asyncio.sleep(0.05)
                after = [(t, v) for t, v in answers if t > flipped]
                new = [t for t, v in after if v == name]
                if len(new) >= 50 and all(v == name for _, v in after[-50:]):
                    break
                if time.perf_counter() - flipped > 60:
                    raise RuntimeError(f"{name} not served 60 s after the flip")
            old = [t for t, v in answers if t > flipped and v != name]
            sampler.cancel()
            peak = await sampler
            rows.append((name, (new[0] - flipped) * 1e3, ((max(old) if old else flipped) - flipped) * 1e3, before, peak))
            await asyncio.sleep(1.0)
        stop.set()
        await loader

    try:
        asyncio.run(run())
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        if redis_proc is not None:
            redis_proc.terminate()
        shutil.rmtree(scratch, ignore_errors=True)

    manifest = json.loads((args.artifacts / live / MANIFEST).read_text())
    lines = [f"catalog {manifest['data']['name']} ({manifest['item_count']} items), {args.workers} worker(s), "
             f"{'Redis pub/sub + ' if redis_url else ''}polling every {args.poll_s} s, {args.rate:.0f} rps open loop",
             f"{'swap':8s} {'first new answer ms':>20s} {'last old answer ms':>19s}   worker MiB before flip "
             f"(RSS/anon/file) -> peak during swap"]
    lines += [f"{n:8s} {a:20.0f} {b:19.0f}   " + ", ".join(
        f"{x[0]:.0f}/{x[1]:.0f}/{x[2]:.0f} -> {y[0]:.0f}/{y[1]:.0f}/{y[2]:.0f}" for x, y in zip(m0, m1))
        for n, a, b, m0, m1 in rows]
    lines.append(f"requests answered: {len(answers)}, failed: {errors}; "
                 f"median first-new {np.median([r[1] for r in rows]):.0f} ms")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        from training.report import save_benchmark

        save_benchmark(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
