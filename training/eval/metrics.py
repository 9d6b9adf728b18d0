"""Evaluation metrics (DESIGN §3). All vectorised NumPy.

Ranking convention: a target's rank is the number of items scored strictly higher, plus the
number scored equally with a smaller item index (a stable descending sort by score). Rank 0
is the top. HR@K = [rank < K]; NDCG@K = 1 / log2(rank + 2) when rank < K; MRR = 1 / (rank + 1).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from tqdm import tqdm

from training.data.splits import LeaveOneOut, Split

KS: tuple[int, ...] = (1, 5, 10, 20, 50, 100)

Scorer = Callable[[np.ndarray], np.ndarray]
"""(B, L) left-padded int64 histories -> (B, N + 1) scores; column 0 is padding."""


def mask_seen(scores: np.ndarray, histories: np.ndarray) -> None:
    """In place: -inf for padding (column 0) and for every item in each row's history."""
    rows = np.repeat(np.arange(scores.shape[0]), histories.shape[1])
    scores[rows, histories.ravel()] = -np.inf
    scores[:, 0] = -np.inf


def target_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(B, N + 1) scores, (B,) target indices -> (B,) int64 zero-based ranks."""
    rows = np.arange(scores.shape[0])
    s_t = scores[rows, targets][:, None]
    ranks = np.count_nonzero(scores > s_t, axis=1).astype(np.int64)
    # ties with a smaller index count as ahead; only rows where the target shares its score
    eq = scores == s_t  # (B, N + 1) bool
    tied = np.flatnonzero(np.count_nonzero(eq, axis=1) > 1)
    if tied.size:
        cols = np.arange(scores.shape[1])[None, :]
        ranks[tied] += np.count_nonzero(eq[tied] & (cols < targets[tied, None]), axis=1)
    return ranks


def ranking_metrics(ranks: np.ndarray, ks: Iterable[int] = KS) -> dict[str, float]:
    """HR@K, NDCG@K for each K and MRR from zero-based target ranks."""
    ranks = np.asarray(ranks)
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks < k
        out[f"HR@{k}"] = float(hit.mean())
        out[f"NDCG@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean())
    out["MRR"] = float((1.0 / (ranks + 1.0)).mean())
    return out


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """(B, N + 1) -> (B, k) item indices, best first, ties broken by the smaller index.

    A full stable sort: exact at the k-th boundary, which argpartition is not. For offline
    use; evaluate_retrieval uses torch.topk where tie order does not matter.
    """
    return np.argsort(-scores, axis=1, kind="stable")[:, : min(k, scores.shape[1])]


def _scored(scorer: Scorer, hist: np.ndarray, remove_seen: bool = True) -> np.ndarray:
    """(B, N + 1) float32 scores of B histories, padding at -inf and, with remove_seen, each history's items."""
    scores = np.array(scorer(hist), dtype=np.float32, copy=True)
    if remove_seen:
        mask_seen(scores, hist)
    else:
        scores[:, 0] = -np.inf
    return scores


def retrieval_ranks(
    scorer: Scorer,
    split: LeaveOneOut,
    which: Split = "test",
    coverage_ks: Iterable[int] = KS,
    remove_seen: bool = True,
    batch_size: int = 1024,
    progress: bool = True,
    users: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, float]]:
    """Zero-based rank of every evaluated user's held-out item under full ranking, and
    Coverage@K (share of the catalog in at least one user's top K).

    `users` optionally restricts to positions in split.eval_users.
    """
    ks = tuple(coverage_ks)
    kmax = max(ks)
    sel = np.arange(split.eval_users.size) if users is None else np.asarray(users)
    targets = split.targets(which)[sel]
    import torch  # only here: the NumPy metrics (served_eval, the gates) need no torch

    ranks = np.empty(sel.size, dtype=np.int64)
    shown: dict[int, np.ndarray] = {k: np.zeros(split.num_items + 1, dtype=bool) for k in ks}
    chunks = range(0, sel.size, batch_size)
    for start in tqdm(chunks, desc=f"evaluate {which}", unit="batch", disable=not progress, leave=False):
        idx = sel[start : start + batch_size]
        hist = split.histories(which, idx)
        scores = _scored(scorer, hist, remove_seen)
        ranks[start : start + idx.size] = target_ranks(scores, targets[start : start + idx.size])
        # torch.topk is ~10x faster than argpartition here; tie order is irrelevant for coverage
        best = torch.topk(torch.from_numpy(scores), min(kmax, scores.shape[1]), dim=1).indices.numpy()
        for k in ks:
            shown[k][best[:, :k].ravel()] = True
    coverage = {f"Coverage@{k}": float(shown[k][1:].sum() / split.num_items) for k in ks}
    return ranks, coverage


def evaluate_retrieval(
    scorer: Scorer,
    split: LeaveOneOut,
    which: Split = "test",
    ks: Iterable[int] = KS,
    remove_seen: bool = True,
    batch_size: int = 1024,
    progress: bool = True,
    users: np.ndarray | None = None,
) -> dict[str, float]:
    """Full-ranking evaluation: HR@K, NDCG@K, MRR and Coverage@K (see retrieval_ranks)."""
    ks = tuple(ks)
    ranks, coverage = retrieval_ranks(scorer, split, which, ks, remove_seen, batch_size, progress, users)
    return {**ranking_metrics(ranks, ks), **coverage}


def row_ranks(scorer: Scorer, split: LeaveOneOut, rows: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Zero-based rank of the item at each data-set row under full ranking, its history (the user's
    rows before it, split.row_histories) scored and its items removed."""
    items = split.dataset.items
    ranks = np.empty(rows.size, dtype=np.int64)
    for start in range(0, rows.size, batch_size):
        idx = rows[start : start + batch_size]
        hist = split.row_histories(idx)
        ranks[start : start + idx.size] = target_ranks(_scored(scorer, hist), items[idx])
    return ranks


def stopping_ndcg10(scorer: Scorer, split: LeaveOneOut) -> float:
    """The score a retriever's early stopping reads: NDCG@10 over every target it did not train on
    short of the test item, i.e. each user's validation item and, for a split with a holdout, the
    held-out training items (split.holdout_rows). On ml-100k's H = 6 retriever that is 6,601 targets
    instead of 943. The demo's SASRec alone on the test users, seeds 0-2: 0.1109 / 0.1050 / 0.1034
    NDCG@10 with it, 0.1120 / 0.0934 / 0.1054 on the validation item alone (seed 1 stopped at epoch 46);
    synthetic default 0.2709 vs 0.2671 (issue 22's note; benchmarks/quality/stopping_signal.py)."""
    ranks, _ = retrieval_ranks(scorer, split, "valid", (10,), progress=False)
    rows = split.holdout_rows()
    if rows.size:
        ranks = np.concatenate([ranks, row_ranks(scorer, split, rows)])
    return ranking_metrics(ranks, (10,))["NDCG@10"]


# --- pointwise classification (pre-ranking, CTR objective) ---


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve, ties counted as one half (Mann-Whitney U)."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs at least one positive and one negative label")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(scores.size, dtype=np.float64)
    # average rank (1-based) within each group of tied scores
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    y = np.asarray(labels, dtype=np.float64)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


# --- list metrics (re-ranking) ---


def _displayed(scores: np.ndarray, labels: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The lists with a relevant entry: (their labels in displayed order (R, L), in ideal order (R, L),
    keep (B,) which lists those are); padding (mask False) never displays and is never relevant."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
        labels = np.where(mask, labels, 0.0)
    keep = labels.sum(axis=1) > 0
    scores, labels = scores[keep], labels[keep]
    ranked = np.take_along_axis(labels, np.argsort(-scores, axis=1, kind="stable"), axis=1)
    return ranked, -np.sort(-labels, axis=1), keep


def _ndcg(ranked: np.ndarray, ideal: np.ndarray, k: int) -> np.ndarray:
    kk = min(k, ranked.shape[1])
    discount = 1.0 / np.log2(np.arange(kk) + 2.0)
    dcg = ((2.0 ** ranked[:, :kk] - 1.0) * discount).sum(axis=1)
    idcg = ((2.0 ** ideal[:, :kk] - 1.0) * discount).sum(axis=1)
    return dcg / idcg


def ndcg_rows(scores: np.ndarray, labels: np.ndarray, k: int = 10, mask: np.ndarray | None = None) -> np.ndarray:
    """(R,) NDCG@k of each list that has a relevant entry (list_metrics' NDCG@k is their mean), in
    row order: for paired comparisons of two orders of the same lists."""
    ranked, ideal, _ = _displayed(scores, labels, mask)
    return _ndcg(ranked, ideal, k)


def paired_gain(new: np.ndarray, old: np.ndarray) -> tuple[float, float]:
    """mean(new - old) over the same lists (or users) and its standard error."""
    d = np.asarray(new, np.float64) - np.asarray(old, np.float64)
    return float(d.mean()) if d.size else 0.0, float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else 0.0


# a trained ranker replaces the order it starts from (the retrieval order, the given order) only when the
# best of its epochs / steps beats it on validation by more than this many paired SEs: the best of several
# noisy candidates picked on the same lists is above the start by chance about as often as not (ml-100k,
# ~760 pre-rank lists: kept at > 1 SE, then served below the merged order on the test users)
KEEP_TRAINED_SE = 2.0


def beats_start(new: np.ndarray, start: np.ndarray, margin: float = KEEP_TRAINED_SE) -> tuple[bool, float, float]:
    """(keep, gain, se): whether per-list scores `new` beat `start` by more than `margin` paired SEs."""
    gain, se = paired_gain(new, start)
    return gain > margin * se, gain, se


def list_metrics(
    scores: np.ndarray, labels: np.ndarray, ks: Iterable[int] = (5, 10), mask: np.ndarray | None = None
) -> dict[str, float]:
    """NDCG@K, MAP@K and P@K of lists ordered by `scores` (descending, ties by position).

    scores, labels: (B, L); labels are relevance >= 0; mask (B, L) True for real entries.
    Lists without any relevant entry carry no ranking signal and are left out of the means
    (their count is reported as `lists`).
    """
    ranked, ideal, keep = _displayed(scores, labels, mask)  # labels in displayed order
    L = ranked.shape[1]
    rel = ranked > 0
    out: dict[str, float] = {"lists": float(keep.sum())}
    for k in ks:
        kk = min(k, L)
        out[f"NDCG@{k}"] = float(_ndcg(ranked, ideal, k).mean()) if keep.any() else 0.0
        hits = np.cumsum(rel[:, :kk], axis=1)
        prec_at = hits / np.arange(1, kk + 1)
        n_rel = np.minimum(rel.sum(axis=1), k)
        out[f"MAP@{k}"] = float(((prec_at * rel[:, :kk]).sum(axis=1) / n_rel).mean()) if keep.any() else 0.0
        out[f"P@{k}"] = float((rel[:, :kk].sum(axis=1) / k).mean()) if keep.any() else 0.0
    return out
