"""Where the rankers' training lists come from: the ranking fold (out-of-sample candidates).

A ranker learns to re-order an upstream model's candidates. If that upstream model trained on
the very targets of those lists, its scores are sharper there than on any list it will meet
when serving (it has memorised them), and the ranker learns to trust them too much or learns
nothing the upstream did not already know. So the lists come from an upstream that never saw
their targets:

    n  = a user's leave-one-out training length (positions 0 .. n - 1; validation and test
         items come after and are never read here)
    H  = the holdout of the upstream retriever (`recsys train retrieval --holdout H`), trained
         on positions [0, n - H) only (LeaveOneOut(ds, holdout=H))
    pre-rank examples   targets at positions [n - H, n - H + P), P = ceil(H / 2): out of sample
                        for the upstream retriever
    re-rank lists       steps t in [n - H + P, n): their clicks (positions t .. t + T - 1, cut at
                        n) are out of sample for the retriever and for the pre-ranker, which
                        trained on the earlier positions only

The served retriever is the upstream continued on the whole training part
(`recsys train retrieval --init-from UPSTREAM`): a continuation, not a fresh model, so its item
and user vectors live in the space the rankers learned from (a retriever trained from scratch
would be a rotation of it, and the vectors the rankers read as features would mean nothing).
Without a holdout (H = 0) the lists are in-sample: every training position, as before; the
comparison of the two is in the issue-11 note.
"""

from __future__ import annotations

import math

import numpy as np

from training.data.splits import LeaveOneOut


def prerank_positions(holdout: int) -> int:
    """P: how many of the H held-out positions the pre-ranker learns on (the rest are the re-ranker's)."""
    return math.ceil(holdout / 2)


def prerank_rows(loo: LeaveOneOut, holdout: int) -> np.ndarray:
    """(E,) data-set rows that are pre-rank training targets; the history is the user's rows
    before each. holdout 0: every training row with at least one item of history."""
    ds = loo.dataset
    n = loo.full_train_lengths()  # (U,)
    pos = np.arange(ds.num_interactions) - ds.offsets[ds.users]
    inside = loo.full_train_mask()
    if holdout == 0:
        return np.flatnonzero(inside & (pos >= 1))
    first = np.maximum(n - holdout, 1)[ds.users]
    return np.flatnonzero(inside & (pos >= first) & (pos < first + prerank_positions(holdout)))


def rerank_window(loo: LeaveOneOut, holdout: int) -> tuple[np.ndarray, np.ndarray]:
    """(U,) first and (U,) last + 1 step of each user's re-rank window [n - H + P, n); a user
    whose window is empty has first == end."""
    n = loo.full_train_lengths()
    first = np.minimum(np.maximum(n - holdout, 1) + prerank_positions(holdout), n)
    return first, n
