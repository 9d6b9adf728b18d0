"""The pair features' contract: names, order, settings, the shipped item columns, and the
pre-ranker's learned prior over them (`prerank.serving.pair_prior`). NumPy only.

Per candidate i of one request with history h (oldest first; h_0 = the last item), in this order
(computed by service/pair_features.py, the one definition training and serving both call):

    retrieval          r(i) = max over launchers of <u_l, e_i> (FAISS's fused score)
    route_term         sd(r) * i2i(i) / max_j i2i(j): the route's part of the merged score,
                       merged = retrieval + beta * route_term (service/item2item.py); 0 = not reached
    faiss_rank         log1p(position in FAISS's list); missing: log1p(FAISS's list length)
    faiss_missing      1 when FAISS did not return i (the route alone did)
    i2i_rank           log1p(position among every item the route reached, by route score);
                       missing: log1p(number reached)
    i2i_missing        1 when no recent item has i among its neighbours
    pop_all            log1p(training interactions of i)                      } PAIR_ITEMS columns,
    pop_recent         log1p(of those among each user's last RECENT_PER_USER) } shipped per version
    cooc_last          s(h_0, i) from the version's item-to-item table (0 when not a neighbour)
    cooc_recent        sum over a < COOC_RECENT of COOC_DECAY ** a * s(h_a, i)
    category_overlap   mean over i's category codes (every categorical / multi-valued item
                       feature) of the share of the last CATEGORY_HISTORY history items that hold
                       the code; 0 for a catalog without such features
    history_length     log1p(len(h))

The learned prior (models/cascade.py PairPrior) reads z = (f - mean) / std and serves

    s = tower_weight * tower + z . weight + launcher_bias[l] + relu(z W1 + b1) . w2
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.contract.blocks import Block, BlockError, number, optional

PAIR_FEATURES: tuple[str, ...] = (
    "retrieval", "route_term", "faiss_rank", "faiss_missing", "i2i_rank", "i2i_missing",
    "pop_all", "pop_recent", "cooc_last", "cooc_recent", "category_overlap", "history_length",
)
PAIR_ITEMS_COLUMNS: tuple[str, ...] = ("pop_all", "pop_recent")  # pair_items.npy (N + 1, 2) float32
RECENT_PER_USER = 10  # pop_recent: each user's last this many training interactions
COOC_RECENT = 4  # cooc_recent: the last this many history items ...
COOC_DECAY = 0.5  # ... weighted decay ** age
CATEGORY_HISTORY = 20  # category_overlap: the last this many history items
STD_FLOOR = 1e-6  # a (near-)constant feature is centred, not scaled


def feature_index(name: str) -> int:
    return PAIR_FEATURES.index(name)


@dataclass(frozen=True)
class PairPrior(Block):
    """`prerank.serving.pair_prior`: the pre-ranker's prior as a function of the pair features.

    features: PAIR_FEATURES as trained (must equal today's: the service computes these); mean, std
    (F,): the training lists' statistics; weight (F,); launcher_bias (M,); hidden_weight (F, H),
    hidden_bias (H,), out_weight (H,): the residual MLP (H may be 0); route: the item-to-item
    route's request settings the training lists were made with, which publish serves (absent:
    publish tunes them)."""

    features: list[str] = field(default_factory=list)
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    tower_weight: float = 0.0
    weight: list[float] = field(default_factory=list)
    launcher_bias: list[float] = field(default_factory=list)
    hidden_weight: list[list[float]] = field(default_factory=list)
    hidden_bias: list[float] = field(default_factory=list)
    out_weight: list[float] = field(default_factory=list)
    route: dict[str, float] | None = optional()

    @classmethod
    def from_dict(cls, d: Any, where: str = "prerank.serving.pair_prior") -> PairPrior:
        if not isinstance(d, dict):
            return cls._read(d, where)
        feats = d.get("features")
        if feats != list(PAIR_FEATURES):
            raise BlockError(f"{where}.features", f"must be {list(PAIR_FEATURES)} (what the service computes), got {feats!r:.200}")
        f = len(PAIR_FEATURES)
        for k in ("mean", "std", "weight"):
            v = d.get(k)
            if not isinstance(v, list) or len(v) != f:
                raise BlockError(f"{where}.{k}", f"must be a list of {f} numbers, got {v!r:.80}")
        bias = d.get("launcher_bias")
        if not isinstance(bias, list) or not bias:
            raise BlockError(f"{where}.launcher_bias", f"must be a non-empty list, got {bias!r:.80}")
        hw, hb, ow = d.get("hidden_weight") or [], d.get("hidden_bias") or [], d.get("out_weight") or []
        h = len(hb)
        if len(ow) != h or len(hw) != (f if h else 0) or any(not isinstance(r, list) or len(r) != h for r in hw):
            raise BlockError(f"{where}.hidden_weight", f"must be ({f}, H) with hidden_bias and out_weight (H,), got "
                             f"{len(hw)} rows, {h} biases, {len(ow)} output weights")
        tw = number(d, "tower_weight", where)
        return cls._read(d, where, tower_weight=0.0 if tw is None else tw)

    def arrays(self) -> PriorArrays:
        """The numbers as float32 arrays, ready for score()."""
        hw = np.asarray(self.hidden_weight, np.float32).reshape(len(PAIR_FEATURES), -1)
        return PriorArrays(np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32),
                           np.float32(self.tower_weight), np.asarray(self.weight, np.float32),
                           np.asarray(self.launcher_bias, np.float32), hw, np.asarray(self.hidden_bias, np.float32),
                           np.asarray(self.out_weight, np.float32))


@dataclass(frozen=True, eq=False)
class PriorArrays:
    """PairPrior's numbers as arrays; score() is the served formula (the module doc)."""

    mean: np.ndarray
    std: np.ndarray
    tower_weight: np.float32
    weight: np.ndarray
    launcher_bias: np.ndarray
    hidden_weight: np.ndarray
    hidden_bias: np.ndarray
    out_weight: np.ndarray

    def normalize(self, feats: np.ndarray) -> np.ndarray:
        """(..., F) raw pair features -> (..., F) float32 z."""
        return ((feats - self.mean) / self.std).astype(np.float32)

    def score(self, tower: np.ndarray, feats: np.ndarray, launchers: np.ndarray) -> np.ndarray:
        """tower (C,), feats (C, F) raw, launchers (C,) int -> (C,) float32 pre-rank scores."""
        z = self.normalize(feats)  # (C, F)
        s = self.tower_weight * tower + z @ self.weight
        s = s + self.launcher_bias[np.minimum(launchers, self.launcher_bias.size - 1)]
        if self.hidden_bias.size:
            s = s + np.maximum(z @ self.hidden_weight + self.hidden_bias, 0.0) @ self.out_weight
        return s.astype(np.float32)
