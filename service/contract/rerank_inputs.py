"""The re-ranker's inputs, written by training and read by the service: one definition of each.

Per candidate of a list of n (the order the pre-ranker gave):
    item_feats (n, F)   rerank_items.npy[item]: rerank_item_features, computed once per catalog;
                        with pair_features, (n, F + P): then the pair features, z-scored (PAIR_FEATS_DOC)
    pv (n, L * H)       the pre-ranker's (layer, user head) interactions, PVStats.normalize'd with
                        the training lists' statistics
    init_score (n,)     the pre-rank score, list_zscore'd; with num_scores = 2 also the fused
                        retrieval score, z-scored the same way, as [..., 1]
The serving block (rerank_manifest.json, copied into a version's manifest as rerank.serving)
records the statistics and the shapes: RerankServing. NumPy only (service/contract imports no torch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.contract.blocks import BlockError
from service.contract.layout import RERANK_ITEMS, RERANK_ONNX

ITEM_FEATS_DOC = (f"{RERANK_ITEMS}[item] (N + 1, F): [retrieval embedding ; mean pre-rank item head ; log1p count], "
                  "z-scored over the catalog; row 0 = padding")
PV_DOC = "(pre-rank per (layer, user head) max over item heads of the dot product - pv_mean) / pv_std"
INIT_SCORE_DOC = "pre-rank score z-scored within the list (real entries)"
RETRIEVAL_SCORE_DOC = "; (1, n, 2) with the fused retrieval score z-scored the same way as [..., 1]"
STD_FLOOR = 1e-8  # a (near-)constant column is centred, not scaled


def rerank_item_features(table: np.ndarray, heads: np.ndarray, item_log_count: np.ndarray,
                         reference: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """(N + 1, F) float32 re-rank item features: [retrieval embedding ; mean pre-rank item head ;
    log1p count], each column z-scored over the catalog (no labels involved); row 0 = zeros.

    table (N + 1, D), heads (N + 1, G, d), item_log_count (N + 1,). `reference`: the (table,
    heads, log count) whose statistics z-score these rows (`recsys reindex`: the data set's
    catalog the re-ranker was trained with); default these rows themselves.
    """

    def raw(emb: np.ndarray, h: np.ndarray, cnt: np.ndarray) -> np.ndarray:
        return np.concatenate([emb, h.mean(axis=1), cnt[:, None]], axis=1, dtype=np.float32)  # (N + 1, F)

    feats = raw(table, heads, item_log_count)
    ref = feats if reference is None else raw(*reference)
    mu, sd = ref[1:].mean(axis=0), ref[1:].std(axis=0)
    feats = (feats - mu) / np.where(sd > STD_FLOOR, sd, 1.0)
    feats[0] = 0.0
    return feats.astype(np.float32)


@dataclass(frozen=True)
class PVStats:
    """Per-column mean / std of the raw PV over the training lists' real entries (saved with the model)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std):
            raise ValueError(f"pv mean and std differ in length: {len(self.mean)} != {len(self.std)}")
        if any(not s > 0 for s in self.std):
            raise ValueError(f"pv std must be > 0, got {min(self.std)}")

    @classmethod
    def fit(cls, pv: np.ndarray, mask: np.ndarray) -> PVStats:
        """pv (..., P) raw interactions, mask (...) real entries."""
        x = pv[mask]  # (R, P)
        sd = x.std(axis=0)
        return cls(tuple(float(v) for v in x.mean(axis=0)), tuple(float(v) if v > STD_FLOOR else 1.0 for v in sd))

    def normalize(self, pv: np.ndarray) -> np.ndarray:
        """(..., P) raw interactions -> the re-ranker's pv input (float32 statistics, as trained)."""
        return (pv - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)


def list_zscore(scores: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """(..., L) scores z-scored over each list's real entries (`mask`, default all), float64; 0
    elsewhere. The re-ranker's score inputs, in training and online."""
    mask = np.ones(scores.shape, dtype=bool) if mask is None else mask
    s = np.where(mask, scores, 0.0).astype(np.float64)
    cnt = np.maximum(mask.sum(axis=-1, keepdims=True), 1)
    mu = s.sum(axis=-1, keepdims=True) / cnt
    sd = np.sqrt((np.where(mask, s - mu, 0.0) ** 2).sum(axis=-1, keepdims=True) / cnt)
    return np.where(mask, (s - mu) / np.where(sd > STD_FLOOR, sd, 1.0), 0.0)


_SERVING_KEYS = ("model", "onnx", "item_features", "item_feats", "pv", "pv_mean", "pv_std", "init_score", "num_scores",
                 "upstream", "holdout", "list_len", "config", "pair_features")
PAIR_FEATS_DOC = ("; then the candidate's pair features (service/pair_features.py) z-scored with the pre-ranker's "
                  "pair_prior mean / std: item_feats (n, F + P)")  # what RerankServing.to_dict writes


@dataclass(frozen=True)
class RerankServing:
    """rerank_manifest.json: how the service builds the re-ranker's inputs (a version's rerank.serving).

    pv: the PV statistics; num_scores 1 (pre-rank score) or 2 (+ fused retrieval score); upstream /
    holdout: the retriever the training lists came from; list_len: N; config: the PRM's config dict;
    pair_features: item_feats also carry the pair features (PAIR_FEATS_DOC; absent before them: False).
    Blocks written before the cascade inputs have no num_scores / upstream / holdout (1 / None / 0).
    """

    pv: PVStats
    num_scores: int = 1
    upstream: str | None = None
    holdout: int = 0
    list_len: int = 30
    config: dict[str, Any] = field(default_factory=dict)
    model: str = "PRM"
    onnx: str = RERANK_ONNX
    item_features: str = RERANK_ITEMS
    pair_features: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # keys of a newer writer, written back unchanged

    def __post_init__(self) -> None:
        if self.num_scores not in (1, 2):
            raise ValueError(f"num_scores must be 1 or 2, got {self.num_scores}")

    def to_dict(self) -> dict[str, Any]:
        """Exactly the JSON `recsys train rerank` writes (key order included)."""
        return {
            "model": self.model, "onnx": self.onnx, "item_features": self.item_features,
            "item_feats": ITEM_FEATS_DOC + (PAIR_FEATS_DOC if self.pair_features else ""), "pv": PV_DOC,
            "pv_mean": list(self.pv.mean), "pv_std": list(self.pv.std),
            "init_score": INIT_SCORE_DOC + (RETRIEVAL_SCORE_DOC if self.num_scores == 2 else ""),
            "num_scores": self.num_scores, "upstream": self.upstream, "holdout": self.holdout,
            "list_len": self.list_len, "config": self.config,
            **({"pair_features": True} if self.pair_features else {}), **self.extra,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: Any, where: str = "rerank serving block") -> RerankServing:
        """BlockError naming the field (`where`.key) for a block without its PV statistics or with bad ones."""
        if not isinstance(d, dict):
            raise BlockError(where, f"must be a JSON object, got {d!r:.80}")
        for key in ("pv_mean", "pv_std"):
            if not isinstance(d.get(key), list):
                raise BlockError(f"{where}.{key}", f"must be a list of numbers, got {d.get(key)!r:.80}")
        try:
            return cls(PVStats(tuple(float(v) for v in d["pv_mean"]), tuple(float(v) for v in d["pv_std"])),
                       num_scores=int(d.get("num_scores", 1)), upstream=d.get("upstream"),
                       holdout=int(d.get("holdout", 0)), list_len=int(d.get("list_len", 30)),
                       config=dict(d.get("config", {})), model=str(d.get("model", "PRM")),
                       onnx=str(d.get("onnx", RERANK_ONNX)), item_features=str(d.get("item_features", RERANK_ITEMS)),
                       pair_features=d.get("pair_features") is True,
                       extra={k: v for k, v in d.items() if k not in _SERVING_KEYS})
        except (TypeError, ValueError) as exc:
            raise BlockError(where, f"is invalid: {exc}") from None
