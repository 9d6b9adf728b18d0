"""The feature encoder shared by training and serving (NumPy only): raw fields -> model inputs.

A tower's fitted spec (prerank_features.json, written by training/data/features.py) holds, per
field, a code table (sparse and multi-valued fields) or a mean / std (dense fields).
`TowerEncoder` turns raw columns into the (sparse, dense, multi) arrays the pre-rank towers
read; training fits the spec and wraps these arrays in tensors, the service builds the raw
columns of one request (`UserFeatures`) and feeds them to prerank_user.onnx. Both run this code,
so the online encoding cannot drift from the one the model was trained on.

Codes: 0 = padding, 1 = out of vocabulary (raw values never seen in the training rows, and the
data set's "unknown"), 2.. = the training vocabulary. Dense values: (x - mean) / std in float64,
stored as float32.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

PAD, OOV = 0, 1
HISTORY = "history"  # the user's most recent items before the scored row
LAST_ITEM = "last_item"  # the most recent of them, alone: mean pooling would dilute it
USER_LOG_COUNT = "user_log_count"
# the retriever's view (cascade inputs, training/stages/prerank/folds.py): dense columns
# "retrieval_user:<j>" = the M user vectors flattened (M * D), "retrieval_item:<j>" = the item embedding (D)
RETRIEVAL_USER, RETRIEVAL_ITEM = "retrieval_user", "retrieval_item"


def encode_codes(table: np.ndarray, raw: np.ndarray, *, zero_is_padding: bool) -> np.ndarray:
    """Raw non-negative codes -> indices through `table`; codes beyond it or unseen -> OOV, raw 0
    -> PAD (zero_is_padding, multi-valued fields) or OOV (sparse fields: 0 means unknown)."""
    raw = np.asarray(raw, dtype=np.int64)
    inside = (raw >= 0) & (raw < table.size)
    out = np.where(inside, table[np.clip(raw, 0, table.size - 1)], OOV)
    out[raw == 0] = PAD if zero_is_padding else OOV
    return out


def fit_width(codes: np.ndarray, width: int) -> np.ndarray:
    """Truncate (keeping the last) or zero-pad (B, K) codes to (B, width); mean pooling ignores the order."""
    if codes.shape[1] >= width:
        return codes[:, codes.shape[1] - width :] if codes.shape[1] > width else codes
    return np.concatenate([codes, np.zeros((codes.shape[0], width - codes.shape[1]), dtype=np.int64)], axis=1)


class TowerEncoder:
    """One tower's fields, in the order the model's inputs hold them."""

    def __init__(self, sparse: Mapping[str, np.ndarray], multi: Mapping[str, tuple[np.ndarray, int]],
                 dense: Mapping[str, tuple[float, float]]) -> None:
        """sparse: name -> code table (R,); multi: name -> (code table, width); dense: name -> (mean, std)."""
        self.sparse = {name: np.asarray(t, np.int64) for name, t in sparse.items()}
        self.multi = {name: (np.asarray(t, np.int64), int(w)) for name, (t, w) in multi.items()}
        self.dense_names = list(dense)
        self.dense_mean = np.array([float(m) for m, _ in dense.values()], np.float64)  # (Dn,)
        self.dense_std = np.array([float(s) for _, s in dense.values()], np.float64)  # (Dn,)

    @classmethod
    def from_dict(cls, tower: Mapping[str, Any]) -> TowerEncoder:
        """From one tower of prerank_features.json: {"sparse": {name: table}, "multi": {name:
        {"table", "width"}}, "dense": {name: [mean, std]}}."""
        return cls(tower["sparse"], {k: (v["table"], v["width"]) for k, v in tower["multi"].items()},
                   {k: (m, s) for k, (m, s) in tower["dense"].items()})

    def encode(self, raw: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw columns (name -> (B,) codes / floats or (B, K) codes) -> sparse (B, S) int64,
        dense (B, Dn) float32, multi (B, sum of widths) int64."""
        n = next((int(np.asarray(v).shape[0]) for v in raw.values()), 0)
        dense = np.zeros((n, len(self.dense_names)), dtype=np.float64)
        for j, name in enumerate(self.dense_names):
            dense[:, j] = raw_column(raw, name)
        return self.encode_arrays([raw_column(raw, name) for name in self.sparse],
                                  [raw_column(raw, name) for name in self.multi], dense)

    def encode_arrays(self, sparse: list[np.ndarray], multi: list[np.ndarray],
                      dense: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """encode() with the raw columns in field order: sparse S x (B,), multi K x (B, k), dense (B, Dn)."""
        n = dense.shape[0]
        s = np.zeros((n, len(self.sparse)), dtype=np.int64)
        for j, (table, col) in enumerate(zip(self.sparse.values(), sparse)):
            s[:, j] = encode_codes(table, col, zero_is_padding=False)
        blocks = [encode_codes(table, fit_width(np.asarray(col, dtype=np.int64).reshape(n, -1), width),
                               zero_is_padding=True) for (table, width), col in zip(self.multi.values(), multi)]
        m = np.concatenate(blocks, axis=1) if blocks else np.zeros((n, 0), dtype=np.int64)
        d = ((np.asarray(dense, dtype=np.float64) - self.dense_mean) / self.dense_std).astype(np.float32)
        return s, d, m


class UserFeatures:
    """Pre-rank user-tower inputs for an online history: the raw columns of one request, encoded
    by the TowerEncoder training used.

    Online we know only the history: user_id and user attributes are unknown (raw 0 -> OOV),
    `history` is the last history_len items left-padded, `last_item` the latest, and
    `user_log_count` is log1p of the history length (training used the history's length too),
    `retrieval_user:<j>` the j-th number of the retriever's user vectors (M, D) of this request.
    Other dense fields sit at their training mean (z = 0).
    """

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.history_len = int(spec["history_len"])
        self.encoder = TowerEncoder.from_dict(spec["user"])
        names = self.encoder.dense_names
        self._count_cols = np.array([j for j, name in enumerate(names) if name == USER_LOG_COUNT], np.int64)
        # retrieval_user columns: positions in user_dense and the vector index j of each
        ret = [(j, int(name.split(":", 1)[1])) for j, name in enumerate(names) if name.startswith(RETRIEVAL_USER + ":")]
        self._ret_cols = np.array([c for c, _ in ret], np.int64)
        self._ret_index = np.array([i for _, i in ret], np.int64)

    def feeds(self, history: np.ndarray, user_vectors: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """history (L,) internal item ids, oldest first, and the retriever's user vectors (M, D) ->
        {user_sparse (1, S), user_dense (1, Dn), user_multi (1, K)}."""
        enc = self.encoder
        sparse = [np.array([history[-1] if name == LAST_ITEM and history.size else 0], np.int64)
                  for name in enc.sparse]
        multi = []
        for name, (_, width) in enc.multi.items():
            raw = np.zeros((1, width), np.int64)
            if name == HISTORY and history.size:
                recent = history[-min(width, self.history_len):]
                raw[0, width - recent.size:] = recent  # left-padded, latest last
            multi.append(raw)
        dense = enc.dense_mean[None].copy()  # (1, Dn): z = 0
        dense[0, self._count_cols] = np.log1p(history.size)
        if self._ret_cols.size:
            if user_vectors is None or user_vectors.size <= int(self._ret_index.max()):
                raise ValueError(f"the pre-ranker reads {self._ret_cols.size} retrieval_user numbers, got user "
                                 f"vectors of shape {None if user_vectors is None else user_vectors.shape}")
            dense[0, self._ret_cols] = user_vectors.reshape(-1)[self._ret_index]
        s, d, m = enc.encode_arrays(sparse, multi, dense)
        return {"user_sparse": s, "user_dense": d, "user_multi": m}


def raw_column(raw: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    if name not in raw:
        raise KeyError(f"feature '{name}' is declared but missing from the raw columns ({sorted(raw)})")
    return raw[name]
