"""Is there a signal a ranker could add to the retriever? Blend its scores with simple ones.

    python benchmarks/quality/score_blends.py --data movielens:../shared/data/ml-100k --retrieval DIR [--other DIR]

Full-ranking leave-one-out NDCG@10 (validation and test) of `s_retrieval + w * signal` for
last-item transition counts (log1p), item popularity (log1p) and, with --other, a second
retriever's scores. A blend that gains on validation and test would be a feature worth giving
the pre-ranker; none that only moves within the standard error (~0.0085 on ml-100k) is.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from training.checkpoints import load_retrieval
from training.stages.retrieval import train as rt
from training.eval.baselines import LastItem, Popularity
from training.data.sources import load
from training.data.splits import LeaveOneOut
from training.eval.metrics import mask_seen, ranking_metrics, target_ranks

WEIGHTS = (0.0, 0.1, 0.2, 0.4)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--retrieval", required=True)
    ap.add_argument("--other", help="a second retrieval checkpoint to blend in")
    a = ap.parse_args()
    torch.set_num_threads(1)
    ds = load(a.data)
    loo = LeaveOneOut(ds)
    model, _ = load_retrieval(a.retrieval, ds, a.data)
    other = load_retrieval(a.other, ds, a.data)[0] if a.other else None
    print(f"# python {' '.join(sys.argv)}")
    print(f"{'signal':<12} {'w':>5} {'valid NDCG@10':>14} {'test NDCG@10':>13}")
    per_split = {}
    for which in ("valid", "test"):
        hist = loo.histories(which)
        base = rt.model_scorer(model)(hist).copy()
        mask_seen(base, hist)
        signals = {"last-item": np.log1p(np.maximum(LastItem(loo, which)(hist), 0)),
                   "popularity": np.log1p(np.asarray(Popularity(loo, which)(hist), np.float32))}
        if other is not None:
            signals["other"] = rt.model_scorer(other)(hist)
        per_split[which] = (base, signals, loo.targets(which))
    for name in per_split["test"][1]:
        for w in WEIGHTS:
            out = []
            for which in ("valid", "test"):
                base, signals, targets = per_split[which]
                out.append(ranking_metrics(target_ranks(base + w * signals[name], targets), (10,))["NDCG@10"])
            print(f"{name:<12} {w:5.2f} {out[0]:14.4f} {out[1]:13.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
