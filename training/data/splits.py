"""Splits (DESIGN §2).

- `LeaveOneOut`: per user, last item = test target, second to last = validation target, the
  rest = training. Users with fewer than 3 interactions only contribute training data.
  At test time the history includes the validation item.
- `CTRSplit`: per-user temporal split of rated interactions; label = rating > 3 with
  rating == 3 dropped (the IntTower protocol). Aggregates come from the training rows only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from training.data.dataset import DataError, Dataset

Split = Literal["valid", "test"]


@dataclass
class LeaveOneOut:
    """`holdout` H > 0 is the ranking fold (training/stages/prerank/folds.py): each user's last H
    training items are left out of the training part too (a user keeps at least one), so a
    model fitted on this split never saw them; validation and test targets are unchanged."""

    dataset: Dataset
    holdout: int = 0
    eval_users: np.ndarray = field(init=False)  # (U_eval,) users with >= 3 interactions
    train_mask: np.ndarray = field(init=False)  # (E,) True for rows in the training part

    def __post_init__(self) -> None:
        ds = self.dataset
        if self.holdout < 0:
            raise ValueError(f"holdout must be >= 0, got {self.holdout}")
        lengths = np.diff(ds.offsets)
        self.eval_users = np.flatnonzero(lengths >= 3)
        if self.eval_users.size == 0:
            raise DataError(f"{ds.name}: no user has the 3 interactions leave-one-out needs")
        self.train_mask = self.positions() < self.train_lengths()[ds.users]

    def positions(self) -> np.ndarray:
        """(E,) each data-set row's position within its user's sequence (0 = the user's first item)."""
        ds = self.dataset
        return np.arange(ds.num_interactions) - ds.offsets[ds.users]

    @property
    def num_items(self) -> int:
        return self.dataset.num_items

    def full_train_lengths(self) -> np.ndarray:
        """(U,) length of each user's leave-one-out training part (the holdout not removed)."""
        lengths = np.diff(self.dataset.offsets)
        return np.where(lengths >= 3, lengths - 2, lengths)

    def full_train_mask(self) -> np.ndarray:
        """(E,) rows of the leave-one-out training part, the holdout included."""
        return self.positions() < self.full_train_lengths()[self.dataset.users]

    def train_lengths(self) -> np.ndarray:
        """(U,) length of each user's training sequence (without the last `holdout` items)."""
        full = self.full_train_lengths()
        return np.minimum(full, np.maximum(full - self.holdout, 1))

    def history_end(self, split: Split) -> np.ndarray:
        """(U_eval,) end offset (exclusive) of the history for each evaluated user."""
        ends = self.dataset.offsets[self.eval_users + 1]
        return ends - (2 if split == "valid" else 1)

    def targets(self, split: Split) -> np.ndarray:
        """(U_eval,) the held-out item of each evaluated user."""
        return self.dataset.items[self.history_end(split)]

    def histories(
        self, split: Split, users: np.ndarray | None = None, maxlen: int | None = None
    ) -> np.ndarray:
        """Left-padded history matrix (B, L) int64 for the given positions in eval_users.

        `users` indexes eval_users (default: all). L = the longest history, or `maxlen`
        (keeping the most recent items).
        """
        sel = np.arange(self.eval_users.size) if users is None else users
        starts = self.dataset.offsets[self.eval_users[sel]]
        ends = self.history_end(split)[sel]
        return pad_left(self.dataset.items, starts, ends, maxlen)

    def holdout_rows(self) -> np.ndarray:
        """(R,) data-set rows of the held-out training items (each user's last `holdout`), in order;
        row r's history is the user's rows before it. Empty when holdout is 0."""
        if self.holdout == 0:
            return np.zeros(0, dtype=np.int64)
        kept = LeaveOneOut.train_lengths(self)[self.dataset.users]  # the holdout's own cut, whatever a subclass keeps
        return np.flatnonzero(self.full_train_mask() & (self.positions() >= kept))

    def row_histories(self, rows: np.ndarray, maxlen: int | None = None) -> np.ndarray:
        """Left-padded (B, L) history of each data-set row: the user's items before it."""
        ds = self.dataset
        return pad_left(ds.items, ds.offsets[ds.users[rows]], rows, maxlen)

    def train_sequences(self, maxlen: int | None = None, values: np.ndarray | None = None) -> np.ndarray:
        """(U, L) left-padded training sequences of every user (used for training loops); with
        `values` (E,), those per-interaction values (e.g. Dataset.weights) in the same layout."""
        starts = self.dataset.offsets[:-1]
        ends = starts + self.train_lengths()
        return pad_left(self.dataset.items if values is None else values, starts, ends, maxlen)

    def known_mask(self, which: Split) -> np.ndarray:
        """(E,) rows a model may learn from when it is evaluated on `which`.

        Validation: the training part. Test: the training part plus each user's validation
        item, since at test time the history includes it (DESIGN §2).
        """
        if which == "valid":
            return self.train_mask
        mask = self.train_mask.copy()
        mask[self.history_end("test") - 1] = True
        return mask

    def item_counts(self, which: Split = "valid") -> np.ndarray:
        """(N + 1,) interaction counts over known_mask(which); [0] (padding) = 0."""
        rows = self.known_mask(which)
        return np.bincount(self.dataset.items[rows], minlength=self.num_items + 1)


def pad_left(items: np.ndarray, starts: np.ndarray, ends: np.ndarray, maxlen: int | None) -> np.ndarray:
    """Gather items[starts[b]:ends[b]] into a left-padded (B, L) matrix, keeping the tail."""
    lengths = ends - starts
    L = int(lengths.max()) if lengths.size else 0
    if maxlen is not None:
        L = min(L, maxlen)
    L = max(L, 1)
    cols = np.arange(-L, 0)  # offsets from the end
    idx = ends[:, None] + cols[None, :]  # (B, L)
    valid = idx >= starts[:, None]
    out = np.where(valid, items[np.clip(idx, 0, None)], 0)
    return out.astype(np.int64) if items.dtype.kind in "iub" else out  # float values (weights) stay float


@dataclass
class CTRSplit:
    """Index arrays into the dataset's (user, time)-sorted log, plus binary labels."""

    dataset: Dataset
    valid_frac: float = 0.1
    test_frac: float = 0.1
    train_idx: np.ndarray = field(init=False)
    valid_idx: np.ndarray = field(init=False)
    test_idx: np.ndarray = field(init=False)
    labels: np.ndarray = field(init=False)  # (E,) float32, meaningful on kept rows

    def __post_init__(self) -> None:
        ds = self.dataset
        if ds.ratings is None:
            raise DataError(f"{ds.name}: the CTR split needs ratings, and this data set has none")
        if not (0 <= self.valid_frac < 1 and 0 < self.test_frac < 1 and self.valid_frac + self.test_frac < 1):
            raise ValueError(f"bad split fractions valid={self.valid_frac} test={self.test_frac}")
        kept = np.flatnonzero(ds.ratings != 3)
        self.labels = (ds.ratings > 3).astype(np.float32)
        users = ds.users[kept]
        counts = np.bincount(users, minlength=ds.num_users)
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])
        pos = np.arange(kept.size) - first[users]  # rank within the user's kept rows
        n = counts[users]
        n_test = np.floor(n * self.test_frac).astype(np.int64)
        n_valid = np.floor(n * self.valid_frac).astype(np.int64)
        is_test = pos >= n - n_test
        is_valid = ~is_test & (pos >= n - n_test - n_valid)
        self.test_idx = kept[is_test]
        self.valid_idx = kept[is_valid]
        self.train_idx = kept[~is_test & ~is_valid]
        if self.train_idx.size == 0 or self.test_idx.size == 0:
            raise DataError(f"{ds.name}: too few rated interactions for a CTR split")

    def aggregates(self) -> dict[str, np.ndarray]:
        """Mean label and log-count per user (U,) and per item (N + 1,), training rows only.

        Users or items absent from the training rows get the global training mean and count 0,
        so nothing from validation or test leaks in.
        """
        ds = self.dataset
        y = self.labels[self.train_idx]
        prior = float(y.mean())
        out: dict[str, np.ndarray] = {}
        for name, keys, size in (
            ("user", ds.users[self.train_idx], ds.num_users),
            ("item", ds.items[self.train_idx], ds.num_items + 1),
        ):
            cnt = np.bincount(keys, minlength=size).astype(np.float64)
            s = np.bincount(keys, weights=y, minlength=size)
            out[f"{name}_mean_label"] = np.where(cnt > 0, s / np.maximum(cnt, 1), prior).astype(np.float32)
            out[f"{name}_log_count"] = np.log1p(cnt).astype(np.float32)
        return out
