"""Slate oracle: can a re-ranker learn a click that depends on the whole candidate list?

    python benchmarks/quality/rerank_slate_oracle.py [--seeds 0,1,2] [--train 20000] [--list-shift 0 --list-scale 0] [--no-wide]

About 10 CPU-minutes on one thread with MLP-wide, 7.5 without (--no-wide); wall time is longer
on a shared machine.

Data: training.stages.rerank.train.slate_oracle (one fixed value model, oracle_seed 0): the clicked item is
argmax_i <c, x_i> with c a fixed random function of [user ; mean, std, max of the list]. Each
seed draws its own train / valid / test lists and model initialisation. Models see the same
inputs: item features, PV = the user features, init_score = a noisy pointwise pre-rank score.
- PRM        transformer over the list, with PV and initial-rank embedding
- PRM-BASE   the same without PV (no user information)
- MLP        pointwise MLP (128, 64) on [item ; PV ; init_score]: user, but no list context
- MLP-wide   the same, (256, 256, 128): more parameters than PRM, to rule out capacity
- unchanged  the pre-ranker's order
Metrics on the test lists: slate accuracy (top-1 is the clicked item), NDCG@5, NDCG@10;
mean +- std over seeds. Dropout is 0 for every model: on CPU the dropout masks cost ~30 % of a
PRM step, and early stopping on validation NDCG@10 is the regulariser here.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from models.prm import PRM, PointwiseMLP, PointwiseMLPConfig, PRMConfig, RerankModel
from training.stages.rerank.train import RerankTrainConfig, evaluate_lists, score_lists, slate_oracle, train_listwise, unchanged_scores
from training.report import save_benchmark

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = ("slate_acc", "NDCG@5", "NDCG@10")


def build(name: str, item_dim: int, user_dim: int, list_len: int) -> RerankModel:
    if name.startswith("MLP"):
        hidden = (256, 256, 128) if name == "MLP-wide" else (128, 64)
        return PointwiseMLP(PointwiseMLPConfig(item_dim, user_dim, hidden=hidden, dropout=0.0, max_len=list_len))
    pv = user_dim if name == "PRM" else 0
    return PRM(PRMConfig(item_dim, pv, d_model=64, heads=2, layers=2, ffn_dim=128, dropout=0.0, max_len=list_len))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--train", type=int, default=20000)
    ap.add_argument("--valid", type=int, default=2000)
    ap.add_argument("--test", type=int, default=5000)
    ap.add_argument("--list-len", type=int, default=30)
    ap.add_argument("--item-dim", type=int, default=10)
    ap.add_argument("--user-dim", type=int, default=7)
    ap.add_argument("--list-shift", type=float, default=1.0)
    ap.add_argument("--list-scale", type=float, default=0.5)
    ap.add_argument("--noise", type=float, default=1.0)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--patience", type=int, default=3)
    ap.add_argument("--no-wide", action="store_true", help="skip MLP-wide (saves about a quarter of the run)")
    ap.add_argument("--out", default=str(RESULTS / "rerank_slate_oracle.txt"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    L, F, U = args.list_len, args.item_dim, args.user_dim
    oracle = dict(noise=args.noise, list_shift=args.list_shift, list_scale=args.list_scale)
    names = ("PRM", "PRM-BASE", "MLP", "unchanged") if args.no_wide else ("PRM", "PRM-BASE", "MLP", "MLP-wide", "unchanged")
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    seeds = [int(s) for s in args.seeds.split(",")]
    for seed in seeds:
        # disjoint data seeds per split and per run; the value model (oracle_seed 0) is shared
        train = slate_oracle(args.train, L, F, U, seed=1000 * seed + 1, **oracle)
        valid = slate_oracle(args.valid, L, F, U, seed=1000 * seed + 2, **oracle)
        test = slate_oracle(args.test, L, F, U, seed=1000 * seed + 3, **oracle)
        runs["unchanged"].append(evaluate_lists(unchanged_scores(test), test))
        for name in names[:-1]:
            torch.manual_seed(seed)
            model = build(name, F, U, L)
            cfg = RerankTrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                    patience=args.patience, seed=seed)
            t0 = time.perf_counter()
            result = train_listwise(model, train, cfg, valid, progress=False)
            m = evaluate_lists(score_lists(model, test), test)
            m["train_s"] = time.perf_counter() - t0
            m["best_epoch"] = result.best_epoch
            m["params"] = sum(p.numel() for p in model.parameters())
            runs[name].append(m)
            print(f"seed {seed} {name}: slate acc {m['slate_acc']:.4f} NDCG@10 {m['NDCG@10']:.4f} "
                  f"(best epoch {result.best_epoch}, {m['train_s']:.0f}s)", file=sys.stderr, flush=True)

    head = f"{'model':<10}  " + "  ".join(f"{c:>17}" for c in METRICS) + f"  {'params':>7}  {'epochs':>6}  {'train s':>7}"
    lines = [head, "-" * len(head)]
    for name in names:
        cells = []
        for c in METRICS:
            v = np.array([r[c] for r in runs[name]])
            cells.append(f"{v.mean():.4f} +- {v.std():.4f}".rjust(17))
        extra = ["-".rjust(7), "-".rjust(6), "-".rjust(7)]
        if name != "unchanged":
            r0 = runs[name]
            extra = [str(int(r0[0]["params"])).rjust(7), f"{np.mean([r['best_epoch'] for r in r0]):.1f}".rjust(6),
                     f"{np.mean([r['train_s'] for r in r0]):.0f}".rjust(7)]
        lines.append(f"{name:<10}  " + "  ".join(cells) + "  " + "  ".join(extra))
    setting = (
        f"slate oracle: L={L}, item_dim={F}, user_dim={U}, list_shift={args.list_shift}, "
        f"list_scale={args.list_scale}, noise={args.noise}; train/valid/test lists "
        f"{args.train}/{args.valid}/{args.test}; seeds {args.seeds} (std over seeds, ddof 0)\n"
        f"training: AdamW lr {args.lr}, batch {args.batch_size}, <= {args.epochs} epochs, early stopping on "
        f"valid NDCG@10 (patience {args.patience}), dropout 0, 1 thread; chance slate acc = {1 / L:.4f}\n"
        f"epochs = mean best epoch; train s = mean wall seconds per run (shared 2-core machine)"
    )
    text = setting + "\n\n" + "\n".join(lines) + f"\n\ntotal {time.perf_counter() - started:.0f} s\n"
    print(text)
    if args.out:
        save_benchmark(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
