"""Publish a briefly trained artifact version for the serving benchmarks.

    python benchmarks/serving/serving_artifacts.py --data SPEC --out DIR [--minutes 2] [--negatives 0]

Runs the same CLI steps a user would (`recsys train retrieval | prerank | rerank`, then
`recsys export`) with small budgets, so latency can be measured on catalogs of any size: the
request path's cost depends on the catalog size and model shapes, not on how well the weights
were trained. Large catalogs use a sampled softmax (--negatives K) because the full softmax
over 100k+ items does not fit a 2-core budget. Each step's wall time is printed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from recsys_cli.main import main as cli


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True, help="work folder: checkpoints in OUT/runs, versions in OUT/artifacts")
    ap.add_argument("--minutes", type=float, default=2.0, help="retrieval training budget")
    ap.add_argument("--negatives", type=int, default=0, help="retrieval sampled-softmax negatives (0 = full)")
    ap.add_argument("--launchers", type=int, default=2)
    ap.add_argument("--prerank-examples", type=int, default=20000, help="pre-rank training examples (subsample)")
    ap.add_argument("--epochs", type=int, default=2, help="pre-rank and re-rank epochs")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    runs = Path(args.out) / "runs"
    threads = ["--threads", str(args.threads)]
    steps = [
        ["train", "retrieval", "--data", args.data, "--out", str(runs / "retrieval"), "--launchers",
         str(args.launchers), "--dropout", "0.2", "--lr", "2e-3", "--max-minutes", str(args.minutes), "--patience",
         "3", "--num-negatives", str(args.negatives), "--quiet", *threads],
        ["train", "prerank", "--data", args.data, "--model", "inttower", "--objective", "next-item", "--retrieval",
         str(runs / "retrieval"), "--out", str(runs / "prerank"), "--epochs", str(args.epochs),
         "--max-train-examples", str(args.prerank_examples), *threads],
        ["train", "rerank", "--data", args.data, "--retrieval", str(runs / "retrieval"), "--prerank",
         str(runs / "prerank"), "--out", str(runs / "rerank"), "--epochs", str(args.epochs), "--lists-per-user", "1",
         *threads],
        ["export", "--data", args.data, "--retrieval", str(runs / "retrieval"), "--prerank", str(runs / "prerank"),
         "--rerank", str(runs / "rerank"), "--out", str(Path(args.out) / "artifacts"), "--no-regression-check",
         *threads],
    ]
    for step in steps:
        print(f"\n$ recsys {' '.join(step)}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        code = cli(step)
        print(f"[{step[0]} {step[1]}] {time.perf_counter() - t0:.1f}s (exit {code})", file=sys.stderr, flush=True)
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
