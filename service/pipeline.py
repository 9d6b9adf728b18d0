"""The online multi-stage pipeline over one loaded version (DESIGN.md §6). NumPy + ONNX Runtime.

history -> retrieval ONNX (1, M, D) -> one FAISS search of the M vectors with max-fusion
(every item keeps its launcher; seen and excluded items dropped inside the search) -> pre-rank
(IntTower user part once in ONNX, NumPy against the candidates' item heads) -> top N ->
re-rank (PRM ONNX) -> top k. Items past the re-ranked N keep the pre-rank order.

Fallbacks: no usable history -> catalog popularity; a stage that raises -> the previous
stage's order, and `served_by` says so (e.g. "retrieval;prerank_failed"); a stage whose scores
are not all finite (NaN / inf from a model on an input its load-time checks did not cover) ->
the same, flagged "<stage>_nonfinite" (e.g. "retrieval;prerank_nonfinite"), never a NaN served.

Scores: one meaning per answer, named by `scored_by`: the score of the stage that ordered the
list (retrieval: the fused inner product; prerank: the pre-ranker's logit; rerank: the
re-ranker's list score), or for popularity answers the item's share of the version's training
interactions (0..1). An item that stage did not score (past the re-ranked top N, or a popularity
top-up after filters) has no score (None) and follows the scored ones.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import numpy as np

from service.artifacts import ORT_ERRORS, LoadedVersion
from service.contract.features import UserFeatures
from service.contract.manifest import STAGES
from service.contract.rerank_inputs import PVStats, list_zscore
from service.index import search_fused
from service.item2item import Merged, merge_routes
from service.pair_features import pair_features
from service.prerank import head_interactions

logger = logging.getLogger(__name__)

# What a failing stage raises: ONNX Runtime errors on a bad feed, ValueError / IndexError from
# NumPy or faiss on a shape problem. Anything else is a bug and propagates.
STAGE_ERRORS: tuple[type[Exception], ...] = (*ORT_ERRORS, ValueError, IndexError)
FILTER_CACHE_SIZE = 256  # (feature, values) masks kept per loaded version


@dataclass(frozen=True)
class RecommendedItem:
    """One result; `score` is the answer's `scored_by` stage's (None when that stage did not
    score it), `launcher` None for popularity; with explain, `stages` holds each stage's score
    and `routes` the score of each recall route that returned it (faiss, i2i)."""

    item_id: str
    score: float | None
    launcher: int | None
    stages: dict[str, float] = field(default_factory=dict)
    routes: dict[str, float] = field(default_factory=dict)


@dataclass
class RecommendResult:
    items: list[RecommendedItem]
    model_version: str
    served_by: str
    timings_ms: dict[str, float]
    unknown_items: int = 0
    scored_by: str = "popularity"  # the stage whose score `score` is (module docstring)


class NonFiniteScores(ValueError):
    """A stage produced NaN or inf scores; the previous stage's order is served instead."""

    def __init__(self, stage: str) -> None:
        super().__init__(f"{stage} produced non-finite scores")
        self.stage = stage


def _finite(stage: str, scores: np.ndarray) -> None:
    if not np.isfinite(scores).all():
        raise NonFiniteScores(stage)


def _stage_fallback(stage: str, exc: Exception, serving: str) -> str:
    """Log a stage that raised (one warning line for non-finite scores, the traceback for any
    other error) and return its `served_by` flag: "<stage>_nonfinite" or "<stage>_failed"."""
    if isinstance(exc, NonFiniteScores):
        logger.warning("%s; serving %s", exc, serving)
        return f"{stage}_nonfinite"
    logger.exception("%s failed; serving %s", stage, serving)
    return f"{stage}_failed"


class FilterError(ValueError):
    """A request filter the loaded version cannot apply; `field` is the filter's name."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"filters.{field}: {message}")
        self.field = field
        self.message = message


class _Timer:
    """Per-stage wall times in ms; `lap(name)` closes the stage that began at the last lap."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}
        self._start = self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.ms[name] = round((now - self._t) * 1000.0, 3)
        self._t = now

    def restart(self) -> None:
        """Start the next stage now (after stages timed elsewhere, e.g. search / fuse)."""
        self._t = time.perf_counter()

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self._start) * 1000.0


def served_stages(version: LoadedVersion) -> tuple[str, ...]:
    """The stages a version serves: its manifest's `serving.stages` (set by the publish gate),
    else every stage it has files for."""
    stages = version.manifest.served_stages()
    if stages is not None:
        return stages
    return STAGES if version.rerank is not None else STAGES[:2]


class Recommender:
    """DESIGN §6 over one LoadedVersion; thread-safe (the only mutable state is the filter-mask
    cache, whose dict operations are atomic under the GIL; a race costs a recomputation)."""

    def __init__(self, version: LoadedVersion, retrieval_k: int = 200, prerank_n: int = 30,
                 stages: tuple[str, ...] | None = None, item2item: bool = True) -> None:
        """stages: the cuts to serve, a prefix of STAGES (("retrieval",) stops after retrieval);
        None = what the version's manifest `serving.stages` says, else every stage it has.
        item2item: merge the version's item-to-item route (service/item2item.py) when it has one."""
        if retrieval_k < 1 or prerank_n < 1:
            raise ValueError(f"retrieval_k and prerank_n must be >= 1, got {retrieval_k} and {prerank_n}")
        self.v = version
        self.retrieval_k = retrieval_k
        self.prerank_n = prerank_n
        self.stages = served_stages(version) if stages is None else tuple(stages)
        self.item2item = version.item2item if item2item else None
        if self.stages != STAGES[: len(self.stages)] or not self.stages:
            raise ValueError(f"stages must be a non-empty prefix of {STAGES}, got {self.stages}")
        if "rerank" in self.stages and version.rerank is None:
            raise ValueError(f"version {version.version} has no re-ranker to serve")
        self.user_features = UserFeatures(version.prerank_features)
        self._popular = (np.argsort(-version.popularity[1:], kind="stable") + 1).astype(np.int64)  # (N,)
        total = float(version.popularity[1:].sum())
        # (N + 1,) popularity answers' score: the item's share of the training interactions
        self._popularity_share = version.popularity.astype(np.float64) / max(total, 1.0)
        self._filter_cache: dict[tuple[str, tuple[str, ...]], np.ndarray] = {}
        self._pv: PVStats | None = None
        self._rerank_len = 0
        self._rerank_scores = 1  # 1: pre-rank score; 2: + fused retrieval score
        self._rerank_pair = False  # the re-ranker's item_feats end with the pair features
        rerank = version.manifest.rerank
        if version.rerank is not None and rerank is not None and rerank.serving is not None:
            self._pv = rerank.serving.pv
            self._rerank_len = rerank.max_len
            self._rerank_scores = rerank.num_scores
            self._rerank_pair = rerank.serving.pair_features
        # the pre-ranker's retrieval prior (models/cascade.py): weight * fused score + bias[launcher]
        serving = version.manifest.prerank.serving
        prior = serving.retrieval_prior if serving is not None else None
        # or its learned prior over the pair features (service/pair_features.py), which replaces it
        pair = serving.pair_prior if serving is not None else None
        self._pair = pair.arrays() if pair is not None and version.pair_tables is not None else None
        if self._rerank_pair and self._pair is None:
            raise ValueError(f"version {version.version}: the re-ranker reads pair features but the pre-ranker has no pair prior")
        self._has_prior = prior is not None
        self._prior_weight = float(prior.weight) if prior else 0.0
        self._tower_weight = np.float32(1.0 if prior is None or prior.tower_weight is None else prior.tower_weight)
        self._prior_bias = np.asarray(prior.launcher_bias if prior else [0.0], np.float32)

    @property
    def model_version(self) -> str:
        return self.v.version

    def to_indices(self, item_ids: list[str]) -> tuple[np.ndarray, int]:
        """External ids -> internal indices (order kept) and the number of unknown ids skipped."""
        idx = self.v.id_to_index.lookup(item_ids)  # (n,), 0 = unknown
        known = idx[idx > 0]
        return known, len(item_ids) - known.size

    def popularity(self, k: int, banned: np.ndarray, allowed: np.ndarray | None = None) -> list[RecommendedItem]:
        """The k most popular items outside `banned` (and inside `allowed`, an (N + 1,) mask)."""
        pool = self._popular if allowed is None else self._popular[allowed[self._popular]]
        pool = pool[: k + banned.size]  # at most banned.size of these are dropped: no O(N) isin
        order = pool[~np.isin(pool, banned)][:k]
        share = self._popularity_share
        return [RecommendedItem(str(self.v.item_ids[i]), float(share[i]), None, {"popularity": float(share[i])})
                for i in order]

    def recommend(self, history_item_ids: list[str], k: int = 10, exclude: list[str] | None = None,
                  explain: bool = True, filters: dict[str, list[str]] | None = None,
                  timeout_ms: float | None = None) -> RecommendResult:
        """Top-k external ids for a history (oldest first); seen and `exclude` items never returned.

        filters: item feature name -> accepted values (an item passes when, for every name, its
        value, or one of its values for a multi-valued feature, is accepted); unknown names or
        values raise FilterError. Candidates are filtered after retrieval; when fewer than k
        pass, the list is topped up with the most popular passing items (`;filter_backfill`).
        timeout_ms: a stage not yet started when the request has used this much time is skipped
        and the previous stage's order is served (`;timeout`); a running stage is not cut short.
        explain=False skips collecting each item's per-stage scores (`stages` stays empty).
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        timer = _Timer()
        allowed, history, unknown, banned = self._request(history_item_ids, exclude, filters)
        if history.size == 0:
            return self._popularity_result(k, banned, allowed, timer, unknown, "popularity")

        try:
            merged, user_vectors, routes = self._retrieve(history, k, banned, timer)
        except STAGE_ERRORS as exc:
            return self._popularity_result(k, banned, allowed, timer, unknown,
                                           "popularity;" + _stage_fallback("retrieval", exc, "popularity"))
        if allowed is not None:
            passing = allowed[merged.items]
            merged = merged.take(passing)
            routes = {name: r[passing] for name, r in routes.items()}
        cand, scores, launchers = merged.items, merged.merged, merged.launchers
        # Each stage orders positions into cand (C,); per-stage scores stay aligned with cand.
        stage_scores: dict[str, np.ndarray] = {"retrieval": scores}

        def served(pos: np.ndarray, pos_scores: np.ndarray, path: str) -> RecommendResult:
            top = pos[:k]
            explained = {name: st[top] for name, st in stage_scores.items()} if explain else {}
            items = self._items(cand[top], pos_scores[:k], launchers[top], explained,
                                {name: r[top] for name, r in routes.items()} if explain else {})
            if allowed is not None and len(items) < k:  # filtered list came out short: top it up
                extra = self.popularity(k - len(items), np.concatenate([banned, cand[top]]), allowed)
                items += [replace(it, score=None) for it in extra]  # not scored by this answer's stage
                path += ";filter_backfill"
            return self._result(items, path, timer, unknown, scored_by=path.split(";")[0])

        everything = np.arange(cand.size)
        if cand.size == 0:  # everything seen, excluded or filtered out
            return served(everything, scores, "retrieval")
        if "prerank" not in self.stages:
            return served(everything, scores, "retrieval")
        if timeout_ms is not None and timer.elapsed_ms() > timeout_ms:
            return served(everything, scores, "retrieval;timeout")
        try:
            order, pre_scores, pv, feats = self._prerank(history, merged, user_vectors)
        except STAGE_ERRORS as exc:
            timer.lap("prerank")
            return served(everything, scores, "retrieval;" + _stage_fallback("prerank", exc, "the retrieval order"))
        timer.lap("prerank")
        stage_scores["prerank"] = pre_scores
        if "rerank" not in self.stages or self._rerank_len == 0:
            return served(order, pre_scores[order], "prerank")
        if timeout_ms is not None and timer.elapsed_ms() > timeout_ms:
            return served(order, pre_scores[order], "prerank;timeout")

        n = min(self.prerank_n, self._rerank_len, order.size)
        head = order[:n]
        try:
            re_order, re_scores = self._rerank(cand[head], pre_scores[head], pv[head], scores[head],
                                               None if feats is None else feats[head])
        except STAGE_ERRORS as exc:
            timer.lap("rerank")
            return served(order, pre_scores[order], "prerank;" + _stage_fallback("rerank", exc, "the pre-rank order"))
        timer.lap("rerank")
        rerank_scores = np.full(cand.size, np.nan, np.float32)  # only the top n are re-ranked
        rerank_scores[head] = re_scores
        stage_scores["rerank"] = rerank_scores
        final = np.concatenate([head[re_order], order[n:]])
        # items past the re-ranked top n keep the pre-rank order, with no re-rank score
        return served(final, np.concatenate([re_scores[re_order], np.full(order.size - n, np.nan, np.float32)]),
                      "rerank")

    def recommend_popular(self, history_item_ids: list[str], k: int = 10, exclude: list[str] | None = None,
                          filters: dict[str, list[str]] | None = None, reason: str = "") -> RecommendResult:
        """The popularity fallback alone (no model stage runs): what recommend() serves without a
        usable history, here for any history (seen, excluded and filtered-out items dropped as
        there). reason: appended to `served_by` ("timeout" -> "popularity;timeout")."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        timer = _Timer()
        allowed, _, unknown, banned = self._request(history_item_ids, exclude, filters)
        served_by = f"popularity;{reason}" if reason else "popularity"
        return self._popularity_result(k, banned, allowed, timer, unknown, served_by)

    def candidates(self, history_item_ids: list[str]) -> np.ndarray:
        """The retrieval stage's candidate set (C,) of internal ids for a history, seen items
        removed: what the pre-ranker gets to see (FAISS's top retrieval_k, and the item-to-item
        route's items when merged). Empty for an empty history."""
        history, _ = self.to_indices(history_item_ids)
        if history.size == 0:
            return np.zeros(0, np.int64)
        return self._retrieve(history, 1, np.unique(history), _Timer())[0].items

    def _request(self, history_item_ids: list[str], exclude: list[str] | None, filters: dict[str, list[str]] | None
                 ) -> tuple[np.ndarray | None, np.ndarray, int, np.ndarray]:
        """A request's filter mask (N + 1,) or None, its known history (L,), the number of unknown
        history ids and the items never to return (seen + excluded, sorted, unique)."""
        allowed = self.filter_mask(filters) if filters else None
        history, unknown = self.to_indices(history_item_ids)
        excluded, _ = self.to_indices(exclude or [])
        return allowed, history, unknown, np.unique(np.concatenate([history, excluded]))

    def _popularity_result(self, k: int, banned: np.ndarray, allowed: np.ndarray | None, timer: _Timer, unknown: int,
                 served_by: str) -> RecommendResult:
        items = self.popularity(k, banned, allowed)
        timer.lap("popularity")
        return self._result(items, served_by, timer, unknown)

    # --- filters ---

    def filter_mask(self, filters: dict[str, list[str]]) -> np.ndarray:
        """(N + 1,) bool: items whose features pass every filter; [0] (padding) is False.

        Masks are cached per (name, values), so a repeated filter costs one lookup."""
        mask = np.ones(self.v.num_items + 1, bool)
        mask[0] = False
        for name, values in sorted(filters.items()):
            key = (name, tuple(sorted(set(values))))
            part = self._filter_cache.get(key)
            if part is None:
                part = self._feature_mask(name, key[1])
                if len(self._filter_cache) >= FILTER_CACHE_SIZE:
                    self._filter_cache.pop(next(iter(self._filter_cache)))
                self._filter_cache[key] = part
            mask &= part
        return mask

    def _feature_mask(self, name: str, values: tuple[str, ...]) -> np.ndarray:
        feats = self.v.item_features
        if name not in feats.filterable():
            raise FilterError(name, f"unknown item feature; filterable: {sorted(feats.filterable())}")
        if not values:
            raise FilterError(name, "needs at least one value")
        vocab = {v: c for c, v in enumerate(feats.vocab[name], start=1)}
        missing = [v for v in values if v not in vocab]
        if missing:
            raise FilterError(name, f"unknown value(s) {missing[:5]}; {len(vocab)} known values")
        codes = np.asarray([vocab[v] for v in values], np.int64)
        col = feats.codes(name)
        hit = np.isin(col, codes)  # (N + 1,) or (N + 1, K) for a multi-valued feature
        return np.asarray(hit.any(axis=1) if hit.ndim == 2 else hit, bool)

    # --- stages ---

    def _retrieve(self, history: np.ndarray, k: int, banned: np.ndarray,
                  timer: _Timer) -> tuple[Merged, np.ndarray, dict[str, np.ndarray]]:
        """The candidates (C,) with their retrieval scores, launchers and route ranks (Merged),
        the user vectors (M, D) and each route's score per candidate (C,) (NaN where the route
        did not return it)."""
        seq = history[-self.v.maxlen:][None]  # (1, L)
        users = self.v.retrieval.run(None, {"item_seq": seq})[0]  # (1, M, D)
        timer.lap("encode")
        hits = search_fused(self.v.index, users[0], max(self.retrieval_k, k), exclude=banned, timings_ms=timer.ms)
        timer.restart()
        cand, scores, launchers = hits.user(0)
        if self.item2item is None:
            _finite("retrieval", scores)
            return Merged.faiss_only(cand, scores, launchers), users[0], {"faiss": scores}
        m = merge_routes(cand, scores, launchers, self.item2item, history, banned, users[0], self.v.items)
        timer.lap("item2item")
        _finite("retrieval", m.merged)  # FAISS's scores plus the route's term: one check covers both
        routes = {"faiss": np.where(m.by_faiss, m.retrieval, np.nan), "i2i": np.where(m.i2i > 0, m.i2i, np.nan)}
        return m, users[0], routes

    def _prerank(self, history: np.ndarray, m: Merged,
                 user_vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """Pre-rank order of m.items, scores (C,), the raw PV (C, L * H) and the raw pair
        features (C, F) (None without a pair prior) of every candidate."""
        cand, ret_scores, launchers = m.items, m.merged, m.launchers
        feeds = self.user_features.feeds(history, user_vectors)
        heads = self.v.prerank_user.run(None, feeds)[0][0]  # (L, H, d)
        pv = head_interactions(heads, self.v.prerank_items, cand)  # (C, L * H), the re-ranker's PV
        scores = pv.sum(axis=1, dtype=np.float32)  # (C,) the IntTower score, from the same products
        feats = None
        if self._pair is not None:
            assert self.v.pair_tables is not None
            feats = pair_features(self.v.pair_tables, history, m)  # (C, F), as the training lists
            scores = self._pair.score(scores, feats, launchers)
        elif self._has_prior:
            # the retrieval prior (models/cascade.py): a * tower + w * fused score + b[launcher]
            bias = self._prior_bias[np.minimum(launchers, self._prior_bias.size - 1)]
            scores = (self._tower_weight * scores + self._prior_weight * ret_scores + bias).astype(np.float32)
        _finite("prerank", scores)
        return np.argsort(-scores, kind="stable"), scores, pv, feats

    def _rerank(self, items: np.ndarray, scores: np.ndarray, pv: np.ndarray,
                ret_scores: np.ndarray, feats: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """PRM over the top n: order (n,) into items and the re-rank scores (n,)."""
        assert self._pv is not None and self.v.rerank_items is not None
        init = list_zscore(scores)  # (n,) z-scored within the list, as in training
        if self._rerank_scores == 2:
            init = np.stack([init, list_zscore(ret_scores)], axis=1)[None]  # (1, n, 2)
        else:
            init = init[None]  # (1, n)
        item_feats = self.v.rerank_items[items].astype(np.float32)  # (n, F)
        if self._rerank_pair:  # (n, F + P): the pair features z-scored as the pre-ranker's prior reads them
            assert self._pair is not None and feats is not None
            item_feats = np.concatenate([item_feats, self._pair.normalize(feats)], axis=1)
        out = self.v.rerank.run(None, {  # type: ignore[union-attr]
            "item_feats": item_feats[None],  # (1, n, F) or (1, n, F + P)
            "pv": self._pv.normalize(pv)[None].astype(np.float32),  # (1, n, L * H), as in training
            "init_score": init.astype(np.float32),
            "mask": np.ones((1, items.size), bool),
        })[0][0]  # (n,)
        if out.shape != items.shape:
            raise ValueError(f"{self.v.manifest.files.rerank_onnx} returned shape {out.shape} for {items.size} items")
        _finite("rerank", out)
        return np.argsort(-out, kind="stable"), out.astype(np.float32)

    # --- output ---

    def _items(self, items: np.ndarray, scores: np.ndarray, launchers: np.ndarray,
               stages: dict[str, np.ndarray], routes: dict[str, np.ndarray]) -> list[RecommendedItem]:
        """items, scores, launchers (k,) and, with explain, each stage's and each route's scores
        of these items (k,) (NaN where a stage / route did not score an item) -> result items."""
        per_item, per_route = _per_item(stages, items.size), _per_item(routes, items.size)
        return [RecommendedItem(str(self.v.item_ids[i]), None if s != s else float(s), int(m), st, ro)  # NaN: None
                for i, s, m, st, ro in zip(items.tolist(), scores.tolist(), launchers.tolist(), per_item, per_route)]

    def _result(self, items: list[RecommendedItem], served_by: str, timer: _Timer, unknown: int,
                scored_by: str = "popularity") -> RecommendResult:
        timer.ms["total"] = round(timer.elapsed_ms(), 3)
        return RecommendResult(items, self.v.version, served_by, timer.ms, unknown, scored_by)


def _per_item(columns: dict[str, np.ndarray], n: int) -> list[dict[str, float]]:
    """name -> (n,) scores -> n dicts of the non-NaN ones."""
    return [{name: float(c[j]) for name, c in columns.items() if not np.isnan(c[j])} for j in range(n)]
