"""Sequence diagnostics (reference: markovian-next-item.md).

How much does a trained model depend on order, and on anything beyond the last item?
- last-item embedding baseline: s(u, i) = <e_last, e_i> with the model's own item embeddings;
- history shuffle: all items but the last shuffled at test time, no retraining;
- maxlen sweep: the history cut to its last k items at test time, no retraining.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from training.checkpoints import RetrievalModel
from training.eval.baselines import LastItem, Popularity
from training.data.splits import LeaveOneOut
from training.eval.metrics import KS, Scorer, evaluate_retrieval
from training.stages.retrieval.train import model_scorer

MAXLEN_SWEEP = (1, 2, 5, 10, 20, 50)


def shuffle_history(histories: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Shuffle each row's real items except the last; left padding stays in place."""
    out = histories.copy()
    for row in out:
        real = np.flatnonzero(row[:-1])
        row[real] = row[rng.permutation(real)]
    return out


def _truncated(scorer: Scorer, k: int, histories: np.ndarray) -> np.ndarray:
    return scorer(truncate_history(histories, k))


def truncate_history(histories: np.ndarray, k: int) -> np.ndarray:
    """Keep only the last k items of each row (the rest becomes padding)."""
    out = histories.copy()
    out[:, : max(out.shape[1] - k, 0)] = 0
    return out


def last_item_embedding_scorer(model: RetrievalModel) -> Scorer:
    items = model.item_embedding.weight.detach()  # (N + 1, D)

    def score(histories: np.ndarray) -> np.ndarray:
        last = torch.from_numpy(histories[:, -1])
        return (items[last] @ items.T).numpy()

    return score


def diagnose(model: RetrievalModel, split: LeaveOneOut, seed: int = 0) -> dict[str, dict[str, float]]:
    """Rows of test metrics keyed by variant name."""
    base = model_scorer(model)
    rng = np.random.default_rng(seed)

    def run(scorer: Scorer) -> dict[str, float]:
        return evaluate_retrieval(scorer, split, "test", KS, progress=False)

    rows: dict[str, dict[str, float]] = {"model": run(base)}
    rows["model, history shuffled (last kept)"] = run(lambda h: base(shuffle_history(h, rng)))
    for k in MAXLEN_SWEEP:
        if k < model.config.maxlen:
            rows[f"model, last {k} item(s) only"] = run(functools.partial(_truncated, base, k))
    rows["last-item  <e_last, e_i>"] = run(last_item_embedding_scorer(model))
    rows["last-item  transitions"] = run(LastItem(split, "test"))
    rows["popularity"] = run(Popularity(split, "test"))
    return rows
