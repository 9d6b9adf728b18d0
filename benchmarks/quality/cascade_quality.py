"""Served-cut quality of the whole cascade over seeds: what `/v1/recommend` returns, cut by cut.

    python benchmarks/quality/cascade_quality.py --data SPEC --out DIR [--seeds 0 1 2] [--holdout 10]
        [--variant fold|insample] [--launchers 1] [--threads 1] [--results FILE]

Per seed it runs the documented CLI recipe, then `recsys evaluate --artifacts` (leave-one-out
test users through service.pipeline.Recommender: ONNX Runtime + FAISS + NumPy):

  fold      recsys train retrieval --holdout H          (the upstream: ranking fold)
            recsys train retrieval --init-from upstream  (served: continued on all the data)
            recsys train prerank --upstream upstream     (out-of-sample lists)
            recsys train rerank --upstream upstream
            recsys export ; recsys evaluate --artifacts
  insample  the fold run's served retriever is its own upstream (--window H: the same
            positions, so only "did the upstream train on the targets" changes)
  insample-all  the same, over every training position (--window 0: 20x the lists of H = 10
            on ml-100k, all in-sample)

Steps whose outputs exist are skipped, so a variant reuses the retrievers of an earlier run and
a seed already evaluated is read back (seeds can run as separate processes, then be tabled).
Prints one table (mean and std over seeds per cut) and writes it, with this command line, to
--results.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CUTS = ("retrieval", "prerank", "rerank")
COLUMNS = ("HR@10", "NDCG@10", "HR@20", "NDCG@20", "NDCG@50", "Coverage@10")


def recsys(args: list[str], log: Path) -> None:
    """One CLI step in its own process (as a user runs it), output to `log`."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run([sys.executable, "-m", "recsys_cli", *args], stdout=f, stderr=subprocess.STDOUT).returncode
    print(f"  recsys {' '.join(args[:2])}: {time.perf_counter() - t0:.0f}s (exit {code})", file=sys.stderr, flush=True)
    if code:
        raise SystemExit(f"step failed, see {log}")


def run_seed(a: argparse.Namespace, seed: int) -> dict:
    root = Path(a.out) / f"s{seed}"
    root.mkdir(parents=True, exist_ok=True)
    base = ["--data", a.data, "--seed", str(seed), "--threads", str(a.threads)]
    ret = ["--launchers", str(a.launchers), "--quiet", *shlex.split(a.retrieval_args)]
    up, served = root / "upstream", root / "retrieval"
    if not (up / "checkpoint.pt").exists():
        recsys(["train", "retrieval", *base, *ret, "--holdout", str(a.holdout), "--out", str(up)], root / "upstream.log")
    if not (served / "checkpoint.pt").exists():
        recsys(["train", "retrieval", *base, *ret, "--init-from", str(up), "--out", str(served)], root / "retrieval.log")
    v = root / (a.variant + (f"-{a.tag}" if a.tag else ""))
    v.mkdir(exist_ok=True)
    if (v / "served.json").exists():  # finished earlier (e.g. seeds run as separate processes)
        return json.loads((v / "served.json").read_text())
    window = {"fold": None, "insample": a.holdout, "insample-all": 0}[a.variant]
    source = ["--upstream", str(up)] if window is None else ["--window", str(window)]
    recsys(["train", "prerank", *base, "--objective", "next-item", "--retrieval", str(served), *source,
            "--out", str(v / "prerank"), *shlex.split(a.prerank_args)], v / "prerank.log")
    recsys(["train", "rerank", *base, "--retrieval", str(served), *source, "--prerank", str(v / "prerank"),
            "--out", str(v / "rerank"), *shlex.split(a.rerank_args)], v / "rerank.log")
    art = v / "artifacts"
    recsys(["export", "--data", a.data, "--threads", str(a.threads), "--retrieval", str(served), "--prerank",
            str(v / "prerank"), "--rerank", str(v / "rerank"), "--out", str(art), "--version", f"s{seed}-{v.name}",
            "--no-regression-check"], v / "export.log")
    recsys(["evaluate", "--artifacts", str(art), "--data", a.data, "--json", str(v / "served.json")], v / "evaluate.log")
    return json.loads((v / "served.json").read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True, help="work folder (one sub-folder per seed)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--holdout", type=int, default=10)
    ap.add_argument("--variant", choices=("fold", "insample", "insample-all"), default="fold")
    ap.add_argument("--launchers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--retrieval-args", default="", help="extra flags for both retrievers, e.g. '--epochs 40'")
    ap.add_argument("--prerank-args", default="", help="extra flags for recsys train prerank, e.g. '--epochs 5'")
    ap.add_argument("--rerank-args", default="", help="extra flags for recsys train rerank, e.g. '--horizon 1'")
    ap.add_argument("--tag", default="", help="suffix of the variant's folder (to keep runs with other flags apart)")
    ap.add_argument("--results", help="also write the table (with this command line) to FILE")
    a = ap.parse_args()

    runs = {}
    for seed in a.seeds:
        print(f"seed {seed}", file=sys.stderr, flush=True)
        runs[seed] = run_seed(a, seed)
    lines = [f"# python {' '.join(shlex.quote(x) for x in sys.argv)}",
             f"# served cuts (recsys evaluate --artifacts, leave-one-out test), variant {a.variant} {a.tag}, "
             f"holdout {a.holdout}, seeds {a.seeds}; mean ± std over seeds",
             f"{'cut':<10} " + " ".join(f"{c:>17}" for c in COLUMNS)]
    for cut in CUTS:
        vals = [[r["cuts"][cut][c] for c in COLUMNS] for r in runs.values() if cut in r["cuts"]]
        if not vals:
            continue
        m, s = np.mean(vals, axis=0), np.std(vals, axis=0)
        lines.append(f"{cut:<10} " + " ".join(f"{x:.4f} ± {y:.4f}".rjust(17) for x, y in zip(m, s)))
    for seed, r in runs.items():
        lines.append(f"seed {seed}: " + ", ".join(f"{cut} NDCG@10 {r['cuts'][cut]['NDCG@10']:.4f}"
                                               for cut in CUTS if cut in r["cuts"])
                     + f"; served stages {r.get('served_stages')}")
    text = "\n".join(lines)
    print(text)
    if a.results:
        Path(a.results).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
