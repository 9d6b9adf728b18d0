"""Data-parallel retrieval training: one process vs `torchrun --nproc_per_node=N` on CPU.

    python benchmarks/operations/torchrun_scaling.py [--data synthetic] [--epochs 20] [--procs 2] [--out FILE]

Runs `recsys train retrieval` once as a plain process and once under torchrun (gloo, DDP), with
the same data, model, seed and global batch, a fixed number of epochs (patience = epochs, so no
early stop) and --threads 1 per process, so N processes use N cores. Reports the median training
seconds per epoch (validation excluded; rank 0's clock), the wall time of the whole command
(start-up, validation and test evaluation included) and the final test NDCG@10 / HR@10. On a
shared machine the timings are noisy: read the ratio, not the absolute figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from training.report import save_benchmark

RESULTS = Path(__file__).resolve().parent / "results"
RECSYS = Path(sys.executable).parent / "recsys"


def train(procs: int, args: argparse.Namespace, out: Path) -> dict[str, float]:
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", "--standalone",
                "--no-python"] if procs > 1 else []
    cmd = [*launcher, str(RECSYS), "train", "retrieval", "--data", args.data, "--epochs", str(args.epochs),
           "--patience", str(args.epochs), "--batch-size", str(args.batch_size), "--threads", "1", "--quiet",
           "--out", str(out), "--json", str(out / "result.json")]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    load = os.getloadavg()[0]  # 1-minute load at the end: > procs means other jobs shared the cores
    payload = json.loads((out / "result.json").read_text())
    history = payload["training"]["history"]
    return {
        "procs": procs,
        "s_per_epoch": statistics.median(e["seconds"] for e in history),
        "wall_s": wall,
        "load": load,
        "NDCG@10": payload["metrics"]["NDCG@10"],
        "HR@10": payload["metrics"]["HR@10"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="synthetic")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=128, help="global batch (split across the ranks)")
    ap.add_argument("--procs", type=int, default=2, help="torchrun --nproc_per_node")
    ap.add_argument("--out", default=str(RESULTS / "torchrun_scaling.txt"), help="results file ('' = none)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for procs in (1, args.procs):
            rows.append(train(procs, args, Path(tmp) / f"p{procs}"))
            print(f"{procs} process(es) done in {rows[-1]['wall_s']:.0f}s", file=sys.stderr, flush=True)
    head = f"{'processes':>9}  {'s/epoch (median)':>16}  {'wall s':>6}  {'NDCG@10':>7}  {'HR@10':>7}  {'load 1m':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['procs']:>9}  {r['s_per_epoch']:>16.2f}  {r['wall_s']:>6.0f}  "
                     f"{r['NDCG@10']:>7.4f}  {r['HR@10']:>7.4f}  {r['load']:>7.2f}")
    setting = (
        f"recsys train retrieval --data {args.data}: default model (M=1, D=64, 2 blocks, maxlen 50, dropout 0.5), "
        f"global batch {args.batch_size}, {args.epochs} epochs, no early stop, --threads 1 per process; "
        f"{args.procs} processes = torchrun --nproc_per_node={args.procs} (gloo, DDP)\n"
        f"s/epoch = median training seconds per epoch on rank 0 (validation excluded); wall s = the whole command; "
        f"load 1m = the machine's 1-minute load average as the run ended ({os.cpu_count()} cores, shared)"
    )
    ratio = rows[0]["s_per_epoch"] / rows[1]["s_per_epoch"]
    text = f"{setting}\n\n" + "\n".join(lines) + f"\n\nspeed-up per epoch ({args.procs} vs 1 process): {ratio:.2f}x\n"
    print(text)
    if args.out:
        save_benchmark(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
