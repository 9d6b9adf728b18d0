"""The online multi-stage pipeline over one loaded version (DESIGN.md §6). NumPy + ONNX Runtime.

history -> retrieval ONNX (1, M, D) -> one FAISS search of the M vectors with max-fusion
(every item keeps its launcher; seen and excluded items dropped inside the search) -> pre-rank
(IntTower user part once in ONNX, NumPy against the candidates' item heads) -> top N ->
re-rank (PRM ONNX) -> top k. Items past the re-ranked N keep the pre-rank order.

Fallbacks: no usable history -> catalog popularity; a stage that raises -> the previous
stage's order, and `served_by` says so (e.g. "retrieval;prerank_failed").
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.artifacts import ORT_ERRORS, LoadedVersion
from service.index import search_fused
from service.prerank import head_interactions

logger = logging.getLogger(__name__)

# What a failing stage raises: ONNX Runtime errors on a bad feed, ValueError / IndexError from
# NumPy or faiss on a shape problem. Anything else is a bug and propagates.
STAGE_ERRORS: tuple[type[Exception], ...] = (*ORT_ERRORS, ValueError, IndexError)
# training/features.py codes: 0 = padding, 1 = out of vocabulary
PAD, OOV = 0, 1
HISTORY, LAST_ITEM = "history", "last_item"
USER_LOG_COUNT = "user_log_count"


@dataclass(frozen=True)
class RecommendedItem:
    """One result; `score` is from the last stage that ordered it, `launcher` None for popularity."""

    item_id: str
    score: float
    launcher: int | None
    stages: dict[str, float] = field(default_factory=dict)


@dataclass
class RecommendResult:
    items: list[RecommendedItem]
    model_version: str
    served_by: str
    timings_ms: dict[str, float]
    unknown_items: int = 0


class _Timer:
    def __init__(self) -> None:
        self.ms: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.ms[name] = round((now - self._t) * 1000.0, 3)
        self._t = now


def _encode(table: np.ndarray, raw: np.ndarray, *, zero_is_padding: bool) -> np.ndarray:
    """training.features.Vocab.encode: raw codes -> indices, unseen / out-of-table -> OOV."""
    inside = (raw >= 0) & (raw < table.size)
    out = np.where(inside, table[np.clip(raw, 0, table.size - 1)], OOV)
    out[raw == 0] = PAD if zero_is_padding else OOV
    return out.astype(np.int64)


class UserFeatures:
    """Pre-rank user-tower inputs for an online history, as training.features encodes them.

    Online we know only the history: user_id and user attributes are unknown (raw 0 -> OOV),
    `history` is the last history_len items left-padded, `last_item` the latest, and
    `user_log_count` is log1p of the history length (training used the user's training count).
    Other dense fields sit at their training mean (z = 0).
    """

    def __init__(self, spec: dict[str, Any]) -> None:
        user = spec["user"]
        self.history_len = int(spec["history_len"])
        self.sparse = [(name, np.asarray(t, np.int64)) for name, t in user["sparse"].items()]
        self.multi = [(name, np.asarray(m["table"], np.int64), int(m["width"])) for name, m in user["multi"].items()]
        self.dense = [(name, float(ms[0]), float(ms[1])) for name, ms in user["dense"].items()]

    def feeds(self, history: np.ndarray) -> dict[str, np.ndarray]:
        """history (L,) internal item ids, oldest first -> {user_sparse (1, S), user_dense (1, Dn), user_multi (1, K)}."""
        sparse = np.zeros((1, len(self.sparse)), np.int64)
        for j, (name, table) in enumerate(self.sparse):
            raw = np.array([history[-1] if name == LAST_ITEM and history.size else 0], np.int64)
            sparse[:, j] = _encode(table, raw, zero_is_padding=False)
        blocks = []
        for name, table, width in self.multi:
            raw = np.zeros(width, np.int64)
            if name == HISTORY and history.size:
                recent = history[-min(width, self.history_len):]
                raw[width - recent.size:] = recent  # left-padded, latest last
            blocks.append(_encode(table, raw, zero_is_padding=True)[None])
        multi = np.concatenate(blocks, axis=1) if blocks else np.zeros((1, 0), np.int64)
        dense = np.zeros((1, len(self.dense)), np.float32)
        for j, (name, mean, std) in enumerate(self.dense):
            if name == USER_LOG_COUNT:
                dense[0, j] = (np.log1p(history.size) - mean) / std
        return {"user_sparse": sparse, "user_dense": dense, "user_multi": multi}


class Recommender:
    """DESIGN §6 over one LoadedVersion; thread-safe (no mutable state after construction)."""

    def __init__(self, version: LoadedVersion, retrieval_k: int = 200, prerank_n: int = 30) -> None:
        if retrieval_k < 1 or prerank_n < 1:
            raise ValueError(f"retrieval_k and prerank_n must be >= 1, got {retrieval_k} and {prerank_n}")
        self.v = version
        self.retrieval_k = retrieval_k
        self.prerank_n = prerank_n
        self.user_features = UserFeatures(version.prerank_features)
        self._popular = (np.argsort(-version.popularity[1:], kind="stable") + 1).astype(np.int64)  # (N,)
        self._pv_mean: np.ndarray | None = None
        self._pv_std: np.ndarray | None = None
        self._rerank_len = 0
        rerank = version.manifest.get("rerank")
        if version.rerank is not None and rerank:
            serving = rerank.get("serving", {})
            self._pv_mean = np.asarray(serving["pv_mean"], np.float32)
            self._pv_std = np.asarray(serving["pv_std"], np.float32)
            self._rerank_len = int(rerank["config"]["max_len"])

    @property
    def model_version(self) -> str:
        return self.v.version

    def to_indices(self, item_ids: list[str]) -> tuple[np.ndarray, int]:
        """External ids -> internal indices (order kept) and the number of unknown ids skipped."""
        idx = [self.v.id_to_index.get(x, 0) for x in item_ids]
        known = np.asarray([i for i in idx if i > 0], np.int64)
        return known, len(idx) - known.size

    def popularity(self, k: int, banned: np.ndarray) -> list[RecommendedItem]:
        order = self._popular[~np.isin(self._popular, banned)][:k]
        return [RecommendedItem(str(self.v.item_ids[i]), float(self.v.popularity[i]), None,
                                {"popularity": float(self.v.popularity[i])}) for i in order]

    def recommend(self, history_item_ids: list[str], k: int = 10, exclude: list[str] | None = None,
                  explain: bool = True) -> RecommendResult:
        """Top-k external ids for a history (oldest first); seen and `exclude` items never returned.

        explain=False skips collecting each item's per-stage scores (`stages` stays empty).
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        timer = _Timer()
        history, unknown = self.to_indices(history_item_ids)
        excluded, _ = self.to_indices(exclude or [])
        banned = np.unique(np.concatenate([history, excluded]))
        if history.size == 0:
            items = self.popularity(k, banned)
            timer.lap("popularity")
            return self._result(items, "popularity", timer, unknown)

        try:
            cand, scores, launchers = self._retrieve(history, k, banned)
        except STAGE_ERRORS:
            logger.exception("retrieval failed; serving popularity")
            items = self.popularity(k, banned)
            timer.lap("popularity")
            return self._result(items, "popularity;retrieval_failed", timer, unknown)
        timer.lap("retrieval")
        if cand.size == 0:  # everything seen or excluded
            return self._result([], "retrieval", timer, unknown)
        launcher_of = dict(zip(cand.tolist(), launchers.tolist()))

        try:
            order, pre_scores, pv = self._prerank(history, cand)
        except STAGE_ERRORS:
            logger.exception("pre-rank failed; serving the retrieval order")
            timer.lap("prerank")
            return self._result(self._items(cand[:k], scores[:k], launcher_of, {"retrieval": (cand, scores)}, explain),
                                "retrieval;prerank_failed", timer, unknown)
        timer.lap("prerank")
        ranked, ranked_scores = cand[order], pre_scores[order]
        stage_scores = {"retrieval": (cand, scores), "prerank": (cand, pre_scores)}
        if self.v.rerank is None or self._rerank_len == 0:
            return self._result(self._items(ranked[:k], ranked_scores[:k], launcher_of, stage_scores, explain),
                                "prerank", timer, unknown)

        n = min(self.prerank_n, self._rerank_len, ranked.size)
        try:
            re_order, re_scores = self._rerank(ranked[:n], ranked_scores[:n], pv[order[:n]])
        except STAGE_ERRORS:
            logger.exception("re-rank failed; serving the pre-rank order")
            timer.lap("rerank")
            return self._result(self._items(ranked[:k], ranked_scores[:k], launcher_of, stage_scores, explain),
                                "prerank;rerank_failed", timer, unknown)
        timer.lap("rerank")
        final = np.concatenate([ranked[:n][re_order], ranked[n:]])[:k]
        final_scores = np.concatenate([re_scores[re_order], ranked_scores[n:]])[:k]
        stage_scores["rerank"] = (ranked[:n], re_scores)
        return self._result(self._items(final, final_scores, launcher_of, stage_scores, explain), "rerank", timer, unknown)

    # --- stages ---

    def _retrieve(self, history: np.ndarray, k: int, banned: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        seq = history[-self.v.maxlen:][None]  # (1, L)
        users = self.v.retrieval.run(None, {"item_seq": seq})[0]  # (1, M, D)
        hits = search_fused(self.v.index, users[0], max(self.retrieval_k, k), exclude=banned)
        cand, scores, launchers = hits.user(0)
        return cand, scores, launchers

    def _prerank(self, history: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pre-rank order of cand, scores (C,) and the raw PV (C, L * H) of every candidate."""
        heads = self.v.prerank_user.run(None, self.user_features.feeds(history))[0][0]  # (L, H, d)
        pv = head_interactions(heads, self.v.prerank_items, cand)  # (C, L * H), the re-ranker's PV
        scores = pv.sum(axis=1, dtype=np.float32)  # (C,) the IntTower score, from the same products
        return np.argsort(-scores, kind="stable"), scores, pv

    def _rerank(self, items: np.ndarray, scores: np.ndarray, pv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """PRM over the top n: order (n,) into items and the re-rank scores (n,)."""
        assert self._pv_mean is not None and self._pv_std is not None and self.v.rerank_items is not None
        s = scores.astype(np.float64)
        sd = s.std()
        init = (s - s.mean()) / (sd if sd > 1e-8 else 1.0)  # z-scored within the list, as in training
        out = self.v.rerank.run(None, {  # type: ignore[union-attr]
            "item_feats": self.v.rerank_items[items][None].astype(np.float32),  # (1, n, F)
            "pv": ((pv - self._pv_mean) / self._pv_std)[None].astype(np.float32),  # (1, n, L * H)
            "init_score": init[None].astype(np.float32),  # (1, n)
            "mask": np.ones((1, items.size), bool),
        })[0][0]  # (n,)
        if out.shape != items.shape or not np.isfinite(out).all():
            raise ValueError(f"rerank.onnx returned shape {out.shape} / non-finite scores for {items.size} items")
        return np.argsort(-out, kind="stable"), out.astype(np.float32)

    # --- output ---

    def _items(self, items: np.ndarray, scores: np.ndarray, launcher_of: dict[int, int],
               stage_scores: dict[str, tuple[np.ndarray, np.ndarray]], explain: bool) -> list[RecommendedItem]:
        # per-stage score lookups only when asked for: they touch every candidate, not just the top k
        lookup = {name: dict(zip(ids.tolist(), s.tolist()))
                  for name, (ids, s) in stage_scores.items()} if explain else {}
        out = []
        for i, s in zip(items.tolist(), scores.tolist()):
            stages = {name: float(m[i]) for name, m in lookup.items() if i in m}
            out.append(RecommendedItem(str(self.v.item_ids[i]), float(s), int(launcher_of[i]), stages))
        return out

    def _result(self, items: list[RecommendedItem], served_by: str, timer: _Timer, unknown: int) -> RecommendResult:
        timer.ms["total"] = round(sum(timer.ms.values()), 3)
        return RecommendResult(items, self.v.version, served_by, timer.ms, unknown)
