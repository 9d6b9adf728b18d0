"""Load benchmark of `POST /v1/recommend` over loopback at fixed request rates.

    python benchmarks/serving/load_test.py --artifacts DIR [--rates 50,100,200] [--duration 10] [--workers 2]
                                           [--users 1000] [--out benchmarks/serving/results/load_NAME.txt]
                                           [--compare-ref TREE]

1. Starts `recsys serve` over DIR (in-process store, or --redis-url) on a free loopback port.
2. Seeds the stored histories of --users real users of the version's data set (last 50 items
   each, through POST /v1/events), so requests go by `user_id` as a client would send them.
3. Floor: in this process, the version's stages run back to back on the same histories
   (encode, search, fuse, pre-rank, re-rank; one thread, as a worker runs them) — the compute a
   request cannot avoid. End-to-end at low load: sequential requests (one in flight) from the
   client; the ratio p50(end-to-end) / p50(floor) is the overhead of HTTP + JSON + the store.
4. Open loop at each rate for --duration seconds: requests leave on a fixed schedule whatever
   the replies, and latency is measured from the scheduled send time (so a server that falls
   behind shows its queueing delay instead of slowing the client down). Then, past the given
   rates, the rate climbs (x1.25) until p99 > --p99-limit-ms or errors appear; the table reports
   the highest rate that met it.

--compare-ref TREE (before / after in one run): TREE is another checkout of this repository
(e.g. `git worktree add /tmp/ref b2f5750`); its code serves the same artifacts, from the same
virtual environment, next to this checkout's server, each with its own Redis database. Each
phase (floor, low load, every rate of the climb) runs on both, alternating which goes first, so
a machine whose load changes slows both alike; the table gives both and the after / before
ratios. The load average is recorded with the table.

The client is asyncio over raw keep-alive HTTP/1.1 connections (a new one when all are busy),
~30 us of CPU per request, and shares the machine's cores with the server: on the 2-core box
that is part of the measurement. Writes a table and a PNG (latency percentiles vs rate).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from service.contract.layout import MANIFEST

RESULTS = Path(__file__).resolve().parent / "results"
MAX_CONNECTIONS = 512


@dataclass
class RateResult:
    rate: float
    sent: int
    achieved: float
    p50: float
    p95: float
    p99: float
    errors: int
    served_by: Counter[str] = field(default_factory=Counter)


# --- HTTP over raw asyncio streams ---


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        body = await self.reader.readexactly(length)
        return status, body


class Client:
    """Keep-alive connections used round robin (so every server worker gets traffic), a new one
    when all are busy. A request on a reused connection that the server had already closed
    (idle keep-alive timeout) is retried once on a new connection, as HTTP clients do; the
    retries are counted and reported."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: deque[Conn] = deque()
        self.open = 0
        self.stale_retries = 0

    async def connect(self) -> Conn:
        if self.open >= MAX_CONNECTIONS:
            raise RuntimeError("connection limit reached")
        self.open += 1
        reader, writer = await asyncio.open_connection(self.host, self.port)
        return Conn(reader, writer)

    async def warm(self, n: int) -> None:
        self.idle.extend([await self.connect() for _ in range(n)])

    async def send(self, raw: bytes) -> tuple[int, bytes]:
        reused = bool(self.idle)
        conn = self.idle.popleft() if reused else await self.connect()
        try:
            out = await conn.request(raw)
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            self.open -= 1
            conn.writer.close()
            stale = reused and (isinstance(exc, ConnectionError) or
                                (isinstance(exc, asyncio.IncompleteReadError) and not exc.partial))
            if not stale:
                raise
            self.stale_retries += 1
            conn = await self.connect()
            out = await conn.request(raw)
        self.idle.append(conn)
        return out

    def close(self) -> None:
        for c in self.idle:
            c.writer.close()


def post(path: str, body: dict[str, object], host: str) -> bytes:
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


# --- phases ---


async def seed(client: Client, histories: dict[str, list[str]], host: str) -> None:
    for user, items in histories.items():
        events = [{"user_id": user, "item_id": it, "timestamp": t} for t, it in enumerate(items)]
        status, body = await client.send(post("/v1/events", events, host))  # type: ignore[arg-type]
        if status != 202:
            raise RuntimeError(f"seeding failed: {status} {body[:200]!r}")


def sequential(port: int, bodies: list[bytes], n: int) -> np.ndarray:
    """n requests one after another on one keep-alive connection, with a blocking socket (the
    least client-side work per request, so the figure is the server's, plus loopback TCP)."""
    lat = np.empty(n)
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        for i in range(n):
            t0 = time.perf_counter()
            s.sendall(bodies[i % len(bodies)])
            while b"\r\n\r\n" not in buf:
                buf += s.recv(65536)
            head, _, buf = buf.partition(b"\r\n\r\n")
            length = int(next(line[15:] for line in head.split(b"\r\n") if line[:15].lower() == b"content-length:"))
            while len(buf) < length:
                buf += s.recv(65536)
            buf = buf[length:]
            lat[i] = (time.perf_counter() - t0) * 1e3
            if head[9:12] != b"200":
                raise RuntimeError(f"status {head[9:12]!r}")
    return lat


async def open_loop(client: Client, bodies: list[bytes], rate: float, duration: float) -> RateResult:
    n = int(rate * duration)
    lat = np.full(n, np.nan)
    errors = 0
    served: Counter[str] = Counter()
    start = time.perf_counter() + 0.05
    loop = asyncio.get_running_loop()

    async def one(i: int, due: float) -> None:
        nonlocal errors
        try:
            status, body = await client.send(bodies[i % len(bodies)])
            done = time.perf_counter()
            if status != 200:
                errors += 1
                served[f"HTTP {status}"] += 1
                return
            lat[i] = (done - due) * 1e3
            served[json.loads(body)["served_by"]] += 1
        except (OSError, RuntimeError, asyncio.IncompleteReadError, ValueError) as exc:
            errors += 1
            served[f"error {type(exc).__name__}"] += 1

    tasks = []
    for i in range(n):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(one(i, due)))
    sent_span = time.perf_counter() - start
    await asyncio.gather(*tasks)
    ok = lat[~np.isnan(lat)]
    pct = np.percentile(ok, [50, 95, 99]) if ok.size else np.array([np.inf] * 3)
    return RateResult(rate, n, n / max(sent_span, 1e-9), *map(float, pct), errors, served)


# --- the in-process floor ---


def floor(artifacts: Path, histories: list[list[str]], reps: int,
          route_candidates: int | None = None, retrieval_k: int = 200) -> dict[str, np.ndarray]:
    """Per-stage compute of the pipeline on these histories, one thread, no HTTP or store
    (the stages as Recommender.recommend runs them, without its filters and result objects).
    item2item: the route's merge (0 for a version without it); pairfeat: service/pair_features.py
    alone on the same candidates (a part of prerank, timed again apart; not in sum; 0 without).
    route_candidates: override the version's item2item.serving candidates; retrieval_k: FAISS's
    candidates (the service's default 200); both make longer lists."""
    from dataclasses import replace

    from threadpoolctl import threadpool_limits

    from service.artifacts import load_current
    from service.index import search_fused
    from service.item2item import Merged, merge_routes
    from service.pair_features import pair_features
    from service.pipeline import Recommender

    threadpool_limits(1)  # as a worker runs (RECSYS_COMPUTE_THREADS=1)
    rec = Recommender(load_current(artifacts), retrieval_k=retrieval_k)
    v = rec.v
    if route_candidates is not None and rec.item2item is not None:
        rec.item2item = replace(rec.item2item, candidates=route_candidates)
    times: dict[str, list[float]] = {s: [] for s in ("encode", "search", "fuse", "item2item", "prerank", "rerank",
                                                      "sum", "pairfeat", "candidates")}
    for r in range(reps):
        hist, _ = rec.to_indices(histories[r % len(histories)])
        banned = np.unique(hist)
        t0 = time.perf_counter()
        users = v.retrieval.run(None, {"item_seq": hist[-v.maxlen:][None]})[0]
        t1 = time.perf_counter()
        stage: dict[str, float] = {}
        hits = search_fused(v.index, users[0], rec.retrieval_k, exclude=banned, timings_ms=stage)
        cand, ret_scores, launchers = hits.user(0)
        t2 = time.perf_counter()
        m = (Merged.faiss_only(cand, ret_scores, launchers) if rec.item2item is None else
             merge_routes(cand, ret_scores, launchers, rec.item2item, hist, banned, users[0], v.items))
        t3 = time.perf_counter()
        order, scores, pv, feats = rec._prerank(hist, m, users[0])
        t4 = time.perf_counter()
        n = min(rec.prerank_n, rec._rerank_len, m.items.size)
        if v.rerank is not None and n:
            head = order[:n]
            rec._rerank(m.items[head], scores[head], pv[head], m.merged[head], None if feats is None else feats[head])
        t5 = time.perf_counter()
        if v.pair_tables is not None:
            pair_features(v.pair_tables, hist, m)
        t6 = time.perf_counter()
        times["encode"].append((t1 - t0) * 1e3)
        times["search"].append(stage["search"])
        times["fuse"].append(stage["fuse"])
        times["item2item"].append((t3 - t2) * 1e3)
        times["prerank"].append((t4 - t3) * 1e3)
        times["rerank"].append((t5 - t4) * 1e3)
        times["sum"].append((t5 - t0) * 1e3)
        times["pairfeat"].append((t6 - t5) * 1e3 if v.pair_tables is not None else 0.0)
        times["candidates"].append(float(m.items.size))
    return {k: np.asarray(v[reps // 10:]) for k, v in times.items()}  # first 10% is warm-up


# --- server ---


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis() -> tuple[subprocess.Popen[bytes], str]:
    """A throwaway redis-server on a free loopback port, once it answers PING."""
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.05)
    proc.terminate()
    raise RuntimeError("redis-server did not answer PING in 10 s")


def tree_env(tree: Path | None) -> dict[str, str]:
    """The environment that runs the code of checkout `tree` (None: this one) with this venv."""
    if tree is None:
        return dict(os.environ)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def start_server(artifacts: Path, port: int, workers: int, redis_url: str | None,
                 poll_s: float = 0.0, tree: Path | None = None) -> subprocess.Popen[bytes]:
    """`recsys serve` on `port`, once /readyz answers; poll_s is RECSYS_RELOAD_POLL_S (0 = never);
    tree: serve with the code of that checkout (see --compare-ref)."""
    # the CLI moved from training/ to recsys_cli/ (issue 16); a reference tree may predate that
    cli = "training.cli" if tree is not None and not (tree / "recsys_cli").is_dir() else "recsys_cli"
    cmd = [sys.executable, "-m", cli, "serve", "--artifacts", str(artifacts), "--port", str(port),
           "--workers", str(workers), "--log-level", "warning"]
    if redis_url:
        cmd += ["--redis-url", redis_url]
    # loopback only: writes (the seeded events) opened without a key (closed by default)
    env = {**tree_env(tree), "RECSYS_RELOAD_POLL_S": str(poll_s), "RECSYS_ALLOW_ANONYMOUS_WRITES": "1"}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, cwd=tree)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
                if b" 200 " in s.recv(1024):
                    return proc
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"recsys serve exited with {proc.returncode}")
        time.sleep(0.2)
    raise RuntimeError("server not ready after 120 s")


def histories_of(artifacts: Path, users: int, maxlen: int = 50) -> dict[str, list[str]]:
    """Last `maxlen` items of the first `users` users of the version's data set (test histories)."""
    from training.data.sources import load
    from training.data.splits import LeaveOneOut

    from service.artifacts import current_version

    name = current_version(artifacts)
    spec = json.loads((artifacts / name / MANIFEST).read_text())["data"]["spec"]
    ds = load(spec)
    loo = LeaveOneOut(ds)
    out = {}
    for u in loo.eval_users[:users].tolist():
        seq = ds.sequence(int(u))[:-1][-maxlen:]  # up to the validation item (the test item is unseen)
        out[f"bench-{ds.user_ids[u]}"] = [str(ds.item_ids[i]) for i in seq]
    return out


def fmt(r: RateResult) -> str:
    mix = ", ".join(f"{k} {v}" for k, v in r.served_by.most_common())
    return (f"{r.rate:8.0f} {r.achieved:9.1f} {r.p50:8.2f} {r.p95:8.2f} {r.p99:8.2f} {r.errors:7d}   {mix}")


def load_test_dir(tree: Path) -> Path:
    """The folder of checkout `tree` that holds load_test.py: benchmarks/serving/, or benchmarks/ in
    a tree from before the benchmarks were grouped by what they measure."""
    grouped = tree / "benchmarks" / "serving"
    return grouped if (grouped / "load_test.py").is_file() else tree / "benchmarks"


def floor_of(tree: Path, artifacts: Path, histories: list[list[str]], reps: int) -> dict[str, np.ndarray]:
    """floor() run by the code of checkout `tree`, in a subprocess."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from load_test import floor; import numpy as np; "
            "h = json.load(open(sys.argv[3])); "
            "print(json.dumps({k: v.tolist() for k, v in floor(__import__('pathlib').Path(sys.argv[2]), h, "
            "int(sys.argv[4])).items()}))")
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(histories, f)
        f.flush()
        out = subprocess.run([sys.executable, "-c", code, str(load_test_dir(tree)), str(artifacts), f.name, str(reps)],
                             env=tree_env(tree), cwd=tree, check=True, capture_output=True, text=True).stdout
    return {k: np.asarray(v) for k, v in json.loads(out.strip().splitlines()[-1]).items()}


def load_average() -> str:
    return "load average " + " ".join(Path("/proc/loadavg").read_text().split()[:3]) + f" on {os.cpu_count()} cores"


@dataclass
class Side:
    """One server under test: this checkout (tree None) or the reference one."""

    label: str
    tree: Path | None
    artifacts: Path
    port: int = 0
    server: subprocess.Popen[bytes] | None = None
    client: Client | None = None
    bodies: list[bytes] = field(default_factory=list)
    floor: dict[str, np.ndarray] = field(default_factory=dict)
    seq: np.ndarray = field(default_factory=lambda: np.empty(0))
    results: list[RateResult] = field(default_factory=list)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", required=True, type=Path)
    ap.add_argument("--name", help="label for the table (default: the data set name)")
    ap.add_argument("--rates", default="50,100,200")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per rate")
    ap.add_argument("--p99-limit-ms", type=float, default=100.0)
    ap.add_argument("--max-rate", type=float, default=3000.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--floor-reps", type=int, default=2000)
    ap.add_argument("--redis", action="store_true", help="start a redis-server on a free loopback port and use it")
    ap.add_argument("--redis-url", help="use this Redis instead")
    ap.add_argument("--compare-ref", type=Path, help="a checkout of the code to compare against (before / after)")
    ap.add_argument("--ref-artifacts", type=Path, help="what --compare-ref serves (default: --artifacts), e.g. the "
                                                         "same checkpoints published with the old index settings")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--png", type=Path)
    args = ap.parse_args()
    args.artifacts = args.artifacts.resolve()  # the servers may run from another directory
    args.ref_artifacts = (args.ref_artifacts or args.artifacts).resolve()

    hist = histories_of(args.artifacts, args.users)
    from service.artifacts import current_version

    manifest = json.loads((args.artifacts / current_version(args.artifacts) / MANIFEST).read_text())
    name = args.name or manifest["data"]["name"]
    store = "redis" if args.redis or args.redis_url else "in-process"
    sides = [Side("after", None, args.artifacts)]
    if args.compare_ref:
        sides.insert(0, Side(f"before ({args.compare_ref})", args.compare_ref.resolve(), args.ref_artifacts))
    lines = [f"catalog: {name}, {manifest['item_count']} items, M={manifest['dims']['num_launchers']}"]
    for side in sides:
        m = json.loads((side.artifacts / current_version(side.artifacts) / MANIFEST).read_text())["index"]
        lines.append(f"[{side.label}] {side.artifacts}: index {m.get('factory', m['kind'])} "
                     + " ".join(f"{k}={m[k]}" for k in ("nlist", "nprobe", "ef_search", "recall") if k in m))
    lines += [f"server: recsys serve --workers {args.workers} ({store} store), "
              f"client: same machine ({os.cpu_count()} cores), {len(hist)} users with stored histories",
              f"start: {load_average()}"]

    def turns(i: int) -> list[Side]:
        """Both sides, the first one alternating with i."""
        return sides if i % 2 == 0 else sides[::-1]

    here = Path(__file__).resolve().parents[2]
    for r in range(2 if len(sides) > 1 else 1):  # two rounds of half the reps each, alternating
        for side in turns(r):
            part = floor_of(side.tree or here, side.artifacts, list(hist.values()), args.floor_reps // len(sides))
            side.floor = {k: np.concatenate([side.floor.get(k, np.empty(0)), v]) for k, v in part.items()}
    for side in sides:
        lines.append(f"\n[{side.label}] in-process compute floor per request (ms, one thread, no HTTP/store):")
        lines.append(f"{'stage':8s} {'p50':>7s} {'p99':>7s}")
        for k, v in side.floor.items():
            lines.append(f"{k:8s} {np.median(v):7.3f} {np.percentile(v, 99):7.3f}")
    print("\n".join(lines), flush=True)

    redis_proc = None
    if args.redis and not args.redis_url:
        redis_proc, args.redis_url = start_redis()
    try:
        for db, side in enumerate(sides):
            side.port = free_port()
            url = args.redis_url.rsplit("/", 1)[0] + f"/{db}" if args.redis_url else None
            side.server = start_server(side.artifacts, side.port, args.workers, url, tree=side.tree)

        async def run() -> None:
            for side in sides:
                host = f"127.0.0.1:{side.port}"
                side.client = Client("127.0.0.1", side.port)
                await seed(side.client, hist, host)
                await side.client.warm(32)
                side.bodies = [post("/v1/recommend", {"user_id": u, "k": 10}, host) for u in hist]
                sequential(side.port, side.bodies, 200)  # warm-up
            for i in range(2):
                for side in turns(i):
                    side.seq = np.concatenate([side.seq, sequential(side.port, side.bodies, 500)])
            rates = [float(r) for r in args.rates.split(",")]
            step = 0

            async def at(rate: float) -> None:
                nonlocal step
                for side in turns(step):
                    if side.results and side.results[-1].rate != rate and not ok(side.results[-1]):
                        continue  # this side already failed a lower rate
                    assert side.client is not None
                    await asyncio.sleep(1.0)  # let the queue drain
                    side.results.append(await open_loop(side.client, side.bodies, rate, args.duration))
                    print(f"{side.label[:6]:6s} {fmt(side.results[-1])}", flush=True)
                step += 1

            def ok(r: RateResult) -> bool:
                return r.p99 <= args.p99_limit_ms and r.errors == 0

            for rate in rates:
                await at(rate)
            rate = rates[-1]
            while any(ok(s.results[-1]) for s in sides) and rate < args.max_rate:
                rate = round(rate * 1.25)
                await at(rate)

        asyncio.run(run())
    finally:
        for side in sides:
            if side.server is not None:
                os.killpg(side.server.pid, signal.SIGTERM)
                side.server.wait(timeout=30)
        if redis_proc is not None:
            redis_proc.terminate()

    lines.append(f"end: {load_average()}")
    summary: dict[str, dict[str, float]] = {}
    for side in sides:
        assert side.client is not None
        e2e, fl50 = float(np.median(side.seq)), float(np.median(side.floor["sum"]))
        good = [r.rate for r in side.results if r.p99 <= args.p99_limit_ms and r.errors == 0]
        at200 = [r.p99 for r in side.results if r.rate == 200]
        summary[side.label] = {"e2e": e2e, "floor": fl50, "ratio": e2e / fl50, "peak": max(good) if good else 0.0,
                               "p99_200": at200[0] if at200 else float("nan")}
        lines.append(f"\n[{side.label}] low load, one request in flight ({side.seq.size} requests): end-to-end p50 "
                     f"{e2e:.3f} ms, p99 {np.percentile(side.seq, 99):.3f} ms; floor p50 {fl50:.3f} ms; "
                     f"end-to-end / floor = {e2e / fl50:.2f}")
        lines.append(f"[{side.label}] open loop, {args.duration:.0f} s per rate (latency from the scheduled send "
                     "time, ms):")
        lines.append(f"{'rate':>8s} {'achieved':>9s} {'p50':>8s} {'p95':>8s} {'p99':>8s} {'errors':>7s}   served_by")
        lines += [fmt(r) for r in side.results]
        lines.append(f"(requests retried once on a new connection after the server closed an idle one: "
                     f"{side.client.stale_retries})")
        lines.append(f"highest rate with p99 <= {args.p99_limit_ms:.0f} ms and no errors: "
                     f"{max(good) if good else 'none'} rps"
                     + (" (the --max-rate cap)" if good and max(good) >= args.max_rate else ""))
    if len(sides) > 1:
        b, a = (summary[s.label] for s in sides)
        lines.append("\nafter / before (same run): " + ", ".join(
            f"{k} {a[k]:.3f} / {b[k]:.3f} = {a[k] / b[k]:.2f}" if b[k] else f"{k} {a[k]:.3f} / {b[k]:.3f}"
            for k in ("peak", "p99_200", "e2e", "floor", "ratio")))
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        from training.report import save_benchmark

        save_benchmark(args.out, text)
        last = sides[-1]  # this checkout: the top-level keys benchmarks/serving/plot_load.py reads
        (args.out.with_suffix(".json")).write_text(json.dumps(
            {"name": name, "items": manifest["item_count"], "summary": summary,
             "e2e_p50": float(np.median(last.seq)), "floor_p50": float(np.median(last.floor["sum"])),
             "floor": {k: float(np.median(v)) for k, v in last.floor.items()},
             "rates": [{k: getattr(r, k) for k in ("rate", "achieved", "p50", "p95", "p99", "errors")}
                       for r in last.results],
             "sides": {s.label: {"e2e_p50": float(np.median(s.seq)), "floor_p50": float(np.median(s.floor["sum"])),
                                 "floor": {k: float(np.median(v)) for k, v in s.floor.items()},
                                 "rates": [{k: getattr(r, k) for k in ("rate", "achieved", "p50", "p95", "p99",
                                                                        "errors")} for r in s.results]}
                       for s in sides}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
