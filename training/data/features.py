"""Pre-ranking feature pipeline: a declared feature spec, fitted on the training rows only.

Kinds of fields (models/layers.py `Fields` is the tensor side of the same contract):
- sparse: one code per row (user_id, item_id, categorical columns). Index 0 = padding,
  1 = OOV (values never seen in the training rows, and the data set's "unknown"),
  2.. = the training vocabulary.
- multi: several codes per row, mean-pooled with a mask (genres, tags, the user's recent
  history items); same indexing, 0 = padding is masked out.
- dense: float, z-scored with the mean / std of the training rows.

Nothing is fitted on validation or test rows: vocabularies, normalisation statistics and the
label aggregates (`label_aggregates`) all come from the rows the model trains on.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np

from models.layers import FieldsConfig
from service.contract.features import (  # the encoder itself is shared with the service
    HISTORY,
    LAST_ITEM,
    OOV,
    RETRIEVAL_ITEM,
    RETRIEVAL_USER,
    TowerEncoder,
    encode_codes,
    raw_column,
)
from training.data.dataset import Dataset

Objective = Literal["ctr", "next-item"]


class EncodedFields(NamedTuple):
    """NumPy twin of models.layers.Fields."""

    sparse: np.ndarray  # (B, S) int64
    dense: np.ndarray  # (B, Dn) float32
    multi: np.ndarray  # (B, K) int64

    def take(self, rows: np.ndarray) -> "EncodedFields":
        return EncodedFields(self.sparse[rows], self.dense[rows], self.multi[rows])


@dataclass(frozen=True, eq=False)
class Vocab:
    """Raw non-negative codes -> indices; raw codes beyond the table or unseen map to OOV."""

    table: np.ndarray  # (R,) int64 lookup
    size: int  # number of indices, padding and OOV included

    @classmethod
    def fit(cls, raw: np.ndarray) -> "Vocab":
        raw = np.asarray(raw, dtype=np.int64).ravel()
        seen = np.unique(raw[raw > 0])  # raw 0 is "unknown" / padding, never a value
        table = np.full(int(seen.max()) + 1 if seen.size else 1, OOV, dtype=np.int64)
        table[seen] = np.arange(2, seen.size + 2)
        return cls(table, int(seen.size) + 2)

    def encode(self, raw: np.ndarray, *, zero_is_padding: bool) -> np.ndarray:
        return encode_codes(self.table, raw, zero_is_padding=zero_is_padding)


@dataclass(frozen=True)
class DenseStats:
    mean: float
    std: float


@dataclass(frozen=True)
class FeatureDecl:
    """Which raw columns feed each tower, by kind (the declared part of the spec)."""

    user_sparse: tuple[str, ...]
    user_multi: tuple[str, ...]
    user_dense: tuple[str, ...]
    item_sparse: tuple[str, ...]
    item_multi: tuple[str, ...]
    item_dense: tuple[str, ...]
    history_len: int = 50

    def __post_init__(self) -> None:
        if self.history_len < 1:
            raise ValueError(f"history_len must be >= 1, got {self.history_len}")


def declare_features(ds: Dataset, objective: Objective, history_len: int = 50,
                     retrieval_dims: tuple[int, int] | None = None) -> FeatureDecl:
    """The default spec for a data set: every column it has, plus history and aggregates, plus
    the retriever's vectors when retrieval_dims = (M, D) is given (RETRIEVAL_USER / RETRIEVAL_ITEM)."""
    uf, itf = ds.user_features, ds.item_features
    user_agg = ("user_mean_label", "user_log_count") if objective == "ctr" else ("user_log_count",)
    item_agg = ("item_mean_label", "item_log_count") if objective == "ctr" else ("item_log_count",)
    user_ret: tuple[str, ...] = ()
    item_ret: tuple[str, ...] = ()
    if retrieval_dims is not None:
        m, d = retrieval_dims
        user_ret = tuple(f"{RETRIEVAL_USER}:{j}" for j in range(m * d))
        item_ret = tuple(f"{RETRIEVAL_ITEM}:{j}" for j in range(d))
    if objective == "next-item":
        # the served pre-ranker: its user side holds only what a request carries (the history,
        # its length, the retriever's vectors); user_id and profile fields are unknown online,
        # and a model trained with them meets out-of-vocabulary codes at every request
        uf = None
    return FeatureDecl(
        user_sparse=(*(("user_id",) if objective == "ctr" else ()), LAST_ITEM, *(uf.categorical if uf else ())),
        user_multi=(HISTORY, *(uf.multi if uf else ())),
        user_dense=(*(uf.numeric if uf else ()), *user_agg, *user_ret),
        item_sparse=("item_id", *(itf.categorical if itf else ())),
        item_multi=tuple(itf.multi if itf else ()),
        item_dense=(*(itf.numeric if itf else ()), *item_agg, *item_ret),
        history_len=history_len,
    )


def retrieval_columns(prefix: str, vectors: np.ndarray) -> dict[str, np.ndarray]:
    """(B, ...) vectors -> raw dense columns "<prefix>:<j>", j over the flattened trailing dims."""
    flat = np.asarray(vectors, dtype=np.float32).reshape(vectors.shape[0], -1)
    return {f"{prefix}:{j}": flat[:, j] for j in range(flat.shape[1])}


@dataclass(eq=False)
class TowerSpec:
    """The fitted fields of one tower, in the order the model's `Fields` tensors hold them."""

    sparse: dict[str, Vocab] = field(default_factory=dict)
    multi: dict[str, tuple[Vocab, int]] = field(default_factory=dict)  # name -> (vocab, width)
    dense: dict[str, DenseStats] = field(default_factory=dict)

    def fields_config(self) -> FieldsConfig:
        return FieldsConfig(
            sparse_vocab=tuple(v.size for v in self.sparse.values()),
            multi_vocab=tuple(v.size for v, _ in self.multi.values()),
            multi_width=tuple(w for _, w in self.multi.values()),
            num_dense=len(self.dense),
        )

    def encoder(self) -> TowerEncoder:
        """The NumPy encoder of these fields (service/contract/features.py), the one the service runs."""
        return TowerEncoder({k: v.table for k, v in self.sparse.items()},
                            {k: (v.table, w) for k, (v, w) in self.multi.items()},
                            {k: (st.mean, st.std) for k, st in self.dense.items()})

    def encode(self, raw: Mapping[str, np.ndarray]) -> EncodedFields:
        """Raw columns (name -> (B,) codes / floats or (B, K) codes) -> encoded arrays."""
        return EncodedFields(*self.encoder().encode(raw))


@dataclass(eq=False)
class FeatureSpec:
    user: TowerSpec
    item: TowerSpec
    history_len: int

    def to_dict(self) -> dict:
        def tower(t: TowerSpec) -> dict:
            return {
                "sparse": {k: v.table.tolist() for k, v in t.sparse.items()},
                "multi": {k: {"table": v.table.tolist(), "width": w} for k, (v, w) in t.multi.items()},
                "dense": {k: [s.mean, s.std] for k, s in t.dense.items()},
            }

        return {"user": tower(self.user), "item": tower(self.item), "history_len": self.history_len}

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureSpec":
        def vocab(table: list[int]) -> Vocab:
            arr = np.asarray(table, dtype=np.int64)
            return Vocab(arr, int(arr.max(initial=OOV)) + 1)

        def tower(t: dict) -> TowerSpec:
            return TowerSpec(
                sparse={k: vocab(v) for k, v in t["sparse"].items()},
                multi={k: (vocab(v["table"]), int(v["width"])) for k, v in t["multi"].items()},
                dense={k: DenseStats(float(m), float(s)) for k, (m, s) in t["dense"].items()},
            )

        return cls(tower(d["user"]), tower(d["item"]), int(d["history_len"]))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> "FeatureSpec":
        return cls.from_dict(json.loads(Path(path).read_text()))


def fit_spec(decl: FeatureDecl, user_train: Mapping[str, np.ndarray], item_train: Mapping[str, np.ndarray]) -> FeatureSpec:
    """Fit vocabularies and dense statistics on raw columns of the *training rows only*."""

    def tower(sparse: tuple[str, ...], multi: tuple[str, ...], dense: tuple[str, ...], raw: Mapping[str, np.ndarray]) -> TowerSpec:
        t = TowerSpec()
        for name in sparse:
            t.sparse[name] = Vocab.fit(raw_column(raw, name))
        for name in multi:
            codes = np.asarray(raw_column(raw, name))
            width = decl.history_len if name == HISTORY else codes.reshape(codes.shape[0], -1).shape[1]
            t.multi[name] = (Vocab.fit(codes), width)
        for name in dense:
            x = np.asarray(raw_column(raw, name), dtype=np.float64)
            std = float(x.std())
            # a constant column carries no signal; std 1 keeps it finite instead of failing
            t.dense[name] = DenseStats(float(x.mean()), std if std > 1e-12 else 1.0)
        return t

    return FeatureSpec(
        user=tower(decl.user_sparse, decl.user_multi, decl.user_dense, user_train),
        item=tower(decl.item_sparse, decl.item_multi, decl.item_dense, item_train),
        history_len=decl.history_len,
    )


# --- raw columns from a Dataset ---


def user_columns(ds: Dataset, users: np.ndarray, histories: np.ndarray) -> dict[str, np.ndarray]:
    """Raw user-side columns for rows (users (B,), histories (B, L) raw item ids, 0 = pad)."""
    users = np.asarray(users, dtype=np.int64)
    histories = np.asarray(histories, dtype=np.int64)
    # user_id + 1: raw 0 means unknown; histories are left-padded, so [:, -1] is the latest
    out: dict[str, np.ndarray] = {"user_id": users + 1, LAST_ITEM: histories[:, -1], HISTORY: histories}
    if ds.user_features is not None:
        t = ds.user_features
        for kind in (t.categorical, t.multi, t.numeric):
            out.update({k: v[users] for k, v in kind.items()})
    return out


def item_columns(ds: Dataset, items: np.ndarray) -> dict[str, np.ndarray]:
    """Raw item-side columns for item indices (B,) (0 = padding row)."""
    items = np.asarray(items, dtype=np.int64)
    out: dict[str, np.ndarray] = {"item_id": items}
    if ds.item_features is not None:
        t = ds.item_features
        for kind in (t.categorical, t.multi, t.numeric):
            out.update({k: v[items] for k, v in kind.items()})
    return out


def recent_histories(ds: Dataset, rows: np.ndarray, maxlen: int) -> np.ndarray:
    """(B, maxlen) left-padded raw item ids of the user's log entries strictly before each row."""
    rows = np.asarray(rows, dtype=np.int64)
    starts = ds.offsets[ds.users[rows]]
    idx = rows[:, None] + np.arange(-maxlen, 0)[None, :]  # (B, maxlen)
    valid = idx >= starts[:, None]
    return np.where(valid, ds.items[np.clip(idx, 0, None)], 0).astype(np.int64)


def label_aggregates(
    ds: Dataset, train_idx: np.ndarray, labels: np.ndarray, rows: np.ndarray, *, leave_one_out: bool
) -> dict[str, np.ndarray]:
    """Per-row user/item mean label and log-count, from the training rows only.

    For scored rows outside training (`leave_one_out=False`) these equal
    `CTRSplit.aggregates()`. For the training rows themselves (`leave_one_out=True`) the row's
    own label is left out: otherwise an item rated once would carry its label as a feature and
    the model would learn to trust a value that at test time is never its own label.
    """
    y = labels[train_idx].astype(np.float64)
    prior = float(y.mean())
    rows = np.asarray(rows, dtype=np.int64)
    own = labels[rows].astype(np.float64) if leave_one_out else 0.0
    out: dict[str, np.ndarray] = {}
    for name, keys, size in (("user", ds.users, ds.num_users), ("item", ds.items, ds.num_items + 1)):
        cnt = np.bincount(keys[train_idx], minlength=size).astype(np.float64)[keys[rows]]
        s = np.bincount(keys[train_idx], weights=y, minlength=size)[keys[rows]]
        if leave_one_out:
            cnt, s = cnt - 1.0, s - own
        out[f"{name}_mean_label"] = np.where(cnt > 0, s / np.maximum(cnt, 1.0), prior).astype(np.float32)
        out[f"{name}_log_count"] = np.log1p(np.maximum(cnt, 0.0)).astype(np.float32)
    return out
