"""Retrieval index speed and recall: Flat vs ANN, M = 4 launchers x top-200 with max-fusion.

Usage: python benchmarks/serving/faiss_search.py [--sizes 10000,100000,1000000] [--png FILE]

Items are synthetic clustered embeddings (D = 64, float32): a seeded mixture of Gaussians
around unit centres, rows normalised then scaled by log-normal norms, so inner-product ANN
sees the structure (and the norm spread) of trained item embeddings. A user is M = 4 launcher
vectors, each drawn near a different random centre (several interests). Latency is one
``search_fused`` call (one faiss search of M queries + NumPy fusion) for a single user, with
one faiss thread (the serving setting), wall-clock median and p99 over the repeats; "cpu p50"
is the calling thread's CPU time (the cost without other processes' share of the cores),
"faiss p50" the bare ``index.search`` part and "2thr p50" the whole call on two faiss
threads. Recall@100 is ``ann_recall`` against exact search over the same items. Memory is
the serialised index size.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from service.index import index_params, search_fused, set_faiss_threads
from service.index_build import IndexSpec, ann_recall, build_index

DIM = 64
LAUNCHERS = 4
TOP_K = 200
RECALL_K = 100


@dataclass
class Row:
    size: int
    kind: str
    params: str
    build_s: float
    memory_mb: float
    recall: float
    p50_ms: float
    p99_ms: float
    cpu_p50_ms: float
    faiss_p50_ms: float
    p50_2thr_ms: float


def make_data(n: int, users: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Items (n, D) and launcher queries (users, M, D), float32."""
    rng = np.random.default_rng(seed)
    clusters = max(32, n // 1000)
    centres = rng.standard_normal((clusters, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    items = np.empty((n, DIM), np.float32)
    for start in range(0, n, 200_000):  # chunks bound the temporaries at 1M
        c = min(200_000, n - start)
        x = centres[rng.integers(0, clusters, c)]
        x += rng.standard_normal((c, DIM), dtype=np.float32) / np.sqrt(DIM)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        items[start:start + c] = x * rng.lognormal(0.0, 0.25, (c, 1)).astype(np.float32)
    q = centres[rng.integers(0, clusters, (users, LAUNCHERS))]  # (U, M, D)
    q = q + rng.standard_normal(q.shape, dtype=np.float32) / np.sqrt(DIM)
    q /= np.linalg.norm(q, axis=2, keepdims=True)
    return items, q.astype(np.float32)


def time_calls(fn: Callable[[np.ndarray], object],
               users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Wall and calling-thread CPU seconds per fn(user_queries), one call per user (M, D).

    With one faiss thread the search runs in the calling thread, so its CPU time is the cost
    of the call without the time other processes hold the (shared) cores.
    """
    fn(users[0])  # warm-up
    wall, cpu = np.empty(len(users)), np.empty(len(users))
    for i, q in enumerate(users):
        c0, t0 = time.thread_time(), time.perf_counter()
        fn(q)
        wall[i], cpu[i] = time.perf_counter() - t0, time.thread_time() - c0
    return wall, cpu


def measure(size: int, kind: str, index: faiss.Index, build_s: float, items: np.ndarray,
            users: np.ndarray, recall_sample: int) -> Row:
    params = {k: v for k, v in index_params(index).items() if k not in ("kind", "ntotal", "dim")}
    memory_mb = faiss.serialize_index(index).nbytes / 2**20
    set_faiss_threads(2)
    recall = ann_recall(index, items, users, k=RECALL_K, sample=recall_sample, seed=1)
    t2, _ = time_calls(lambda q: search_fused(index, q, TOP_K), users)
    set_faiss_threads(1)
    t1, c1 = time_calls(lambda q: search_fused(index, q, TOP_K), users)
    tf, _ = time_calls(lambda q: index.search(q, TOP_K), users)
    return Row(size, kind, " ".join(f"{k}={v}" for k, v in params.items()), build_s, memory_mb,
               recall, 1e3 * float(np.median(t1)), 1e3 * float(np.percentile(t1, 99)),
               1e3 * float(np.median(c1)), 1e3 * float(np.median(tf)), 1e3 * float(np.median(t2)))


def format_table(rows: list[Row], header: str) -> str:
    cols = ("items", "index", "params", "build s", "mem MB", "recall@100", "p50 ms", "p99 ms",
            "cpu p50", "faiss p50", "2thr p50")
    cells = [[f"{r.size:,}", r.kind, r.params, f"{r.build_s:.1f}", f"{r.memory_mb:.1f}",
              f"{r.recall:.4f}", f"{r.p50_ms:.3f}", f"{r.p99_ms:.3f}", f"{r.cpu_p50_ms:.3f}",
              f"{r.faiss_p50_ms:.3f}", f"{r.p50_2thr_ms:.3f}"] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = "  ".join(c.rjust(w) if i not in (1, 2) else c.ljust(w)
                     for i, (c, w) in enumerate(zip(cols, widths)))
    out = [header, line, "-" * len(line)]
    for row in cells:
        out.append("  ".join(c.rjust(w) if i not in (1, 2) else c.ljust(w)
                             for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(out)


def plot(rows: list[Row], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for label in sorted({f"{r.kind} {r.params.split(' ')[-1]}" for r in rows}):
        sel = [r for r in rows if f"{r.kind} {r.params.split(' ')[-1]}" == label]
        ax1.plot([r.size for r in sel], [r.p50_ms for r in sel], "o-", label=label)
        ax2.plot([r.size for r in sel], [r.recall for r in sel], "o-", label=label)
    for ax, name in ((ax1, "p50 latency (ms), M=4 x top-200"), (ax2, "recall@100")):
        ax.set_xscale("log")
        ax.set_xlabel("items")
        ax.set_title(name)
    ax1.set_yscale("log")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--repeats", type=int, default=200, help="users timed per index")
    parser.add_argument("--recall-sample", type=int, default=400, help="queries for recall")
    parser.add_argument("--hnsw-max", type=int, default=100_000,
                        help="largest catalogue that also gets an HNSW index (build cost)")
    parser.add_argument("--nprobes", default="32,64,128", help="IVF nprobe values to report")
    parser.add_argument("--png", default=None)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    nprobes = [int(s) for s in args.nprobes.split(",")]

    rows: list[Row] = []
    for size in sizes:
        items, users = make_data(size, args.repeats)
        specs = [IndexSpec(kind="flat"), IndexSpec(kind="ivf")]
        if size <= args.hnsw_max:
            specs.append(IndexSpec(kind="hnsw"))
        for spec in specs:
            set_faiss_threads(2)  # offline build: every core
            t0 = time.perf_counter()
            index = build_index(items, spec)
            build_s = time.perf_counter() - t0
            settings = [0]
            if spec.kind == "ivf":  # nprobe beyond nlist would repeat the nprobe = nlist row
                settings = [p for p in nprobes if p < index.nlist] or [index.nlist]
            for nprobe in settings:
                if spec.kind == "ivf":
                    index.nprobe = nprobe
                row = measure(size, spec.kind, index, build_s, items, users, args.recall_sample)
                rows.append(row)
                print(format_table([row], "").splitlines()[-1], file=sys.stderr, flush=True)
            del index

    header = (f"faiss {faiss.__version__}, D={DIM}, M={LAUNCHERS} launchers x top-{TOP_K}, "
              f"single user, {args.repeats} repeats, 1 faiss thread unless noted; "
              f"build on 2 threads; HNSW only up to {args.hnsw_max:,} items; "
              f"load average at end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(format_table(rows, header))
    if args.png:
        plot(rows, args.png)


if __name__ == "__main__":
    main()
