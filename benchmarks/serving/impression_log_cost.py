"""What recording every served list costs POST /v1/recommend (issue 25, "Cost"): latency with the
impression log on (RECSYS_IMPRESSION_SAMPLE_RATE=1) vs off (0), and the log's bytes per impression,
for each log backend: the Redis Stream (RECSYS_REDIS_URL, a throwaway redis-server on a free
loopback port) and the rotated JSON Lines files (RECSYS_LOG_DIR, the in-process store).

    python benchmarks/serving/impression_log_cost.py --artifacts DIR [--backends redis,file] [--n 2000]
                                                     [--block 100] [--rounds 4] [--ref TREE] [--out FILE]

Per backend two `recsys serve` processes (1 worker each), identical but for the sample rate;
requests carry their history (no store read), k=10, one keep-alive connection, one request at a
time (load_test.sequential). All servers run side by side and take turns every --block requests
(the order reversed at every turn), so that a change in the machine's load falls on all of them
alike (on the shared 2-core machine, rounds of a few seconds per server differed by up to 1 ms
at p50, far more than the effect); on - off is given per round (--n requests per server) as well. Bytes per impression: Redis's MEMORY USAGE of the
impressions stream / its length and the mean record (JSON) length; the files' size / their lines.
CPU: each server's CPU time over the measured rounds per request, in all and per thread (/proc;
threads named by `py-spy dump` when py-spy is installed, else by id): the impression writer's
own cost, which the latency of sequential requests mostly hides.

--ref TREE (before / after in the same run): TREE is another copy of this repository (e.g.
`git archive REV | tar -x -C TREE`); per backend a third server, impressions on, runs its code
(load_test.start_server's tree) and takes its turns with the others ("on-ref").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import cast

import numpy as np
import redis

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from load_test import free_port, load_average, post, sequential, start_redis, start_server  # noqa: E402

ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
from service.artifacts import load_current  # noqa: E402
from service.contract.online_log import IMPRESSIONS_FILE_PREFIX, RECORD_FIELD  # noqa: E402
from service.online_log import impressions_stream, log_files  # noqa: E402

BACKENDS = ("redis", "file")
RATE = {"off": "0", "on": "1", "on-ref": "1"}  # settings: impressions off, on, on with --ref's code


def first_answer(port: int, body: dict[str, object]) -> dict[str, object]:
    """One request's JSON answer (to record which stages served)."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/recommend", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        answer: dict[str, object] = json.loads(resp.read())
    return answer


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) of process pid and its descendants so far."""
    total = 0.0
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state is field 3 of proc(5)
    total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14, 15
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            total += cpu_s(int(child))
    return total


def thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds of each thread (by id) of process pid so far."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        stat = (task / "stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def thread_names(pid: int) -> dict[int, str]:
    """Python's names of pid's threads, from `py-spy dump` when py-spy is installed (else empty)."""
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if spy is None:
        return {}
    dump = subprocess.run([spy, "dump", "-p", str(pid)], capture_output=True, text=True, timeout=60).stdout
    return {int(m.group(1)): m.group(2) for m in re.finditer(r'Thread (\d+) \([^)]*\): "([^"]+)"', dump)}


def redis_bytes(url: str) -> str:
    client = redis.Redis.from_url(url)
    key = impressions_stream()
    count = int(client.xlen(key))
    mem = int(client.memory_usage(key, samples=0) or 0)
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(key, count=1000))
    records = [fields[RECORD_FIELD.encode()] for _id, fields in entries]
    rec_len = float(np.mean([len(r) for r in records])) if records else float("nan")
    client.close()
    return (f"redis stream: {count} entries, {mem} bytes in Redis (MEMORY USAGE) = {mem / max(count, 1):.0f} B / "
            f"impression; record (JSON, 10 items) {rec_len:.0f} B")


def file_bytes(folder: Path) -> str:
    files = [p for _seq, p in log_files(folder, IMPRESSIONS_FILE_PREFIX)]
    size = sum(p.stat().st_size for p in files)
    lines = sum(p.read_bytes().count(b"\n") for p in files)
    return (f"JSONL files: {lines} lines in {len(files)} file(s), {size} bytes = {size / max(lines, 1):.0f} B / "
            f"impression (record + newline)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, required=True)
    ap.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated, of: redis, file")
    ap.add_argument("--n", type=int, default=2000, help="requests per server per round")
    ap.add_argument("--block", type=int, default=100, help="requests a server gets before the next one's turn")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--ref", type=Path, default=None, help="another checkout whose code also serves, impressions on")
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = ap.parse_args()
    backends = [b for b in args.backends.split(",") if b]
    if not backends or any(b not in BACKENDS for b in backends):
        ap.error(f"--backends: of {', '.join(BACKENDS)}, got {args.backends!r}")
    items = [str(x) for x in load_current(args.artifacts).item_ids[1:].tolist()]
    rng = np.random.default_rng(0)
    host = "127.0.0.1"
    requests: list[dict[str, object]] = [{"history": [items[j] for j in rng.integers(0, len(items), 20)], "k": 10}
                                         for _ in range(200)]
    bodies = [post("/v1/recommend", r, host) for r in requests]
    settings = ["off", "on", *(["on-ref"] if args.ref else [])]
    logged = settings[1:]
    servers = [(b, s) for b in backends for s in settings]
    rproc, url = start_redis() if "redis" in backends else (None, "")
    tmp = tempfile.TemporaryDirectory(prefix="impression-log-cost-")
    procs = []
    ports: dict[tuple[str, str], int] = {}
    try:
        for backend, setting in servers:
            os.environ["RECSYS_IMPRESSION_SAMPLE_RATE"] = RATE[setting]
            if backend == "file":
                os.environ["RECSYS_LOG_DIR"] = str(Path(tmp.name) / setting)
            else:
                os.environ.pop("RECSYS_LOG_DIR", None)
            ports[(backend, setting)] = free_port()
            procs.append(start_server(args.artifacts, ports[(backend, setting)], 1, url if backend == "redis" else None,
                                      tree=args.ref if setting == "on-ref" else None))
        answer = first_answer(ports[servers[0]], requests[0])
        lat: dict[tuple[str, str], list[np.ndarray]] = {s: [] for s in servers}
        for s in servers:
            sequential(ports[s], bodies, 200)  # warm-up
        pids = {s: proc.pid for s, proc in zip(servers, procs, strict=True)}
        names = {s: thread_names(pid) for s, pid in pids.items()}
        cpu0 = {s: cpu_s(pid) for s, pid in pids.items()}
        threads0 = {s: thread_cpu_s(pid) for s, pid in pids.items()}
        redis_cpu0 = cpu_s(rproc.pid) if rproc is not None else 0.0
        turns = 0
        for _ in range(args.rounds):
            parts: dict[tuple[str, str], list[np.ndarray]] = {s: [] for s in servers}
            for start in range(0, args.n, args.block):
                block = bodies[start % len(bodies):] + bodies[:start % len(bodies)]  # every body in turn
                for s in servers if turns % 2 == 0 else servers[::-1]:
                    parts[s].append(sequential(ports[s], block, min(args.block, args.n - start)))
                turns += 1
            for s in servers:
                lat[s].append(np.concatenate(parts[s]))
        cpu = {s: cpu_s(pid) - cpu0[s] for s, pid in pids.items()}
        threads = {s: {tid: t - threads0[s].get(tid, 0.0) for tid, t in thread_cpu_s(pid).items()}
                   for s, pid in pids.items()}
        redis_cpu = cpu_s(rproc.pid) - redis_cpu0 if rproc is not None else 0.0
        sizes = {"redis": redis_bytes(url) if "redis" in backends else "",
                 "file": file_bytes(Path(tmp.name) / "on") if "file" in backends else ""}
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()
        if rproc is not None:
            rproc.terminate()
        tmp.cleanup()
    timings = answer.get("timings_ms", {})
    lines = [f"# {shlex.join([sys.executable.split('/')[-1], *sys.argv])}",
             f"# {args.rounds} rounds x {args.n} sequential requests per server ({len(servers)} servers taking "
             f"turns every {args.block} requests, the order reversed at every turn), history of 20 in the request, k=10; load average after: {load_average()}",
             f"# served_by {answer.get('served_by')!r}, timings_ms keys {list(timings) if isinstance(timings, dict) else timings}",
             "# cpu ms: the server process's CPU time (all threads, user + system) over the measured rounds / its "
             "requests",
             f"{'backend':8s} {'impressions':12s} {'p50 ms':>8s} {'p99 ms':>8s} {'mean ms':>8s} {'cpu ms':>8s}"]
    for backend in backends:
        p: dict[str, tuple[float, ...]] = {}
        for setting in settings:
            a = np.concatenate(lat[(backend, setting)])
            p[setting] = (float(np.percentile(a, 50)), float(np.percentile(a, 99)), float(a.mean()),
                          cpu[(backend, setting)] * 1e3 / len(a))
            lines.append(f"{backend:8s} {setting:12s} " + " ".join(f"{v:8.3f}" for v in p[setting]))
        for setting in logged:
            on, off = p[setting], p["off"]
            lines.append(f"{backend:8s} {setting + ' - off':12s} "
                         + " ".join(f"{a - b:+8.3f}" for a, b in zip(on, off, strict=True)))
            lines.append(f"{backend:8s} {setting + ' / off':12s} "
                         + " ".join(f"{a / b:8.3f}" for a, b in zip(on, off, strict=True)))
        for setting in settings:
            n = sum(len(a) for a in lat[(backend, setting)])
            busy = sorted(((t * 1e3 / n, names[(backend, setting)].get(tid, str(tid)))
                           for tid, t in threads[(backend, setting)].items() if t > 0), reverse=True)
            lines.append(f"{backend:8s} cpu ms per thread, {setting:6s}: " + ", ".join(f"{name} {ms:.3f}" for ms, name in busy))
        for setting in settings:
            lines.append(f"{backend:8s} p50 {setting:6s} per round: "
                         + " ".join(f"{np.percentile(a, 50):6.3f}" for a in lat[(backend, setting)]))
        for setting in logged:
            per_round = [float(np.percentile(b, 50) - np.percentile(a, 50))
                         for a, b in zip(lat[(backend, "off")], lat[(backend, setting)], strict=True)]
            lines.append(f"{backend:8s} p50 {setting} - off per round: " + " ".join(f"{d:+.3f}" for d in per_round)
                         + f" (median {np.median(per_round):+.3f})")
    if "redis" in backends:
        n_on = sum(len(a) for setting in logged for a in lat[("redis", setting)])
        lines.append(f"redis-server CPU over the measured rounds: {redis_cpu * 1e3:.0f} ms = "
                     f"{redis_cpu * 1e3 / n_on:.3f} ms per logged request ({', '.join(logged)} together)")
    lines += [sizes[b] for b in backends]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
