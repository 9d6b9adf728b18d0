"""What a ranker adds to its own score from the stage before it (DESIGN §6: each stage sees the
earlier stages' scores, so it can reproduce the earlier order and then improve on it).

`RetrievalPrior` is the pre-ranker's pair term: for a candidate i of user u,

    s(u, i) = tower(u, i) + w * r(u, i) + b[l(u, i)]

where r is the fused retrieval score (max over launchers of <u_l, e_i>) and l the launcher that
gave it. With the tower at 0 and w > 0 the pre-rank order is exactly the retrieval order, which
is where training starts (w = 1, b = 0); the towers then learn a correction. Serving evaluates
the term in NumPy from two numbers per candidate the request path already has, so the pre-rank
cost per candidate stays that of the towers.
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
        self.weight = nn.Parameter(torch.ones(()))
        self.launcher_bias = nn.Parameter(torch.zeros(cfg.num_launchers))

    def forward(self, retrieval_score: torch.Tensor, launcher: torch.Tensor) -> torch.Tensor:
        """retrieval_score (...) float, launcher (...) int64 in [0, M) -> (...) the pair term."""
        return self.weight * retrieval_score + self.launcher_bias[launcher]

    def serving(self) -> dict[str, Any]:
        """The numbers the service needs (prerank_manifest.json "retrieval_prior")."""
        return {"weight": float(self.weight.detach()), "launcher_bias": self.launcher_bias.detach().tolist()}
