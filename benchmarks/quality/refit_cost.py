"""Seconds of the pair prior's refit (training/stages/prerank/train.py refit_prior) on a fixed
synthetic set of ranking lists, for one checkout of the code (issue 22, results section 18).

    python benchmarks/quality/refit_cost.py [--code DIR] [--steps 100] [--users 8000] [--items 2000]

Builds the lists of an untrained one-launcher encoder merged with the item-to-item route
(`synthetic:users=U,items=I`, 100 candidates per list) and an untrained IntTower, then times one
refit_prior with `prior_steps` = --steps, on torch's 2 threads. --code imports the product from
another checkout (e.g. a `git worktree` of an older commit), so two versions are compared on the same
lists; the printed step count, gain and validation NDCG@10 must agree when a change is meant to be
speed only. Run the two alternately on an otherwise idle machine and compare ratios.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--code", default=str(Path(__file__).resolve().parents[2]), help="checkout to import the product from")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--users", type=int, default=8000)
    ap.add_argument("--items", type=int, default=2000)
    args = ap.parse_args()
    sys.path.insert(0, args.code)
    import torch

    from models.cascade import PairPrior
    from models.sasrec import MultiLauncherSASRec, SASRecConfig
    from training.data.sources import load
    from training.data.splits import LeaveOneOut
    from training.stages.prerank import train as pr
    from training.stages.prerank.data import Retrievers, build_next_item_data, retrieval_prior

    torch.set_num_threads(2)
    ds = load(f"synthetic:users={args.users},items={args.items},seed=0")
    loo = LeaveOneOut(ds)
    torch.manual_seed(1)
    encoder = MultiLauncherSASRec(SASRecConfig(num_items=ds.num_items, maxlen=20, dim=16, num_blocks=1, num_launchers=1))
    data = build_next_item_data(ds, loo, None, history_len=10, candidates=100, max_train_examples=args.users,
                                retrievers=Retrievers(encoder, encoder))
    tower = pr.build_model("inttower", data.spec, hidden=(16, 8), heads=2, head_dim=4, embed_dim=8)
    prior = retrieval_prior(data)
    assert data.train_lists is not None and isinstance(prior, PairPrior)
    started = time.perf_counter()
    got = pr.refit_prior(tower, prior, data, pr.TrainConfig(prior_steps=args.steps))
    print(f"{args.code}: {data.train_lists.items.shape[0]} lists x {data.train_lists.items.shape[1]} candidates, "
          f"refit {time.perf_counter() - started:.1f}s; steps kept {got['step']}, gain {got['gain']:.6f}, "
          f"valid NDCG@10 {got['valid_NDCG@10']:.6f}")


if __name__ == "__main__":
    main()
