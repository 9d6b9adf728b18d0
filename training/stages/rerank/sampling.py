"""Where the re-ranking impressions come from: their configuration, the (user, step) pairs of each
split and the click labels of their lists (the rules are in training/stages/rerank/impressions.py's module doc)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.data.dataset import DataError, Dataset
from training.data.splits import LeaveOneOut
from training.stages.prerank.folds import kfold_rerank_window, rerank_window

MAX_LIST_LEN = 100


@dataclass(frozen=True)
class ImpressionConfig:
    list_len: int = 30  # N: the pre-ranker's top N form the list (<= MAX_LIST_LEN)
    candidates: int = 200  # C: retrieval top C scored by the pre-ranker
    horizon: int = 5  # T: clicked = interacted with within the next T steps
    lists_per_user: int = 10  # training lists sampled per user
    eval_steps: int = 3  # E: last steps per user kept for validation / test lists
    valid_frac: float = 0.5  # share of users whose evaluation lists are validation lists
    seed: int = 0  # step sampling and the valid / test user split
    batch_size: int = 256  # histories per candidate-generation batch
    retrieval_score: bool = True  # the fused retrieval score as a second score input
    holdout: int = 0  # the upstream retriever's ranking fold (0 = in-sample steps)
    folds: int = 0  # K > 0: K-fold lists, steps from each user's K-fold re-rank window (holdout 0)

    def __post_init__(self) -> None:
        if not 1 <= self.list_len <= MAX_LIST_LEN:
            raise ValueError(f"list_len must be in [1, {MAX_LIST_LEN}], got {self.list_len}")
        if self.candidates < self.list_len:
            raise ValueError(f"candidates ({self.candidates}) must be >= list_len ({self.list_len})")
        for name in ("horizon", "lists_per_user", "eval_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.valid_frac < 1.0:
            raise ValueError(f"valid_frac must be in (0, 1), got {self.valid_frac}")
        if self.holdout < 0:
            raise ValueError(f"holdout must be >= 0, got {self.holdout}")
        if self.folds < 0 or (self.folds and self.holdout):
            raise ValueError(f"folds must be >= 0 and exclude a holdout, got folds {self.folds}, holdout {self.holdout}")


@dataclass
class Steps:
    """(user, step) pairs: the history is the user's first `step` interactions."""

    users: np.ndarray  # (B,) int64
    steps: np.ndarray  # (B,) int64, >= 1

    def ends(self, ds: Dataset) -> np.ndarray:
        return ds.offsets[self.users] + self.steps

    def __len__(self) -> int:
        return int(self.users.size)


def sample_steps(loo: LeaveOneOut, cfg: ImpressionConfig) -> dict[str, Steps]:
    """Training / validation / test steps inside each user's training part (see the module doc)."""
    if cfg.holdout > 0 or cfg.folds > 0:
        return _fold_steps(loo, cfg)
    n = loo.train_lengths()  # (U,)
    T, E = cfg.horizon, cfg.eval_steps
    rng = np.random.default_rng(cfg.seed)
    last_eval = n - T  # s + T <= n
    first_eval = np.maximum(last_eval - E + 1, 1)
    has_eval = last_eval >= 1
    U = n.size
    valid_user = rng.random(U) < cfg.valid_frac
    # per part (train, valid, test): the users and steps of its lists, one array per user
    tu: list[np.ndarray] = []
    ts: list[np.ndarray] = []
    vu: list[np.ndarray] = []
    vs: list[np.ndarray] = []
    su: list[np.ndarray] = []
    ss: list[np.ndarray] = []
    for u in range(U):
        if has_eval[u]:
            steps = np.arange(first_eval[u], last_eval[u] + 1)
            (vu if valid_user[u] else su).append(np.full(steps.size, u))
            (vs if valid_user[u] else ss).append(steps)
            hi = first_eval[u] - T  # t + T <= first eval step
        else:
            hi = n[u] - T  # no evaluation list: any step whose window fits the training part
        if hi >= 1:
            steps = np.sort(rng.choice(np.arange(1, hi + 1), min(cfg.lists_per_user, hi), replace=False))
            tu.append(np.full(steps.size, u))
            ts.append(steps)

    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    out = {"train": Steps(cat(tu), cat(ts)), "valid": Steps(cat(vu), cat(vs)), "test": Steps(cat(su), cat(ss))}
    for name, st in out.items():
        if len(st) == 0:
            raise DataError(f"{loo.dataset.name}: no {name} impression list (training sequences too short for "
                            f"horizon {T} and {E} evaluation steps)")
    return out


def _fold_steps(loo: LeaveOneOut, cfg: ImpressionConfig) -> dict[str, Steps]:
    """Every step of each user's re-rank window (training/stages/prerank/folds.py: of the holdout, or
    of K-fold lists); users split at random into train / valid / test (valid_frac / 2 each for the
    evaluation sides)."""
    first, end = kfold_rerank_window(loo) if cfg.folds else rerank_window(loo, cfg.holdout)
    side = np.random.default_rng(cfg.seed).random(first.size)  # (U,)
    groups = {"train": side >= cfg.valid_frac, "valid": side < cfg.valid_frac / 2,
              "test": (side >= cfg.valid_frac / 2) & (side < cfg.valid_frac)}
    out = {}
    for name, keep in groups.items():
        users = np.flatnonzero(keep & (end > first))
        counts = (end - first)[users]
        u = np.repeat(users, counts)
        t = np.repeat(first[users], counts) + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))
        out[name] = Steps(u.astype(np.int64), t.astype(np.int64))
        if len(out[name]) == 0:
            raise DataError(f"{loo.dataset.name}: no {name} impression list in the re-rank window of "
                            + (f"{cfg.folds}-fold lists" if cfg.folds else f"holdout {cfg.holdout}"))
    return out


def click_labels(ds: Dataset, loo: LeaveOneOut, steps: Steps, items: np.ndarray, horizon: int) -> np.ndarray:
    """(B, L) float32: 1 where items[b, j] is one of the user's next `horizon` TRAINING items.

    The window is rows ends .. ends + horizon - 1, cut at the end of the user's training part,
    so a validation or test interaction can never be a click.
    """
    ends = steps.ends(ds)  # (B,)
    train_end = ds.offsets[steps.users] + loo.train_lengths()[steps.users]  # (B,) exclusive
    rows = ends[:, None] + np.arange(horizon)[None, :]  # (B, T)
    inside = rows < train_end[:, None]
    assert loo.train_mask[rows[inside]].all()
    window = np.where(inside, ds.items[np.minimum(rows, ds.items.size - 1)], 0)  # (B, T), 0 = none
    hit = (items[:, :, None] == window[:, None, :]).any(axis=2) & (items > 0)  # (B, L)
    return hit.astype(np.float32)
