"""IntTower (reference: inttower-walkthrough.txt): a two-tower pre-ranker with
LightSE field re-weighting and fine-grained early interaction (FE-Block).

- user tower: every hidden layer i is projected into H heads m_u^{i,h} (FE-Block);
- item tower: only the last hidden layer is projected into H heads m_v^{L,h};
- score = sum_i sum_{h_u} max_{h_v} <m_u^{i,h_u}, m_v^{L,h_v}>.

The item side depends only on the item, so serving precomputes `item_heads` for the catalog
and scores a candidate with (L * H * H * d) multiply-adds in NumPy. CIR (the contrastive
regulariser over M_u^L, M_v^L) is a loss and lives in training/stages/prerank/train.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.layers import MLP, FieldEmbedding, FieldModelConfig, Fields, LightSE, late_interaction_score


@dataclass(frozen=True)
class IntTowerConfig(FieldModelConfig):
    heads: int = 8
    head_dim: int = 16
    lightse: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.heads < 1:
            raise ValueError(f"heads must be >= 1, got {self.heads}")
        if self.head_dim < 1:
            raise ValueError(f"head_dim must be >= 1, got {self.head_dim}")


class IntTower(nn.Module):
    def __init__(self, cfg: IntTowerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        H, d = cfg.heads, cfg.head_dim
        self.user_embed = FieldEmbedding(cfg.user_fields, cfg.embed_dim)
        self.item_embed = FieldEmbedding(cfg.item_fields, cfg.embed_dim)
        self.user_se = LightSE(cfg.user_fields.num_fields) if cfg.lightse else nn.Identity()
        self.item_se = LightSE(cfg.item_fields.num_fields) if cfg.lightse else nn.Identity()
        self.user_mlp = MLP(cfg.user_fields.num_fields * cfg.embed_dim, cfg.hidden, cfg.dropout)
        self.item_mlp = MLP(cfg.item_fields.num_fields * cfg.embed_dim, cfg.hidden, cfg.dropout)
        # FE-Block: m_u^{i,h} = W_u^{i,h} h_u^i + b_u^{i,h} for every layer i, all H heads at once
        self.user_proj = nn.ModuleList(nn.Linear(h, H * d) for h in cfg.hidden)
        self.item_proj = nn.Linear(cfg.hidden[-1], H * d)

    def user_heads(self, user: Fields) -> torch.Tensor:
        """(B, L, H, d): the heads of every user hidden layer."""
        e = self.user_se(self.user_embed(user)).flatten(1)  # (B, F * D)
        layers = self.user_mlp(e)  # L x (B, h_i)
        heads = [proj(h) for proj, h in zip(self.user_proj, layers)]  # L x (B, H * d)
        return torch.stack(heads, dim=1).unflatten(-1, (self.cfg.heads, self.cfg.head_dim))

    def item_heads(self, item: Fields) -> torch.Tensor:
        """(N, H, d): the heads of the last item hidden layer (precomputable)."""
        e = self.item_se(self.item_embed(item)).flatten(1)  # (N, F * D)
        last = self.item_mlp(e)[-1]  # (N, h_L)
        return self.item_proj(last).unflatten(-1, (self.cfg.heads, self.cfg.head_dim))

    @staticmethod
    def score(user_heads: torch.Tensor, item_heads: torch.Tensor) -> torch.Tensor:
        """(..., L, H, d) x (..., H, d) -> (...) logits, leading dims broadcast."""
        return late_interaction_score(user_heads, item_heads)

    def forward(self, user: Fields, item: Fields) -> torch.Tensor:
        """(B,) logits for aligned user/item rows."""
        return self.score(self.user_heads(user), self.item_heads(item))
