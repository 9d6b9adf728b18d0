"""Two-tower pre-ranker: score = <user tower output, item tower output>.

The baseline IntTower is measured against: same field embedding and hidden sizes, no
LightSE, no per-layer heads, one dot product at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.layers import MLP, FieldEmbedding, FieldModelConfig, Fields, FieldsConfig


@dataclass(frozen=True)
class TwoTowerConfig(FieldModelConfig):
    out_dim: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.out_dim < 1:
            raise ValueError(f"out_dim must be >= 1, got {self.out_dim}")


class Tower(nn.Module):
    """Fields -> (B, out_dim) through embedding, MLP and a linear output layer."""

    def __init__(self, fields: FieldsConfig, embed_dim: int, hidden: tuple[int, ...], out_dim: int, dropout: float):
        super().__init__()
        self.embed = FieldEmbedding(fields, embed_dim)
        self.mlp = MLP(fields.num_fields * embed_dim, hidden, dropout)
        self.out = nn.Linear(hidden[-1], out_dim)

    def forward(self, fields: Fields) -> torch.Tensor:
        e = self.embed(fields).flatten(1)  # (B, F * D)
        return self.out(self.mlp(e)[-1])  # (B, out_dim)


class TwoTower(nn.Module):
    def __init__(self, cfg: TwoTowerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.user_tower = Tower(cfg.user_fields, cfg.embed_dim, cfg.hidden, cfg.out_dim, cfg.dropout)
        self.item_tower = Tower(cfg.item_fields, cfg.embed_dim, cfg.hidden, cfg.out_dim, cfg.dropout)

    def user_heads(self, user: Fields) -> torch.Tensor:
        """(B, 1, 1, out_dim): one layer, one head, so the IntTower serving scorer applies."""
        return self.user_tower(user)[:, None, None, :]

    def item_heads(self, item: Fields) -> torch.Tensor:
        """(N, 1, out_dim)."""
        return self.item_tower(item)[:, None, :]

    @staticmethod
    def score(user_heads: torch.Tensor, item_heads: torch.Tensor) -> torch.Tensor:
        """(..., 1, 1, D) x (..., 1, D) -> (...) dot products (broadcasting leading dims)."""
        return (user_heads[..., 0, 0, :] * item_heads[..., 0, :]).sum(-1)

    def forward(self, user: Fields, item: Fields) -> torch.Tensor:
        """(B,) logits for aligned user/item rows."""
        return (self.user_tower(user) * self.item_tower(item)).sum(-1)
