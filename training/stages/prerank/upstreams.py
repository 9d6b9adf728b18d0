"""The retrievers that make the rankers' training lists, loaded once (the schemes:
training/stages/prerank/folds.py).

`--upstream DIR` is either one retriever (in-sample, or trained with `--holdout H`) or a K-fold
set (`recsys train retrieval --folds K`: DIR/fold-k/ for k < K and DIR/folds.json). A K-fold
set's retrievers are K independent trainings: each is wrapped in AlignedRetriever, which gives
its user vectors and item table in the served retriever's basis (orthogonal Procrustes on the
item tables), so the vectors the rankers read as features mean what the served ones mean.
An orthogonal map keeps every dot product, so each fold's scores, and so its lists, are its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import torch
from torch import nn

from training.checkpoints import CheckpointError, RetrievalModel, load_retrieval
from training.data.dataset import Dataset
from training.stages.prerank.folds import FoldMap, RankingData, fold_dir, is_fold_set

T = TypeVar("T")


def procrustes(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(D, D) orthogonal R minimising ||source R - target||_F over rows (N, D) (Schönemann 1966:
    R = U V^T for U S V^T = svd(source^T target))."""
    u, _, vt = np.linalg.svd(source.astype(np.float64).T @ target.astype(np.float64))
    return (u @ vt).astype(np.float32)


class AlignedRetriever(nn.Module):
    """A retriever seen through an orthogonal map R (D, D): encode_user (B, M, D) -> · R, item table
    (N + 1, D) -> · R. What fused_top and the pre-rank item heads read (config, item_embedding,
    encode_user, item_embeddings); its scores equal the wrapped model's."""

    def __init__(self, model: RetrievalModel, rotation: np.ndarray) -> None:
        super().__init__()
        self.inner = model
        self.config = model.config
        R = torch.from_numpy(np.ascontiguousarray(rotation, dtype=np.float32))
        self.rotation: torch.Tensor
        self.register_buffer("rotation", R)
        with torch.no_grad():
            table = model.item_embedding.weight @ R  # (N + 1, D); row 0 stays zero
        self.item_embedding = nn.Embedding.from_pretrained(table, freeze=True, padding_idx=0)

    def encode_user(self, item_seq: torch.Tensor) -> torch.Tensor:
        return self.inner.encode_user(item_seq) @ self.rotation  # (B, M, D)

    def item_embeddings(self) -> torch.Tensor:
        return self.item_embedding.weight[1:]


@dataclass(eq=False)
class UpstreamSet:
    """The retrievers of the rankers' training lists: models[fold_of_user[u]] makes user u's lists.

    ranking: the scheme; holdout: a single retriever's --holdout (0 for in-sample and K-fold);
    held_out: per model, the external user ids its checkpoint says it never trained on (K-fold);
    residual: per model, ||T_k R_k - T_served||_F / ||T_served||_F of its alignment (K-fold)."""

    models: list[RetrievalModel]
    fold_of_user: np.ndarray
    ranking: RankingData
    holdout: int
    source: str
    held_out: list[frozenset[str]]
    residual: list[float]

    @property
    def folds(self) -> int:
        return len(self.models) if self.ranking == "kfold" else 0

    def describe(self) -> dict[str, Any]:
        """What the rankers' checkpoints record about where their lists came from."""
        out: dict[str, Any] = {"ranking_data": self.ranking, "upstream": self.source, "holdout": self.holdout}
        if self.ranking == "kfold":
            out.update(folds=self.folds, alignment_residual=[round(r, 4) for r in self.residual])
        return out


def load_upstreams(path: str | Path, ds: Dataset, data_spec: str | None, served: RetrievalModel,
                   align: bool = True) -> UpstreamSet:
    """The upstream folder as an UpstreamSet (FileNotFoundError / DataError / CheckpointError name
    the bad file; CheckpointError for a fold whose checkpoint does not record its held-out users
    or disagrees with the fold map). align=False keeps each fold's own basis (the measurement of
    what the alignment is worth: benchmarks/quality/kfold_alignment.py)."""
    if not is_fold_set(path):
        model, ckpt = load_retrieval(path, ds, data_spec)
        holdout = int(ckpt.extra.get("holdout") or 0)
        scheme: RankingData = ("tail" if holdout and ckpt.extra.get("ranking_data") == "tail"
                               else "holdout" if holdout else "in-sample")
        return UpstreamSet([model], np.zeros(ds.num_users, dtype=np.int64), scheme, holdout, str(path),
                           [frozenset()], [])
    fmap = FoldMap.load(path, ds)
    target = served.item_embedding.weight.detach().numpy()[1:]  # (N, D)
    models: list[RetrievalModel] = []
    held: list[frozenset[str]] = []
    residual: list[float] = []
    for k in range(fmap.folds):
        model, ckpt = load_retrieval(fold_dir(path, k), ds, data_spec)
        recorded = frozenset(str(u) for u in ckpt.extra.get("held_out_users") or ())
        if ckpt.extra.get("fold") != k or recorded != frozenset(fmap.users_of(ds, k)):
            raise CheckpointError(f"{ckpt.path}: not fold {k} of {path} (its recorded fold or held-out users "
                                  "differ from the fold map)")
        source = model.item_embedding.weight.detach().numpy()[1:]
        R = procrustes(source, target) if align else np.eye(source.shape[1], dtype=np.float32)
        residual.append(float(np.linalg.norm(source @ R - target)) / max(float(np.linalg.norm(target)), 1e-12))
        models.append(cast(RetrievalModel, AlignedRetriever(model, R).eval()))
        held.append(recorded)
    return UpstreamSet(models, fmap.fold_of_user, "kfold", 0, str(path), held, residual)


def by_fold(fold_of_rows: np.ndarray, folds: int, make: Callable[[int, np.ndarray], T]) -> T:
    """make(k, rows of fold k) for each fold with rows, reassembled in the rows' order: every field
    of the dataclass `make` returns is an array whose first axis is its rows."""
    order = np.arange(fold_of_rows.size)
    parts = [(sel, make(k, sel)) for k in range(max(folds, 1)) if (sel := order[fold_of_rows == k]).size]
    if not parts:
        return make(0, order)
    first = parts[0][1]
    assert is_dataclass(first) and not isinstance(first, type), type(first)
    out: dict[str, np.ndarray | None] = {}
    for f in fields(first):
        proto = getattr(first, f.name)
        if proto is None:  # an optional field every part leaves out (e.g. Ranked.pair without pair features)
            out[f.name] = None
            continue
        arr = np.empty((order.size, *proto.shape[1:]), dtype=proto.dtype)
        for sel, part in parts:
            arr[sel] = getattr(part, f.name)
        out[f.name] = arr
    return cast(T, type(first)(**out))


def train_fold_set(ds: Dataset, data_spec: str, out: str | Path, fmap: FoldMap,
                   train: Callable[[int, Any], Any], extra: dict[str, Any] | None = None) -> list[Any]:
    """K fold retrievers: train(k, split) trains on fmap.split(ds, k) (every user but fold k's) and
    returns a training.stages.retrieval.train.TrainResult; each is saved to out/fold-k with the
    users it never trained on (`held_out_users`, what load_upstreams checks), then the fold map.
    Returns the K results."""
    from training.stages.retrieval.train import save_checkpoint

    results = []
    for k in range(fmap.folds):
        res = train(k, fmap.split(ds, k))
        save_checkpoint(fold_dir(out, k), res.model, ds, data_spec,
                        {**(extra or {}), "ranking_data": "kfold", "fold": k, "folds": fmap.folds,
                         "fold_seed": fmap.seed, "holdout": 0, "held_out_users": fmap.users_of(ds, k)})
        results.append(res)
    fmap.save(out, ds)
    return results
