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

`tail` (the demo's default, `--ranking-data tail`): no second model. The served retriever itself
is the holdout retriever, trained with H = tail_holdout() and not continued, so its ranking-fold
lists are out of sample for the very model that serves (same vectors, same score scale), at the
price of never training on each user's last H training items (they are still read as history).
The pre-ranker's pair prior is fit on those lists (training/stages/prerank/train.py refit_prior);
fit on in-sample lists it learns the retriever's memorised scores and serves worse than the
merged-retrieval order it starts from (issue 22's note: ml-100k and synthetic, test lists).

K-fold over users (`recsys train retrieval --folds K`, the demo's `--ranking-data kfold`): the
users are dealt into K folds (assign_folds, seeded); retriever k trains on every training
position of the users outside fold k and on none of fold k's (FoldOut). A sequential encoder has
no user embedding, so fold k's lists at every position are out of sample for retriever k, and
every user's lists come from the retriever of their fold (FoldMap, saved beside the K
checkpoints: fold_of_user). The rankers then share the training positions instead of a tail:

    pre-rank examples   targets at positions [1, n - R), R = RERANK_POSITIONS
    re-rank lists       steps t in [n - R, n): out of sample for the fold's retriever and for
                        the pre-ranker, which never trained on them

The K retrievers are K independent trainings, so their vectors are K different bases of the
embedding space; the rankers read the served retriever's vectors as features, so each fold's
vectors are turned into the served retriever's basis by the orthogonal map that best carries
its item table onto the served one (training/stages/prerank/upstreams.py: orthogonal
Procrustes; dot products, hence the fold's own scores and lists, are unchanged by it).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from training.data.dataset import DataError, Dataset
from training.data.splits import LeaveOneOut

RankingData = Literal["in-sample", "tail", "holdout", "kfold"]
RANKING_DATA: tuple[RankingData, ...] = ("in-sample", "tail", "holdout", "kfold")
# `tail`: the served retriever never trains on each user's last H training items, H = tail_holdout():
TAIL_HOLDOUT = 2  # at least this many,
TAIL_LISTS = 5000  # and enough for about this many ranking lists (H per user) where the users' lengths allow,
TAIL_SHARE = 0.1  # but never more than this share of a median user's training items
FOLD_MAP = "folds.json"  # beside the K fold retrievers: which fold each user is in
RERANK_POSITIONS = 5  # R: the last R training positions of each user are the re-ranker's (K-fold)


def fold_dir(root: str | Path, k: int) -> Path:
    """Where fold k's retriever is saved under a K-fold upstream folder."""
    return Path(root) / f"fold-{k}"


def tail_holdout(loo: LeaveOneOut) -> int:
    """H of the `tail` scheme for this data set: enough held-out positions per user for about
    TAIL_LISTS ranking lists, at least TAIL_HOLDOUT, at most TAIL_SHARE of the median user's
    training length (or TAIL_HOLDOUT if that is more). Few users with long histories (ml-100k:
    943 users, median 63 training items -> H = 6, 5,658 lists) give the rankers more lists per user; many
    users (the synthetic default's 2,000, median 16 -> H = 2) need no more. Measured on ml-100k
    (benchmarks/quality/prior_fit_tail.py, issue 22's note): the pair prior fit on H = 6's lists lifted
    the test users' NDCG@10 by 13 %, on H = 2's 1,886 lists by 3 % (within its paired SE)."""
    n = loo.full_train_lengths()
    users = max(int((n > 0).sum()), 1)
    cap = max(TAIL_HOLDOUT, math.floor(TAIL_SHARE * float(np.median(n)))) if n.size else TAIL_HOLDOUT
    return min(max(TAIL_HOLDOUT, math.ceil(TAIL_LISTS / users)), cap)


def prerank_positions(holdout: int) -> int:
    """P: how many of the H held-out positions the pre-ranker learns on (the rest are the re-ranker's)."""
    return math.ceil(holdout / 2)


def prerank_rows(loo: LeaveOneOut, holdout: int, kfold: bool = False) -> np.ndarray:
    """(E,) data-set rows that are pre-rank training targets; the history is the user's rows
    before each. holdout 0: every training row with at least one item of history; kfold: those
    before each user's re-rank window (kfold_rerank_window)."""
    ds = loo.dataset
    n = loo.full_train_lengths()  # (U,)
    pos = loo.positions()
    inside = loo.full_train_mask()
    if kfold:
        return np.flatnonzero(inside & (pos >= 1) & (pos < kfold_rerank_window(loo)[0][ds.users]))
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


def kfold_rerank_window(loo: LeaveOneOut) -> tuple[np.ndarray, np.ndarray]:
    """(U,) first and (U,) last + 1 step of each user's K-fold re-rank window [n - R, n), at least
    step 1 and, for n > R + 1, after a pre-rank example (so a short user gives the pre-ranker its
    positions first)."""
    n = loo.full_train_lengths()
    return np.minimum(np.maximum(n - RERANK_POSITIONS, 2), n), n


def assign_folds(num_users: int, folds: int, seed: int = 0) -> np.ndarray:
    """(U,) fold of each user in [0, folds): a seeded shuffle dealt round-robin, so the folds'
    sizes differ by at most one. ValueError for folds < 2 or more folds than users."""
    if folds < 2:
        raise ValueError(f"K-fold ranking data needs folds >= 2, got {folds}")
    if folds > num_users:
        raise ValueError(f"folds ({folds}) must be <= the number of users ({num_users})")
    fold = np.empty(num_users, dtype=np.int64)
    fold[np.random.default_rng(seed).permutation(num_users)] = np.arange(num_users) % folds
    return fold


@dataclass
class FoldOut(LeaveOneOut):
    """LeaveOneOut whose training part has none of `held_out`'s users (K-fold retriever k: the
    users of fold k, (U,) bool); their validation and test targets stay, as inputs to evaluate."""

    held_out: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))

    def train_lengths(self) -> np.ndarray:
        lengths = super().train_lengths()
        if self.held_out.size == 0:
            return lengths
        return np.where(self.held_out, 0, lengths)


@dataclass(frozen=True)
class FoldMap:
    """Which of the K fold retrievers makes each user's lists (the one that never trained on them)."""

    folds: int
    seed: int
    fold_of_user: np.ndarray  # (U,) int64 in [0, folds), by the data set's user index

    @classmethod
    def assign(cls, ds: Dataset, folds: int, seed: int = 0) -> FoldMap:
        return cls(folds, seed, assign_folds(ds.num_users, folds, seed))

    def split(self, ds: Dataset, k: int) -> FoldOut:
        """The training split of fold k's retriever: every user but fold k's."""
        return FoldOut(ds, held_out=self.fold_of_user == k)

    def users_of(self, ds: Dataset, k: int) -> list[str]:
        """External ids of fold k's users (what fold k's checkpoint records as held out)."""
        return [str(u) for u in ds.user_ids[self.fold_of_user == k]]

    def save(self, root: str | Path, ds: Dataset) -> Path:
        path = Path(root) / FOLD_MAP
        path.parent.mkdir(parents=True, exist_ok=True)
        users = {str(u): int(f) for u, f in zip(ds.user_ids, self.fold_of_user)}
        path.write_text(json.dumps({"folds": self.folds, "seed": self.seed, "fingerprint": ds.fingerprint,
                                    "users": users}))
        return path

    @classmethod
    def load(cls, root: str | Path, ds: Dataset) -> FoldMap:
        """The fold map of a K-fold upstream folder, checked against `ds` (DataError: another data
        set, or a user without a fold)."""
        path = Path(root) / FOLD_MAP
        raw = json.loads(path.read_text())
        if raw.get("fingerprint") != ds.fingerprint:
            raise DataError(f"{path}: written for another data set (fingerprint {raw.get('fingerprint')}, "
                            f"this one {ds.fingerprint})")
        users = raw["users"]
        missing = [str(u) for u in ds.user_ids if str(u) not in users]
        if missing:
            raise DataError(f"{path}: {len(missing)} users have no fold (e.g. {missing[0]!r})")
        folds = int(raw["folds"])
        fold = np.array([users[str(u)] for u in ds.user_ids], dtype=np.int64)
        if fold.min() < 0 or fold.max() >= folds:
            raise DataError(f"{path}: a fold outside [0, {folds})")
        return cls(folds, int(raw["seed"]), fold)


def is_fold_set(root: str | Path) -> bool:
    """Whether an upstream folder holds K fold retrievers (a fold map) rather than one retriever."""
    return (Path(root) / FOLD_MAP).is_file()
