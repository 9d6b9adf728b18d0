"""Which validation signal should end the demo's retriever training (issue 22)?

The demo's retriever is trained without each user's last H training items (the rankers' tail
lists), so besides the validation item those H positions are out of sample for it too. This
script trains the demo's retriever past its usual stop and records, every epoch, NDCG@10 on the
validation item, on the H tail positions, on both together, and on the test item; then replays
early stopping (patience P) on each signal over that one trajectory and prints the test NDCG@10
of the epoch each would have kept.

    python benchmarks/quality/stopping_signal.py --data movielens:../shared/data/ml-100k --seed 0 --epochs 100
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from models.sasrec import SASRecConfig
from recsys_cli.commands.common import DEMO_DROPOUT, DEMO_LR
from training.data.sources import load
from training.data.splits import LeaveOneOut, pad_left
from training.eval.metrics import Scorer, mask_seen, target_ranks
from training.stages.prerank.folds import tail_holdout
from training.stages.retrieval import train as rt
from training.stages.retrieval.budget import encoder_maxlen


def tail_positions(split: LeaveOneOut) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, ends, users) of every held-out tail position: history = items[start:end], target = items[end]."""
    ds = split.dataset
    full, kept = split.full_train_lengths(), split.train_lengths()
    starts, ends, users = [], [], []
    for u in split.eval_users:
        for p in range(int(kept[u]), int(full[u])):
            starts.append(ds.offsets[u])
            ends.append(ds.offsets[u] + p)
            users.append(u)
    return np.array(starts), np.array(ends), np.array(users)


def ndcg_per_row(scores: np.ndarray, hist: np.ndarray, targets: np.ndarray) -> np.ndarray:
    mask_seen(scores, hist)
    r = target_ranks(scores, targets)
    return np.where(r < 10, 1.0 / np.log2(r + 2.0), 0.0)


def replay(trajectory: list[dict], signal: str, patience: int) -> dict:
    best, best_epoch = -1.0, 0
    for row in trajectory:
        if row[signal] > best:
            best, best_epoch = row[signal], row["epoch"]
        elif row["epoch"] - best_epoch >= patience:
            break
    kept = trajectory[best_epoch - 1]
    return {"signal": signal, "patience": patience, "epoch": best_epoch, "stopped": row["epoch"], "test": kept["test"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="synthetic")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--out", default=None, help="write the trajectory as JSON here")
    args = ap.parse_args()
    ds = load(args.data)
    full = LeaveOneOut(ds)
    holdout = tail_holdout(full)
    split = LeaveOneOut(ds, holdout=holdout)
    cfg = SASRecConfig(num_items=ds.num_items, dropout=DEMO_DROPOUT, num_launchers=1, maxlen=encoder_maxlen(full))
    starts, ends, users = tail_positions(split)
    tail_hist = pad_left(ds.items, starts, ends, None)  # whole histories: seen items are masked; the scorer reads the last maxlen
    tail_targets = ds.items[ends]
    user_index = {int(u): k for k, u in enumerate(split.eval_users)}
    tail_user = np.array([user_index[int(u)] for u in users])
    valid_hist, valid_t = split.histories("valid"), split.targets("valid")
    test_hist, test_t = split.histories("test"), split.targets("test")
    print(f"{args.data}: H = {holdout}, maxlen {cfg.maxlen}, {tail_targets.size} tail positions, "
          f"{valid_t.size} validation users", flush=True)
    trajectory: list[dict] = []
    original = rt.stopping_ndcg10

    def recording(scorer: Scorer, sp: LeaveOneOut) -> float:
        v = ndcg_per_row(np.array(scorer(valid_hist)), valid_hist, valid_t)
        t = ndcg_per_row(np.array(scorer(tail_hist)), tail_hist, tail_targets)
        test = ndcg_per_row(np.array(scorer(test_hist)), test_hist, test_t)
        per_user_tail = np.bincount(tail_user, weights=t, minlength=v.size) / np.maximum(
            np.bincount(tail_user, minlength=v.size), 1)
        row = {"epoch": len(trajectory) + 1, "valid": round(float(v.mean()), 5), "tail": round(float(t.mean()), 5),
               "valid+tail": round(float((v.sum() + t.sum()) / (v.size + t.size)), 5),
               "user-mean": round(float((v + per_user_tail).mean() / 2), 5), "test": round(float(test.mean()), 5)}
        trajectory.append(row)
        print(json.dumps(row), flush=True)
        return original(scorer, sp)

    rt.stopping_ndcg10 = recording  # what the trainer's early stopping reads, recorded on the way
    tcfg = rt.RetrievalTrainConfig(epochs=args.epochs, lr=DEMO_LR, seed=args.seed, patience=args.epochs)
    rt.train_retrieval(split, cfg, tcfg, progress=False)
    if args.out:
        Path(args.out).write_text(json.dumps(trajectory))
    print(f"{'signal':<12} {'patience':>8} {'kept':>5} {'stopped':>7} {'test NDCG@10':>12}")
    for signal in ("valid", "tail", "valid+tail", "user-mean"):
        for patience in (10, 20):
            r = replay(trajectory, signal, patience)
            print(f"{signal:<12} {patience:>8} {r['epoch']:>5} {r['stopped']:>7} {r['test']:>12.4f}")
    best = max(trajectory, key=lambda row: row["test"])
    print(f"oracle (best test epoch) {best['epoch']}: {best['test']:.4f}")


if __name__ == "__main__":
    main()
