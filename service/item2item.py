"""The item-to-item recall route at request time (NumPy only). The table is built by
training/stages/retrieval/item2item.py: neighbours (N + 1, R) int32 and scores (N + 1, R) float32 per item.

Route score of item j for a history whose most recent items are h_0 (the last), h_1, ...:

    i2i(j) = sum over a < recent of decay ** a * s(h_a, j)

Seen and excluded items are dropped; the `candidates` best join the FAISS candidates.

Merge (`merge_routes`): the candidate set is the union of FAISS's top-k and the route's top
`candidates`. Every candidate gets both numbers: its fused retrieval score r (max over
launchers of <u_l, e_i>: FAISS's for the items FAISS returned, the same dot products computed
exactly here for the route's other items, so no candidate has an undefined r) and its route
score (0 when no recent item has it among its neighbours). The retrieval stage orders the
union by

    merged(i) = r(i) + beta * sd(r) * i2i(i) / max_j i2i(j)

where sd(r) is the standard deviation of FAISS's fused scores in this request (1 with fewer than
two), so beta is free of the retriever's score scale (chosen per version on its validation users
at publish: training/publish/route_tuning.py) and the pre-ranker's retrieval prior reads merged(i) as its retrieval score. `routes` in
`explain` says which route returned an item and with which score.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

NEIGHBOURS, SCORES = "neighbours", "scores"
# request-time settings of a version whose manifest has none (item2item.serving; publish chooses them
# per version, training/publish/route_tuning.py, starting from these): the best merge on ml-100k
# validation (benchmarks/quality/item2item_route.py); candidates 50 rather than 20 (same NDCG@10 there,
# the pre-ranker's candidate set gains recall: 0.779 vs 0.767 at 200 + route on test)
DEFAULT_SERVING: dict[str, float] = {"recent": 8, "decay": 1.0, "candidates": 50, "beta": 4.0}


@dataclass(frozen=True)
class Item2ItemRoute:
    """neighbours (N + 1, R) int32, scores (N + 1, R) float32 and the request-time settings."""

    neighbours: np.ndarray
    scores: np.ndarray
    recent: int = int(DEFAULT_SERVING["recent"])
    decay: float = DEFAULT_SERVING["decay"]
    candidates: int = int(DEFAULT_SERVING["candidates"])
    beta: float = DEFAULT_SERVING["beta"]

    def __post_init__(self) -> None:
        if self.neighbours.ndim != 2 or self.neighbours.shape != self.scores.shape:
            raise ValueError(f"neighbours and scores must be (N + 1, R) of one shape, got "
                             f"{self.neighbours.shape} and {self.scores.shape}")
        if self.recent < 1 or self.candidates < 0 or not 0.0 < self.decay <= 1.0 or not self.beta >= 0.0:
            raise ValueError(f"item2item serving settings out of range: recent={self.recent} (>= 1), "
                             f"candidates={self.candidates} (>= 0), decay={self.decay} (0, 1], beta={self.beta} (>= 0)")

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], num_items: int,
                    serving: dict[str, Any] | None = None) -> Item2ItemRoute:
        """The two arrays of the table file (layout.ITEM2ITEM), checked against the catalog size, and the manifest's settings."""
        nb = np.asarray(arrays[NEIGHBOURS])
        sc = np.asarray(arrays[SCORES])
        if nb.ndim != 2 or nb.shape[0] != num_items + 1:
            raise ValueError(f"{NEIGHBOURS} has shape {nb.shape}, expected ({num_items + 1}, R)")
        if nb.dtype != np.int32 or sc.dtype != np.float32:
            raise ValueError(f"expected int32 {NEIGHBOURS} and float32 {SCORES}, got {nb.dtype} and {sc.dtype}")
        if nb.size and (nb.min() < 0 or nb.max() > num_items):
            raise ValueError(f"{NEIGHBOURS} holds ids outside 0..{num_items}")
        if not np.isfinite(sc).all():
            raise ValueError(f"{SCORES} holds non-finite values")
        return cls(nb, sc).with_serving(serving)

    def with_serving(self, serving: Mapping[str, float] | None) -> Item2ItemRoute:
        """This table with the request settings `serving` (recent, decay, candidates, beta; a missing one:
        DEFAULT_SERVING's)."""
        s = {**DEFAULT_SERVING, **(serving or {})}
        return replace(self, recent=int(s["recent"]), decay=float(s["decay"]), candidates=int(s["candidates"]),
                       beta=float(s["beta"]))

    def score(self, history: np.ndarray, banned: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """history (L,) internal ids, oldest first; banned ids dropped. -> every item the recent
        items reach, sorted by id (P,) int64, and its route score (P,) float32."""
        recent = np.asarray(history, np.int64)[-self.recent:][::-1]  # (L',) latest first: age 0
        weight = self.decay ** np.arange(recent.size, dtype=np.float64)  # (L',)
        nb = self.neighbours[recent].astype(np.int64).ravel()  # (L' * R,)
        sc = (self.scores[recent].astype(np.float64) * weight[:, None]).ravel()
        keep = (nb > 0) & ~np.isin(nb, banned)
        items, inv = np.unique(nb[keep], return_inverse=True)
        return items, np.bincount(inv, weights=sc[keep], minlength=items.size).astype(np.float32)


def top_route(items: np.ndarray, scores: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The n best of a route's (items, scores), score descending, ties by smaller id."""
    order = np.lexsort((items, -scores))[:n]
    return items[order], scores[order]


@dataclass(frozen=True)
class Merged:
    """The union of the routes' candidates, in merged order; every array (C,).

    items: internal ids; merged: the retrieval stage's score; retrieval: the fused score
    max_l <u_l, e_i>; launchers: the launcher of it; i2i: the route score (0 = no recent
    item has it among its neighbours); by_faiss: FAISS returned it; route_term: sd(r) * i2i / max
    i2i, so merged = retrieval + beta * route_term; faiss_rank / i2i_rank: the position in FAISS's
    list / among every item the route reached by route score (-1: not there); faiss_count /
    reached_count: those lists' lengths. The last five feed the pair features
    (service/pair_features.py)."""

    items: np.ndarray
    merged: np.ndarray
    retrieval: np.ndarray
    launchers: np.ndarray
    i2i: np.ndarray
    by_faiss: np.ndarray
    route_term: np.ndarray
    faiss_rank: np.ndarray
    i2i_rank: np.ndarray
    faiss_count: int
    reached_count: int

    def take(self, keep: np.ndarray) -> Merged:
        """The candidates at `keep` (a (C,) mask or positions), order kept; the counts unchanged."""
        return Merged(self.items[keep], self.merged[keep], self.retrieval[keep], self.launchers[keep], self.i2i[keep],
                      self.by_faiss[keep], self.route_term[keep], self.faiss_rank[keep], self.i2i_rank[keep],
                      self.faiss_count, self.reached_count)

    @classmethod
    def faiss_only(cls, cand: np.ndarray, fused: np.ndarray, launchers: np.ndarray) -> Merged:
        """FAISS's candidates (C,) in its order, for a version without the route."""
        c = cand.size
        zeros = np.zeros(c, np.float32)
        return cls(np.asarray(cand, np.int64), np.asarray(fused, np.float32), np.asarray(fused, np.float32),
                   np.asarray(launchers, np.int64), zeros, np.ones(c, bool), zeros, np.arange(c), np.full(c, -1), c, 0)


def merge_routes(cand: np.ndarray, fused: np.ndarray, launchers: np.ndarray, route: Item2ItemRoute,
                 history: np.ndarray, banned: np.ndarray, user_vectors: np.ndarray,
                 item_vectors: np.ndarray) -> Merged:
    """FAISS candidates cand, fused, launchers (C,) and the route over `history` -> Merged
    (see the module doc). user_vectors (M, D); item_vectors (N, D), row r = item r + 1."""
    reached, reached_scores = route.score(history, banned)  # (P,) sorted by id
    top_items, top_scores = top_route(reached, reached_scores, route.candidates)
    extra = top_items[~np.isin(top_items, cand)]  # (X,) found by the route only
    dots = user_vectors @ item_vectors[extra - 1].T  # (M, X)
    items = np.concatenate([cand, extra]).astype(np.int64)
    retrieval = np.concatenate([fused, dots.max(axis=0) if extra.size else np.zeros(0)]).astype(np.float32)
    launch = np.concatenate([launchers, dots.argmax(axis=0) if extra.size else np.zeros(0)]).astype(np.int64)
    pos = np.minimum(np.searchsorted(reached, items), max(reached.size - 1, 0))
    hit = reached[pos] == items if reached.size else np.zeros(items.size, bool)
    i2i = np.where(hit, reached_scores[pos] if reached.size else 0.0, 0.0).astype(np.float32)
    top = float(top_scores[0]) if top_scores.size else 0.0
    spread = float(fused.std()) if fused.size > 1 else 0.0
    scale = spread if spread > 0 else 1.0
    term = (scale * i2i / top if top > 0 else np.zeros_like(i2i)).astype(np.float32)  # (C,)
    merged = retrieval + route.beta * term
    order = np.argsort(-merged, kind="stable")
    by_faiss = np.arange(items.size) < cand.size
    reached_rank = np.empty(reached.size, np.int64)
    reached_rank[np.lexsort((reached, -reached_scores))] = np.arange(reached.size)
    i2i_rank = np.where(hit, reached_rank[pos] if reached.size else -1, -1)
    faiss_rank = np.where(by_faiss, np.arange(items.size), -1)
    return Merged(items[order], merged[order].astype(np.float32), retrieval[order], launch[order], i2i[order],
                  by_faiss[order], term[order], faiss_rank[order], i2i_rank[order], int(cand.size), int(reached.size))
