"""Retrieval quality sweep: baselines, plain SASRec and multi-launcher variants.

    python benchmarks/quality/retrieval_sweep.py --data movielens:../shared/data/ml-100k --out runs/sweep

Trains each variant from scratch, or warm-starts the M >= 2 variants from a trained
checkpoint with --init-from (training.stages.retrieval.train.warm_start), or reuses runs/sweep/<variant>/result.json with --resume), evaluates on
the leave-one-out test split with full ranking and seen items removed, prints a table, and
plots NDCG@K against K = 1..100 per variant (PNG).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from models.sasrec import SASRecConfig
from training.eval.baselines import LastItem, Popularity
from training.data.sources import load
from training.data.splits import LeaveOneOut
from training.eval.metrics import KS, ranking_metrics, retrieval_ranks
from training.checkpoints import load_retrieval
from training.report import table, write_json
from training.stages.retrieval.train import (
    RetrievalTrainConfig,
    describe,
    launcher_entropy,
    model_scorer,
    save_checkpoint,
    train_retrieval,
)

COLUMNS = ("HR@1", "HR@10", "HR@50", "HR@100", "NDCG@10", "NDCG@50", "NDCG@100", "Coverage@10", "LauncherEntropy")
VARIANTS = ["sasrec"] + [f"M{m}-{init}" for m in (1, 2, 4, 8) for init in ("copy_last", "independent")]


def parse_variant(name: str) -> tuple[int, str]:
    if name == "sasrec":
        return 0, "copy_last"
    m, init = name[1:].split("-", 1)
    return int(m), init


def ndcg_curve(ranks: np.ndarray, kmax: int = 100) -> list[float]:
    """NDCG@K for K = 1..kmax from zero-based ranks."""
    gain = np.where(ranks < kmax, 1.0 / np.log2(ranks + 2.0), 0.0)
    return [float(np.where(ranks < k, gain, 0.0).mean()) for k in range(1, kmax + 1)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="movielens:../shared/data/ml-100k")
    ap.add_argument("--out", default="runs/sweep")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list from {VARIANTS}")
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--patience", type=int, default=10)
    ap.add_argument("--dropout", type=float, default=0.5)
    ap.add_argument("--max-minutes", type=float, default=None, help="training time cap per variant")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init-from", default=None, help="warm-start multi-launcher variants from this checkpoint")
    ap.add_argument("--resume", action="store_true", help="reuse result.json of variants already run")
    ap.add_argument("--png", default=None, help="plot file (default: OUT/ndcg_at_k.png)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    ds = load(args.data)
    split = LeaveOneOut(ds)
    print(ds.describe(), file=sys.stderr)

    rows: dict[str, dict[str, float]] = {}
    curves: dict[str, list[float]] = {}
    speed: dict[str, dict[str, float]] = {}
    for name, scorer in (("popularity", Popularity(split, "test")), ("last-item", LastItem(split, "test"))):
        ranks, cov = retrieval_ranks(scorer, split, "test", KS, progress=False)
        rows[name] = {**ranking_metrics(ranks), **cov}
        curves[name] = ndcg_curve(ranks)

    for name in filter(None, args.variants.split(",")):
        folder = out / name
        cached = folder / "result.json"
        if args.resume and cached.is_file():
            payload = json.loads(cached.read_text())
        else:
            M, init = parse_variant(name)
            cfg = SASRecConfig(num_items=ds.num_items, dropout=args.dropout, num_launchers=M, launcher_init=init)  # type: ignore[arg-type]
            tcfg = RetrievalTrainConfig(
                epochs=args.epochs, patience=args.patience, seed=args.seed, max_minutes=args.max_minutes
            )
            t0 = time.perf_counter()
            source = load_retrieval(args.init_from, ds, args.data)[0] if args.init_from and M >= 2 else None
            res = train_retrieval(split, cfg, tcfg, progress=False, init_from=source)
            wall = time.perf_counter() - t0
            ranks, cov = retrieval_ranks(model_scorer(res.model), split, "test", KS, progress=False)
            metrics = {**ranking_metrics(ranks), **cov, "LauncherEntropy": launcher_entropy(res.model, split)}
            payload = {
                "variant": name, "data": args.data, "metrics": metrics, "ndcg_curve": ndcg_curve(ranks),
                "training": {**describe(res), "wall_seconds": round(wall, 1)}, "model_config": cfg.to_dict(),
                "init_from": args.init_from if source is not None else None,
            }
            save_checkpoint(folder, res.model, ds, args.data, {"metrics": metrics})
            write_json(cached, payload)
        rows[name] = payload["metrics"]
        curves[name] = payload["ndcg_curve"]
        tr = payload["training"]
        speed[name] = {
            "best_epoch": tr["best_epoch"], "epochs": tr["epochs_run"], "s/epoch": tr["seconds_per_epoch"],
            "seq/s": tr["sequences_per_s"], "wall_s": tr["wall_seconds"],
        }
        print(f"{name}: NDCG@10 {rows[name]['NDCG@10']:.4f} ({tr['epochs_run']} epochs)", file=sys.stderr, flush=True)

    print(table(rows, COLUMNS))
    print()
    print(table(speed, ("best_epoch", "epochs", "s/epoch", "seq/s", "wall_s")).replace(".0000", "     "))
    write_json(out / "summary.json", {"data": args.data, "rows": rows, "speed": speed})

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    ks = np.arange(1, 101)
    for name, curve in curves.items():
        style = "--" if name in ("popularity", "last-item") else "-"
        ax.plot(ks, curve, style, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("K")
    ax.set_ylabel("NDCG@K (test)")
    ax.set_title(f"NDCG@K by variant: {args.data}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    png = Path(args.png) if args.png else out / "ndcg_at_k.png"
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"plot: {png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
