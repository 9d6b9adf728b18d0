"""Count-based retrieval baselines (reference: markovian-next-item.md).

They are fitted by counting, not by gradient descent, so they live here as NumPy scorers
rather than as torch modules in models/. Both follow the metrics.Scorer contract:
(B, L) left-padded histories -> (B, N + 1) scores. Each is fitted on the rows known before
the evaluated target (`LeaveOneOut.known_mask`): training rows for validation, training plus
validation rows for test. With this, ml-100k reproduces the DESIGN §3 calibration HR@10.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from training.data.splits import LeaveOneOut, Split
from training.eval.metrics import Scorer


class Popularity:
    """Score = number of training interactions with the item."""

    def __init__(self, split: LeaveOneOut, which: Split = "test") -> None:
        self.counts = split.item_counts(which).astype(np.float32)  # (N + 1,)

    def __call__(self, histories: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.counts, (histories.shape[0], self.counts.size))


class LastItem:
    """Score = how often the item followed the user's last item in training sequences.

    Popularity breaks ties (scaled into [0, 1) so it never outweighs one transition). The
    transition table is a hand-built CSR over (previous item -> next item) counts.
    """

    def __init__(self, split: LeaveOneOut, which: Split = "test") -> None:
        ds = split.dataset
        n = ds.num_items + 1
        known = split.known_mask(which)
        rows = np.flatnonzero(known[:-1] & known[1:] & (ds.users[:-1] == ds.users[1:]))
        src, dst = ds.items[rows], ds.items[rows + 1]
        pair, count = np.unique(src * n + dst, return_counts=True)
        self.dst = (pair % n).astype(np.int64)
        self.count = count.astype(np.float32)
        self.indptr = np.searchsorted(pair // n, np.arange(n + 1))
        pop = split.item_counts(which).astype(np.float32)
        self.tiebreak = pop / (pop.max() + 1.0)  # (N + 1,) in [0, 1)

    def __call__(self, histories: np.ndarray) -> np.ndarray:
        last = histories[:, -1]
        scores = np.tile(self.tiebreak, (last.size, 1))
        lo, hi = self.indptr[last], self.indptr[last + 1]
        lens = hi - lo
        rows = np.repeat(np.arange(last.size), lens)
        pos = np.repeat(lo - np.cumsum(lens) + lens, lens) + np.arange(lens.sum())
        scores[rows, self.dst[pos]] += self.count[pos]
        return scores


# each builds a scorer (histories (B, L) -> scores (B, N + 1)) from a split and its part
BASELINES: dict[str, Callable[[LeaveOneOut, Split], Scorer]] = {"popularity": Popularity, "last-item": LastItem}
