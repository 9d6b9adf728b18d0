"""Re-index wall time: `recsys reindex` growing the catalog to 10k, 100k and 1M items, by step.

    python benchmarks/operations/reindex_time.py [--sizes 10000,100000,1000000] [--work DIR] [--max-regression F]

Once (skipped when --work already holds them): train a small pipeline on the synthetic data
(--data, default 2000 users x 1000 items): SASRec (M = 2, D = 64) for --epochs, IntTower
next-item 1 epoch, PRM 1 epoch, and `recsys export` it as v1. Then per size: a fresh copy of
that artifacts root, a generated --catalog file of (size - 1000) new items (a category, 1-3
tags and a price drawn like the synthetic ones; 2% carry a category no trained item has), and
one `recsys reindex` subprocess with the default index choice (exact up to 200k items, IVF
beyond). Reports the wall time of the whole command (interpreter start-up and imports
included) and of each `[step]` line it printed on stderr, the index kind, its recall@100
against exact search, and the gate's catalog NDCG@10 of the live version -> the new one (the
same 1000 test users, full ranking over each catalog). The exit code says whether the version
was published (0) or a check refused it (1).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from training.report import save_benchmark
from service.contract.layout import CURRENT, MANIFEST

RESULTS = Path(__file__).resolve().parent / "results"
STEPS = ("load", "catalog", "embeddings", "onnx", "index", "recall", "prerank", "gate", "write", "prune")
RECSYS = [sys.executable, "-m", "recsys_cli"]
ROOT = Path(__file__).resolve().parents[2]


def sh(args: list[str]) -> subprocess.CompletedProcess[str]:
    print("$ recsys " + " ".join(args[3:]), file=sys.stderr, flush=True)
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode not in (0, 1):
        raise SystemExit(f"failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def train(work: Path, data: str, epochs: int) -> Path:
    """Checkpoints + artifacts root with v1 under `work` (reused when present)."""
    base = work / "base"
    if (base / CURRENT).is_file():
        return base
    for args in (
        ["train", "retrieval", "--data", data, "--out", str(work / "ret"), "--launchers", "2", "--dim", "64",
         "--epochs", str(epochs), "--threads", "2", "--quiet"],
        ["train", "prerank", "--data", data, "--model", "inttower", "--objective", "next-item", "--retrieval",
         str(work / "ret"), "--out", str(work / "pre"), "--epochs", "1", "--threads", "2"],
        ["train", "rerank", "--data", data, "--retrieval", str(work / "ret"), "--prerank", str(work / "pre"),
         "--out", str(work / "re"), "--epochs", "1", "--threads", "2"],
        ["export", "--data", data, "--retrieval", str(work / "ret"), "--prerank", str(work / "pre"),
         "--rerank", str(work / "re"), "--out", str(base), "--version", "v1", "--threads", "2"],
    ):
        if sh([*RECSYS, *args]).returncode:
            raise SystemExit(f"recsys {args[0]} failed")
    return base


def write_catalog(path: Path, n_new: int, seed: int = 0) -> None:
    """n_new items "new-<i>" with synthetic-like features, written in 100k-line blocks."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for start in range(0, n_new, 100_000):
            n = min(100_000, n_new - start)
            cats = rng.integers(0, 20, n)
            fresh = rng.random(n) < 0.02
            ntags = rng.integers(1, 4, n)
            tags = rng.integers(0, 60, (n, 3))
            price = np.exp(rng.uniform(2, 5, n))
            lines = []
            for j in range(n):
                cat = f"new-cat{cats[j]}" if fresh[j] else f"cat{cats[j]}"
                feats = {"category": cat, "tags": [f"tag{t}" for t in tags[j, : ntags[j]]], "price": round(float(price[j]), 2)}
                lines.append(json.dumps({"item_id": f"new-{start + j}", "features": feats}))
            f.write("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--data", default="synthetic:users=2000,items=1000,seed=0")
    ap.add_argument("--epochs", type=int, default=3, help="SASRec epochs")
    ap.add_argument("--work", default="/tmp/recsys-reindex-bench", help="checkpoints, catalogs and artifacts")
    ap.add_argument("--max-regression", type=float, default=None, help="passed to reindex (default: its own)")
    ap.add_argument("--out", default=str(RESULTS / "reindex_time.txt"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base = train(work, args.data, args.epochs)
    n_trained = json.loads((base / "v1" / MANIFEST).read_text())["item_count"]

    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        catalog = work / f"catalog-{size}.jsonl"
        if not catalog.is_file():
            write_catalog(catalog, size - n_trained)
        root = work / f"artifacts-{size}"
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(base, root)
        cmd = [*RECSYS, "reindex", "--artifacts", str(root), "--catalog", str(catalog), "--version", "v2"]
        if args.max_regression is not None:
            cmd += ["--max-regression", str(args.max_regression)]
        t0 = time.perf_counter()
        proc = sh(cmd)
        wall = time.perf_counter() - t0
        steps = {m[1]: float(m[2]) for m in re.finditer(r"^\[([a-z]+)\] ([0-9.]+)s$", proc.stderr, re.M)}
        row = {"items": size, "exit": proc.returncode, "wall": wall, **{s: steps.get(s) for s in STEPS}}
        mpath = root / "v2" / MANIFEST
        if mpath.is_file():
            m = json.loads(mpath.read_text())
            reg = m["checks"]["regression"]
            idx = m["index"]
            tuned = idx.get("nprobe_tuned")
            nprobe = "-" if "nprobe" not in idx else f"{tuned['from']}->{idx['nprobe']}" if tuned else str(idx["nprobe"])
            row.update(kind=idx["kind"], nprobe=nprobe, ann_recall=f"{idx['recall']:.4f}", live=reg.get("live"),
                       new=reg.get("new"))
        else:
            reason = proc.stderr.strip().splitlines()[-1]
            row.update(kind="-", nprobe="-", ann_recall=None, live=None, new=None, reason=reason)
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
        shutil.rmtree(root, ignore_errors=True)  # 1M items: ~1 GB per version

    text = render(rows, args.data, n_trained)
    print(text)
    save_benchmark(args.out, text)
    return 0


def render(rows: list[dict], data: str, n_trained: int) -> str:
    cols = ["items", "exit", "wall", *STEPS, "kind", "nprobe", "ann_recall", "NDCG@10 live->new"]
    head = "  ".join(f"{c:>10s}" if c != "NDCG@10 live->new" else c for c in cols)

    def fmt(v: object) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.2f}" if v >= 1 or v == 0 else f"{v:.3f}"
        return str(v)

    lines = [f"recsys reindex wall time (s) by step; trained on {data} ({n_trained} items), 2 shared CPU cores",
             head, "-" * len(head)]
    for r in rows:
        gate = "-" if r.get("live") is None else f"{r['live']:.4f} -> {r['new']:.4f}"
        cells = [fmt(r.get(c)) for c in cols[:-1]]
        lines.append("  ".join(f"{c:>10s}" for c in cells) + "  " + gate)
        if r.get("reason"):
            lines.append(f"    refused: {r['reason']}")
    lines.append("wall = the whole command, interpreter start-up and imports included; steps are its [step] lines;")
    lines.append("ann_recall = index recall@100 against exact search (1000 test users x 2 launchers); nprobe a->b = tuned")
    lines.append("by reindex to reach --min-recall 0.9; NDCG@10 = the gate, full ranking over each catalog, same users.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
