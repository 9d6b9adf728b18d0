"""What a ranker adds to its own score from the stage before it (DESIGN §6: each stage sees the
earlier stages' scores, so it can reproduce the earlier order and then improve on it).

`RetrievalPrior` combines the pre-ranker's tower score with the retriever's view of the pair:
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
