"""Do the upstream retrievers' vectors mean, in the served basis, what they meant in their own?

    python benchmarks/quality/kfold_alignment.py --data movielens:../shared/data/ml-100k \
        --retrieval RUNS/retrieval --upstream RUNS/upstream [--rows 2000]

The pre-ranker reads the retriever's user vectors (RETRIEVAL_USER) against the served item table
(RETRIEVAL_ITEM; its prior scores <u, e_i> with the served table in training: train_table). A
training row's user vector comes from the upstream that made its list. This prints, over sampled
pre-rank training rows (the scheme's own rows), how well <u_upstream, e_served(i)> reproduces the
upstream's own scores <u_upstream, e_upstream(i)> on the row's top-50 candidates: the mean
per-row Pearson and Spearman correlation and the share of rows whose top-10 by the cross score
keeps the upstream's top 1. For a K-fold upstream (--upstream holding folds.json) both without and
with the orthogonal alignment (training/stages/prerank/upstreams.py); for one upstream (the
H-fold's, continued into the served one) as it is. Seconds on 2 cores.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from training.checkpoints import load_retrieval
from training.data.sources import load
from training.data.splits import LeaveOneOut, pad_left
from training.stages.prerank.folds import is_fold_set
from training.stages.prerank.upstreams import UpstreamSet, by_fold, load_upstreams
from training.stages.retrieval.train import FusedTop, fused_top

TOP = 50


def ranks(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x, axis=1), axis=1).astype(np.float64)


def rowcorr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    return (a * b).sum(axis=1) / np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1) + 1e-12)


def measure(ups: UpstreamSet, served_table: np.ndarray, ds: object, rows: np.ndarray) -> dict[str, float]:
    users = ds.users[rows]  # type: ignore[attr-defined]

    def top(k: int, sel: np.ndarray) -> FusedTop:
        r = rows[sel]
        hist = pad_left(ds.items, ds.offsets[ds.users[r]], r, None)  # type: ignore[attr-defined]
        return fused_top(ups.models[k], hist, TOP)

    t = by_fold(ups.fold_of_user[users], len(ups.models), top)
    own = t.scores  # (B, TOP) the upstream's own fused scores
    cross = np.einsum("bmd,bkd->bkm", t.users, served_table[t.items]).max(axis=-1)  # (B, TOP)
    keep = (np.argsort(-cross, axis=1)[:, :10] == 0).any(axis=1)  # own top 1 (column 0) in the cross top 10
    return {"pearson": float(rowcorr(own, cross).mean()), "spearman": float(rowcorr(ranks(own), ranks(cross)).mean()),
            "top1_in_top10": float(keep.mean())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--retrieval", required=True, help="the served retriever")
    ap.add_argument("--upstream", required=True, help="one upstream retriever or a K-fold set")
    ap.add_argument("--rows", type=int, default=2000, help="pre-rank training rows sampled")
    a = ap.parse_args()
    torch.set_num_threads(1)
    ds = load(a.data)
    loo = LeaveOneOut(ds)
    served, _ = load_retrieval(a.retrieval, ds, a.data)
    table = served.item_embedding.weight.detach().numpy()
    print(f"# python {' '.join(sys.argv)}")
    print(f"{'upstream':28s} {'residual':>9s} {'pearson':>8s} {'spearman':>9s} {'top1_in_top10':>14s}")
    variants = [("kfold, own bases", False), ("kfold, aligned", True)] if is_fold_set(a.upstream) else [("one", True)]
    for name, align in variants:
        ups = load_upstreams(a.upstream, ds, a.data, served, align=align)
        pos = np.arange(ds.num_interactions) - ds.offsets[ds.users]
        rows = np.flatnonzero(loo.full_train_mask() & (pos >= 1))
        rows = np.sort(np.random.default_rng(0).choice(rows, min(a.rows, rows.size), replace=False))
        m = measure(ups, table, ds, rows)
        if ups.residual:
            res = f"{np.mean(ups.residual):.4f}"
        else:  # one upstream, as it is: how far the served table moved from its table
            up_table = ups.models[0].item_embedding.weight.detach().numpy()[1:]
            res = f"{np.linalg.norm(up_table - table[1:]) / np.linalg.norm(table[1:]):.4f}"
        print(f"{name:28s} {res:>9s} {m['pearson']:8.4f} {m['spearman']:9.4f} {m['top1_in_top10']:14.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
