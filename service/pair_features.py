"""The pair features of one request's candidates: the one definition (NumPy, no torch) that the
service's pre-rank / re-rank stages and the rankers' training lists both call. Names, order and
formulas: service/contract/pair_features.py.

`PairTables` is what a version ships for them: pair_items.npy (N + 1, 2) [log1p popularity
all-time, recent] (built by `item_popularity` from the same interactions as the item-to-item
table), the catalog's category codes (`category_codes`) and the item-to-item table itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.contract.catalog import ItemFeatures
from service.contract.pair_features import (
    CATEGORY_HISTORY,
    COOC_DECAY,
    COOC_RECENT,
    PAIR_FEATURES,
    PAIR_ITEMS_COLUMNS,
    RECENT_PER_USER,
)
from service.item2item import Merged

NUM_FEATURES = len(PAIR_FEATURES)
# up to this many items / category codes a lookup is one bincount over all of them (a few
# microseconds); past it, sort the request's keys instead (no O(N) work per request)
DENSE_MAX = 1 << 16


@dataclass(frozen=True, eq=False)
class PairTables:
    """items (N + 1, 2) float32 PAIR_ITEMS_COLUMNS; categories (N + 1, K) int64 global codes
    (0 = none; K may be 0); neighbours (N + 1, R) int32 / scores (N + 1, R) float32: the
    item-to-item table (None for a version without the route)."""

    items: np.ndarray
    categories: np.ndarray
    neighbours: np.ndarray | None = None
    scores: np.ndarray | None = None

    def __post_init__(self) -> None:
        n1 = self.items.shape[0]
        if self.items.shape != (n1, len(PAIR_ITEMS_COLUMNS)):
            raise ValueError(f"pair items must be (N + 1, {len(PAIR_ITEMS_COLUMNS)}), got {self.items.shape}")
        if self.categories.ndim != 2 or self.categories.shape[0] != n1:
            raise ValueError(f"categories must be ({n1}, K), got {self.categories.shape}")
        if (self.neighbours is None) != (self.scores is None) or (
                self.neighbours is not None and self.neighbours.shape[0] != n1):
            raise ValueError("the item-to-item neighbours and scores must both be (N + 1, R) or both absent")


def item_popularity(items: np.ndarray, users: np.ndarray, num_items: int) -> np.ndarray:
    """(N + 1, 2) float32 PAIR_ITEMS_COLUMNS of the interactions (item_counts)."""
    return popularity_columns(item_counts(items, users, num_items))


def popularity_columns(counts: np.ndarray) -> np.ndarray:
    """(..., 2) counts from item_counts -> (..., 2) float32 PAIR_ITEMS_COLUMNS (log1p)."""
    return np.log1p(counts).astype(np.float32)


def item_counts(items: np.ndarray, users: np.ndarray, num_items: int) -> np.ndarray:
    """(N + 1, 2) int64 [count, count among each user's last RECENT_PER_USER rows] from
    interactions items (E,) in 1..N and users (E,): consecutive equal keys are one sequence in
    time order (as the item-to-item table reads them)."""
    items = np.asarray(items, np.int64)
    users = np.asarray(users, np.int64)
    n1 = num_items + 1
    if items.size == 0:
        return np.zeros((n1, 2), np.int64)
    last = np.flatnonzero(np.r_[users[1:] != users[:-1], True])  # (S,) last row of each sequence
    end = np.repeat(last, np.diff(np.r_[-1, last]))  # (E,) each row's sequence end
    recent = (end - np.arange(items.size)) < RECENT_PER_USER
    return np.stack([np.bincount(items, minlength=n1), np.bincount(items[recent], minlength=n1)], axis=1)


def category_codes(features: ItemFeatures, num_items: int) -> np.ndarray:
    """(N + 1, K) int64: every categorical and multi-valued feature's codes side by side, each
    shifted past the previous features' vocabularies so a code names one (feature, value)."""
    cols, offset = [], 0
    for name in features.filterable():
        c = np.asarray(features.codes(name), np.int64)
        c = c[:, None] if c.ndim == 1 else c
        cols.append(np.where(c > 0, c + offset, 0))
        offset += len(features.vocab.get(name, [])) + 1
    if not cols:
        return np.zeros((num_items + 1, 0), np.int64)
    return np.concatenate(cols, axis=1)


def pair_features(tables: PairTables, history: np.ndarray, m: Merged) -> np.ndarray:
    """history (L,) internal ids, oldest first; m: the request's merged candidates (C,) ->
    (C, F) float32 pair features in PAIR_FEATURES order (service/contract/pair_features.py)."""
    items = m.items
    c = items.size
    out = np.empty((c, NUM_FEATURES), np.float32)
    out[:, 0] = m.retrieval
    out[:, 1] = m.route_term
    out[:, 2] = np.log1p(np.where(m.faiss_rank >= 0, m.faiss_rank, m.faiss_count))
    out[:, 3] = m.faiss_rank < 0
    out[:, 4] = np.log1p(np.where(m.i2i_rank >= 0, m.i2i_rank, m.reached_count))
    out[:, 5] = m.i2i_rank < 0
    out[:, 6:8] = tables.items[items]
    hist = np.asarray(history, np.int64)
    if tables.neighbours is not None and tables.scores is not None and hist.size:
        recent = hist[-COOC_RECENT:][::-1]  # (A,) latest first
        nb = tables.neighbours[recent].astype(np.int64)  # (A, R)
        sc = tables.scores[recent] * (COOC_DECAY ** np.arange(recent.size, dtype=np.float32))[:, None]
        n1 = tables.items.shape[0]
        out[:, 8] = _lookup(nb[0], tables.scores[recent[0]], items, n1)
        out[:, 9] = _lookup(nb.ravel(), sc.ravel(), items, n1)
    else:
        out[:, 8:10] = 0.0
    out[:, 10] = _category_overlap(tables.categories, hist[-CATEGORY_HISTORY:], items)
    out[:, 11] = np.log1p(hist.size)
    return out


def _lookup(keys: np.ndarray, weights: np.ndarray, items: np.ndarray, n1: int) -> np.ndarray:
    """(C,) the summed weights of each item among keys (0 = padding key, ignored); n1 = N + 1."""
    if n1 <= DENSE_MAX:  # one bincount over the catalog: faster than sorting the keys for small catalogs
        total = np.bincount(keys, weights=weights, minlength=n1)
        total[0] = 0.0
        return total[items].astype(np.float32)
    keep = keys > 0
    u, inv = np.unique(keys[keep], return_inverse=True)
    if u.size == 0:
        return np.zeros(items.size, np.float32)
    summed = np.bincount(inv, weights=weights[keep], minlength=u.size)
    pos = np.minimum(np.searchsorted(u, items), u.size - 1)
    return np.where(u[pos] == items, summed[pos], 0.0).astype(np.float32)


def _category_overlap(cats: np.ndarray, hist: np.ndarray, items: np.ndarray) -> np.ndarray:
    """(C,) mean over each candidate's codes of the share of hist's items holding that code."""
    if cats.shape[1] == 0 or hist.size == 0:
        return np.zeros(items.size, np.float32)
    hc = cats[hist].ravel()  # (L * K,); codes are offset per feature, so one item holds a code once
    ic = cats[items]  # (C, K)
    n = np.maximum((ic > 0).sum(axis=1), 1)
    top = int(max(hc.max(), ic.max())) + 1
    if top <= DENSE_MAX:
        cnt = np.bincount(hc, minlength=top)
        cnt[0] = 0
        return (cnt[ic].sum(axis=1) / (hist.size * n)).astype(np.float32)
    u, c = np.unique(hc[hc > 0], return_counts=True)
    if u.size == 0:
        return np.zeros(items.size, np.float32)
    pos = np.minimum(np.searchsorted(u, ic), u.size - 1)
    share = np.where((u[pos] == ic) & (ic > 0), c[pos], 0)  # (C, K)
    return (share.sum(axis=1) / (hist.size * n)).astype(np.float32)
