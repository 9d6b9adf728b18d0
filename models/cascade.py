"""What a ranker adds to its own score from the stage before it (DESIGN §6: each stage sees the
earlier stages' scores, so it can reproduce the earlier order and then improve on it).

`RetrievalPrior` (older versions; `PairPrior` below reads the pair features) combines the pre-ranker's tower score with the retriever's view of the pair:
for a candidate i of user u,

    s(u, i) = a * tower(u, i) + w * r(u, i) + b[l(u, i)]

where r is the fused retrieval score (max over launchers of <u_l, e_i>) and l the launcher that
gave it. Training starts at a = 0, w = 1, b = 0, where the pre-rank order IS the retrieval order
(ReZero-style: the tower's gate opens as far as it helps), so early stopping, which also scores
that starting point, never keeps a pre-ranker that is worse than retrieval on validation.
Serving evaluates the combination in NumPy from two numbers per candidate the request path
already has, so the pre-rank cost per candidate stays that of the towers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class RetrievalPriorConfig:
    num_launchers: int = 1  # M of the retriever (1 for plain SASRec)

    def __post_init__(self) -> None:
        if self.num_launchers < 1:
            raise ValueError(f"num_launchers must be >= 1, got {self.num_launchers}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RetrievalPrior(nn.Module):
    def __init__(self, cfg: RetrievalPriorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tower_weight = nn.Parameter(torch.zeros(()))
        self.weight = nn.Parameter(torch.ones(()))
        self.launcher_bias = nn.Parameter(torch.zeros(cfg.num_launchers))

    def forward(self, tower_score: torch.Tensor, retrieval_score: torch.Tensor, launcher: torch.Tensor) -> torch.Tensor:
        """tower_score (...), retrieval_score (...) float, launcher (...) int64 in [0, M) -> (...) scores."""
        return self.tower_weight * tower_score + self.weight * retrieval_score + self.launcher_bias[launcher]

    def serving(self) -> dict[str, Any]:
        """The numbers the service needs (prerank_manifest.json "retrieval_prior")."""
        return {"tower_weight": float(self.tower_weight.detach()), "weight": float(self.weight.detach()),
                "launcher_bias": self.launcher_bias.detach().tolist()}


@dataclass(frozen=True)
class PairPriorConfig:
    num_features: int  # F: the pair features (service/contract/pair_features.py PAIR_FEATURES)
    num_launchers: int = 1
    hidden: int = 16  # H of the residual MLP; 0 = linear only
    init_weight: tuple[float, ...] = ()  # (F,) the linear weights it starts from (the merged-retrieval order)
    mean: tuple[float, ...] = ()  # (F,) feature statistics of the training lists
    std: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.num_features < 1 or self.num_launchers < 1 or self.hidden < 0:
            raise ValueError(f"num_features, num_launchers must be >= 1 and hidden >= 0, got {self.num_features}, "
                             f"{self.num_launchers}, {self.hidden}")
        for name in ("init_weight", "mean", "std"):
            v = getattr(self, name)
            if len(v) != self.num_features:
                raise ValueError(f"{name} must have {self.num_features} values, got {len(v)}")
        if any(not s > 0 for s in self.std):
            raise ValueError(f"std must be > 0, got {min(self.std)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PairPrior(nn.Module):
    """The pre-ranker's prior as a learned function of the per-candidate pair features:

        s(u, i) = a * tower(u, i) + z(u, i) . w + b[l(u, i)] + relu(z W1 + c1) . w2,  z = (f - mean) / std

    Starts at a = 0, w = init_weight (the merged-retrieval score, standardised), b = 0, w2 = 0:
    the pre-rank order IS the merged retrieval order, and training moves from there (as
    RetrievalPrior). Served in NumPy from `serving()` (service/contract/pair_features.py)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, cfg: PairPriorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("mean", torch.tensor(cfg.mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(cfg.std, dtype=torch.float32))
        self.tower_weight = nn.Parameter(torch.zeros(()))
        self.weight = nn.Parameter(torch.tensor(cfg.init_weight, dtype=torch.float32))
        self.launcher_bias = nn.Parameter(torch.zeros(cfg.num_launchers))
        self.hidden = nn.Linear(cfg.num_features, cfg.hidden) if cfg.hidden else None
        self.out_weight = nn.Parameter(torch.zeros(cfg.hidden))

    def forward(self, tower_score: torch.Tensor, feats: torch.Tensor, launcher: torch.Tensor) -> torch.Tensor:
        """tower_score (...), feats (..., F) raw, launcher (...) int64 in [0, M) -> (...) scores."""
        return self.score_standardized(tower_score, self.standardize(feats), launcher)

    def standardize(self, feats: torch.Tensor) -> torch.Tensor:
        """z: raw pair features (..., F) on the training lists' scale."""
        return (feats - self.mean) / self.std

    def score_standardized(self, tower_score: torch.Tensor, z: torch.Tensor, launcher: torch.Tensor) -> torch.Tensor:
        """forward on features already standardized (a refit's many steps over the same lists read z once)."""
        s = self.tower_weight * tower_score + z @ self.weight + self.launcher_bias[launcher]
        if self.hidden is not None:
            s = s + torch.relu(self.hidden(z)) @ self.out_weight
        return s

    def serving(self, features: tuple[str, ...] = ()) -> dict[str, Any]:
        """The numbers the service needs (prerank_manifest.json "pair_prior"), for feature names `features`."""
        h = self.hidden

        def plain(t: torch.Tensor) -> Any:
            return t.detach().tolist()

        return {"features": list(features), "mean": plain(self.mean), "std": plain(self.std),
                "tower_weight": float(self.tower_weight.detach()), "weight": plain(self.weight),
                "launcher_bias": plain(self.launcher_bias),
                "hidden_weight": [] if h is None else plain(h.weight.T), "hidden_bias": [] if h is None else plain(h.bias),
                "out_weight": [] if h is None else plain(self.out_weight)}
