"""DCN-v2 (Wang et al., 2021): a full-interaction reference ranker.

User and item fields are embedded together, crossed explicitly (x_{l+1} = x_0 * (W x_l + b)
+ x_l, full-rank W) and then passed through an MLP (the "stacked" variant). Every score needs
the user and the item together, so nothing is precomputable: it is used for training and
evaluation only, as the upper reference IntTower is compared with, never served.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.layers import MLP, FieldEmbedding, FieldModelConfig, Fields


@dataclass(frozen=True)
class DCNv2Config(FieldModelConfig):
    cross_layers: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cross_layers < 0:
            raise ValueError(f"cross_layers must be >= 0, got {self.cross_layers}")


class CrossLayer(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim)
        nn.init.zeros_(self.lin.bias)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.lin(x) + x  # (B, F * D)


class DCNv2(nn.Module):
    def __init__(self, cfg: DCNv2Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.user_embed = FieldEmbedding(cfg.user_fields, cfg.embed_dim)
        self.item_embed = FieldEmbedding(cfg.item_fields, cfg.embed_dim)
        width = (cfg.user_fields.num_fields + cfg.item_fields.num_fields) * cfg.embed_dim
        self.cross = nn.ModuleList(CrossLayer(width) for _ in range(cfg.cross_layers))
        self.mlp = MLP(width, cfg.hidden, cfg.dropout)
        self.out = nn.Linear(cfg.hidden[-1], 1)

    def forward(self, user: Fields, item: Fields) -> torch.Tensor:
        """(B,) logits for aligned user/item rows."""
        x0 = torch.cat([self.user_embed(user), self.item_embed(item)], dim=1).flatten(1)  # (B, F * D)
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        return self.out(self.mlp(x)[-1]).squeeze(-1)
