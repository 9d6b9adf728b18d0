"""The canonical in-memory data set every job works from.

Interactions are kept as flat NumPy arrays sorted by (user, timestamp) with a *stable* sort,
so ties keep their input order (DESIGN §2). Item index 0 is padding; items are 1..N.
Users are 0..U-1 (no padding row is needed on the user side).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np


class DataError(ValueError):
    """Bad input data: the message names the file (and line when there is one)."""


@dataclass
class FeatureTable:
    """Features aligned to an index (users 0..U-1, or items 0..N with row 0 = padding).

    categorical: name -> int64 codes (n,), 0 = unknown / padding, 1.. = vocab[code - 1]
    multi:       name -> int64 codes (n, K), right-padded with 0
    numeric:     name -> float32 (n,)
    vocab:       name -> list of string values for categorical and multi columns
    """

    categorical: dict[str, np.ndarray] = field(default_factory=dict)
    multi: dict[str, np.ndarray] = field(default_factory=dict)
    numeric: dict[str, np.ndarray] = field(default_factory=dict)
    vocab: dict[str, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        for col in (*self.categorical.values(), *self.multi.values(), *self.numeric.values()):
            return int(col.shape[0])
        return 0

    def names(self) -> list[str]:
        return [*self.categorical, *self.multi, *self.numeric]

    def digest(self, h: "hashlib._Hash") -> None:
        for kind in (self.categorical, self.multi, self.numeric):
            for name in sorted(kind):
                h.update(name.encode())
                h.update(np.ascontiguousarray(kind[name]).tobytes())


def encode_categorical(values: list[str]) -> tuple[np.ndarray, list[str]]:
    """Codes 1.. in order of first appearance; '' (missing) maps to 0."""
    vocab: dict[str, int] = {}
    codes = np.zeros(len(values), dtype=np.int64)
    for i, v in enumerate(values):
        if v == "":
            continue
        codes[i] = vocab.setdefault(v, len(vocab) + 1)
    return codes, list(vocab)


def encode_multi(rows: list[list[str]]) -> tuple[np.ndarray, list[str]]:
    """(n, K) codes right-padded with 0, K = the longest row (at least 1); codes 1.. in order of
    first appearance, row by row."""
    vocab: dict[str, int] = {}
    codes = np.zeros((len(rows), max(1, max((len(r) for r in rows), default=0))), dtype=np.int64)
    for row, names in enumerate(rows):
        for col, v in enumerate(names):
            codes[row, col] = vocab.setdefault(v, len(vocab) + 1)
    return codes, list(vocab)


def fill_median(values: np.ndarray) -> np.ndarray:
    """float32 copy with NaN (missing) replaced by the median of the rest (0 when none is known)."""
    out = np.asarray(values, dtype=np.float32)
    known = np.isfinite(out)
    return np.where(known, out, np.median(out[known]) if known.any() else 0.0).astype(np.float32)


@dataclass
class Dataset:
    """Interaction log plus id maps and optional feature tables."""

    name: str
    user_ids: np.ndarray  # (U,) external ids as str
    item_ids: np.ndarray  # (N + 1,) external ids as str, [0] = "<pad>"
    users: np.ndarray  # (E,) int64 in 0..U-1, sorted
    items: np.ndarray  # (E,) int64 in 1..N
    timestamps: np.ndarray  # (E,) int64
    ratings: np.ndarray | None = None  # (E,) float32
    # (E,) float32 training weight of each interaction, from its event type (None: all 1); where
    # training uses it: training/stages/retrieval/train.py (loss) and item2item.py (route counts)
    weights: np.ndarray | None = None
    user_features: FeatureTable | None = None
    item_features: FeatureTable | None = None
    offsets: np.ndarray = field(init=False)  # (U + 1,) CSR offsets into the sorted log
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        if self.users.size == 0:
            raise DataError(f"{self.name}: the data set has no interactions")
        counts = np.bincount(self.users, minlength=self.num_users)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.fingerprint = self._fingerprint()

    @property
    def num_users(self) -> int:
        return int(self.user_ids.shape[0])

    @property
    def num_items(self) -> int:
        """N, the number of real items (padding excluded)."""
        return int(self.item_ids.shape[0]) - 1

    @property
    def num_interactions(self) -> int:
        return int(self.items.shape[0])

    def sequence(self, user: int) -> np.ndarray:
        return self.items[self.offsets[user] : self.offsets[user + 1]]

    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        for arr in (self.users, self.items, self.timestamps):
            h.update(np.ascontiguousarray(arr).tobytes())
        if self.ratings is not None:
            h.update(np.ascontiguousarray(self.ratings).tobytes())
        if self.weights is not None:  # absent from the hash when None: older fingerprints stay valid
            h.update(b"weights")
            h.update(np.ascontiguousarray(self.weights).tobytes())
        h.update("\x1f".join(self.user_ids.tolist()).encode())
        h.update("\x1f".join(self.item_ids.tolist()).encode())
        for table in (self.user_features, self.item_features):
            if table is not None:
                table.digest(h)
        return h.hexdigest()[:16]

    def describe(self) -> str:
        lengths = np.diff(self.offsets)
        return (
            f"{self.name}: {self.num_users} users, {self.num_items} items, "
            f"{self.num_interactions} interactions, "
            f"sequence length median {int(np.median(lengths))} / max {int(lengths.max())}, "
            f"fingerprint {self.fingerprint}"
        )


def build_dataset(
    name: str,
    user_col: list[str] | np.ndarray,
    item_col: list[str] | np.ndarray,
    time_col: np.ndarray,
    rating_col: np.ndarray | None = None,
    *,
    weight_col: np.ndarray | None = None,
    user_table: tuple[list[str], FeatureTable] | None = None,
    item_table: tuple[list[str], FeatureTable] | None = None,
) -> Dataset:
    """Map external ids to internal indices and sort each user's log stably by time.

    `user_table` / `item_table` are (external ids, features in that order); entities that
    appear in the log but not in the table get unknown (0) features.  Users are numbered in
    order of first appearance in the log, items likewise, so the mapping does not depend on
    how a table happens to be ordered. Items only the item table lists (no interactions yet)
    are appended after them: they are part of the catalog.
    """
    if len(user_col) == 0:
        raise DataError(f"{name}: the data set has no interactions")
    u_keys, u_first, u_inv = _factorize(user_col)
    i_keys, i_first, i_inv = _factorize(item_col)
    # renumber by first appearance
    u_order = np.argsort(u_first, kind="stable")
    u_rank = np.empty_like(u_order)
    u_rank[u_order] = np.arange(u_order.size)
    i_order = np.argsort(i_first, kind="stable")
    i_rank = np.empty_like(i_order)
    i_rank[i_order] = np.arange(i_order.size)
    users = u_rank[u_inv].astype(np.int64)
    items = (i_rank[i_inv] + 1).astype(np.int64)
    user_ids = u_keys[u_order].astype(str)
    item_ids = np.concatenate([["<pad>"], i_keys[i_order].astype(str)])
    if item_table is not None:
        # catalog items nobody interacted with yet are still recommendable: append them
        known = set(item_ids.tolist())
        extra = [e for e in item_table[0] if e not in known]
        item_ids = np.concatenate([item_ids, np.asarray(extra, dtype=str)]) if extra else item_ids

    ts = np.asarray(time_col, dtype=np.int64)
    # stable sort by time, then stable by user: ties keep input order (DESIGN §2)
    by_time = np.argsort(ts, kind="stable")
    order = by_time[np.argsort(users[by_time], kind="stable")]
    ratings = None if rating_col is None else np.asarray(rating_col, dtype=np.float32)[order]
    weights = None if weight_col is None else np.asarray(weight_col, dtype=np.float32)[order]

    return Dataset(
        name=name,
        user_ids=user_ids,
        item_ids=item_ids,
        users=users[order],
        items=items[order],
        timestamps=ts[order],
        ratings=ratings,
        weights=weights,
        user_features=_align(user_table, user_ids, pad=False),
        item_features=_align(item_table, item_ids, pad=True),
    )


@dataclass
class RawLog:
    """A data set as read from its source, before ids are mapped: build_dataset's inputs, and what
    `recsys data convert` writes back out as tables (training/data/tables.py), row for row.

    events: the event type of each row (None: the source has none); weights: the training weight
    each row's event type maps to (None: all 1).
    """

    name: str
    users: list[str] | np.ndarray
    items: list[str] | np.ndarray
    timestamps: np.ndarray
    ratings: np.ndarray | None = None
    events: list[str] | None = None
    weights: np.ndarray | None = None
    user_table: tuple[list[str], FeatureTable] | None = None
    item_table: tuple[list[str], FeatureTable] | None = None

    def build(self) -> Dataset:
        return build_dataset(self.name, self.users, self.items, self.timestamps, self.ratings, weight_col=self.weights,
                             user_table=self.user_table, item_table=self.item_table)


def _factorize(values: list[str] | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique keys (as str), first index and inverse of a column of external ids.

    Integer columns (the synthetic generator's) are factorised as integers, which is far
    faster than sorting millions of strings; their external ids are the decimal strings.
    """
    arr = np.asarray(values)
    if arr.dtype.kind in "iu":
        keys, first, inv = np.unique(arr, return_index=True, return_inverse=True)
        return keys.astype(str), first, inv
    return np.unique(arr.astype(str), return_index=True, return_inverse=True)


def _align(
    table: tuple[list[str], FeatureTable] | None, ids: np.ndarray, *, pad: bool
) -> FeatureTable | None:
    """Reorder a feature table to the internal index; unknown rows get zeros."""
    if table is None:
        return None
    ext_ids, feats = table
    pos = {e: i for i, e in enumerate(ext_ids)}
    src = np.array([pos.get(e, -1) for e in ids.tolist()], dtype=np.int64)
    if pad:
        src[0] = -1
    found = src >= 0

    def take(col: np.ndarray) -> np.ndarray:
        out = np.zeros((ids.shape[0], *col.shape[1:]), dtype=col.dtype)
        out[found] = col[src[found]]
        return out

    return FeatureTable(
        categorical={k: take(v) for k, v in feats.categorical.items()},
        multi={k: take(v) for k, v in feats.multi.items()},
        numeric={k: take(v) for k, v in feats.numeric.items()},
        vocab=dict(feats.vocab),
    )
