"""Intra-list diversity of recommended lists (DESIGN §3). NumPy only, no torch.

Two readings of "how different are the K items a user is shown":

- embedding diversity: the mean pairwise cosine distance (1 - cos) between the item vectors of
  the list, averaged over users. 0 when every item is the same vector, 1 for orthogonal items.
- category diversity: the mean pairwise Jaccard distance between the items' category sets
  (1 - |A ∩ B| / |A ∪ B|), where items carry categories (MovieLens genres). Pairs where both
  items have no category count as distance 0 (nothing tells them apart).

Lists are (B, K) item indices; index 0 is padding and is left out of the pairs of its row.
"""

from __future__ import annotations

import numpy as np


def _pair_mean(sim: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(B, K, K) pairwise similarity, (B, K) valid -> (B,) mean over valid pairs i < j (NaN when < 2)."""
    k = sim.shape[1]
    upper = np.triu(np.ones((k, k), dtype=bool), 1)[None]
    pair = upper & valid[:, :, None] & valid[:, None, :]
    n = pair.sum(axis=(1, 2))
    total = np.where(pair, sim, 0.0).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, total / np.maximum(n, 1), np.nan)


def embedding_diversity(lists: np.ndarray, item_vectors: np.ndarray) -> float:
    """Mean pairwise cosine distance within each list, averaged over lists with >= 2 items.

    lists: (B, K) int item indices into item_vectors (0 = padding, skipped).
    item_vectors: (N + 1, D) float; row 0 is padding.
    """
    lists = np.asarray(lists, dtype=np.int64)
    vec = np.asarray(item_vectors, dtype=np.float64)
    norms = np.linalg.norm(vec, axis=1, keepdims=True)
    unit = vec / np.where(norms > 0, norms, 1.0)
    v = unit[lists]  # (B, K, D)
    cos = np.einsum("bkd,bjd->bkj", v, v)
    per_list = _pair_mean(1.0 - cos, lists > 0)
    return float(np.nanmean(per_list)) if np.isfinite(per_list).any() else 0.0


def category_diversity(lists: np.ndarray, categories: np.ndarray) -> float:
    """Mean pairwise Jaccard distance of category sets within each list.

    categories: (N + 1, C) int codes per item, right-padded with 0 (FeatureTable.multi layout),
    or a (N + 1, C) boolean multi-hot matrix.
    """
    lists = np.asarray(lists, dtype=np.int64)
    cats = np.asarray(categories)
    if cats.dtype != bool:
        width = int(cats.max()) + 1 if cats.size else 1
        hot = np.zeros((cats.shape[0], width), dtype=bool)
        rows = np.repeat(np.arange(cats.shape[0]), cats.shape[1])
        hot[rows, cats.ravel()] = True
        hot[:, 0] = False  # code 0 is padding
        cats = hot
    h = cats[lists].astype(np.float64)  # (B, K, C)
    inter = np.einsum("bkc,bjc->bkj", h, h)
    sizes = h.sum(axis=2)
    union = sizes[:, :, None] + sizes[:, None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        jaccard_distance = np.where(union > 0, 1.0 - inter / np.maximum(union, 1e-12), 0.0)
    per_list = _pair_mean(jaccard_distance, lists > 0)
    return float(np.nanmean(per_list)) if np.isfinite(per_list).any() else 0.0
