"""HSTU: the Hierarchical Sequential Transduction Unit of generative recommenders
(Zhai et al. 2024, "Actions Speak Louder than Words", eqs. 1-3), as a retrieval encoder.

One HSTU layer, on item states X (B, L, D):
    U, V, Q, K = split(SiLU(f1(LN(X))))                  (1)  f1: D -> 4 * H * d
    A = SiLU(Q K^T / sqrt(d) + rab_pos) / maxlen * causal   (2)  pointwise, not softmax
    Y = X + f2(LN(A V) * U)                              (3)  gating by U, f2: H * d -> D
Pointwise attention: every earlier item contributes SiLU(score) / maxlen, with no
normalisation across keys, so the attention mass grows with how much of the history is
relevant (the paper's argument for it on non-stationary vocabularies). Dividing by the
constant maxlen (the paper divides by the padded length n) keeps a left-padded history's output
independent of how much padding the caller added. rab_pos is a learnt bias per head and relative
distance t - s (0..maxlen - 1), causal.

Time bias: the paper adds rab_time(bucket(log |ts_t - ts_s|)). Timestamps are not part of the
retrieval contract (`item_seq -> user_vectors`, which the ONNX graph and the service keep), so
this encoder has positions only and no time bias.

Same contract as models.sasrec.MultiLauncherSASRec: `forward(item_seq) -> (B, L, 1, D)` user
vectors at every position (training, next-item cross-entropy), `encode_user(item_seq) ->
(B, 1, D)` (M = 1, the last position), `item_embeddings() -> (N, D)` tied with the input table
`item_embedding` ((N + 1, D), row 0 padding).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.layers import init_sequence_encoder


@dataclass(frozen=True)
class HSTUConfig:
    num_items: int  # N, padding excluded; embeddings have N + 1 rows
    maxlen: int = 50
    dim: int = 64
    num_blocks: int = 2
    num_heads: int = 2
    head_dim: int = 32  # d of Q, K, V, U per head
    dropout: float = 0.2
    abs_positions: bool = True  # add a learnt absolute position to the item embedding (as SASRec)

    def __post_init__(self) -> None:
        if self.num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {self.num_items}")
        if self.maxlen < 1:
            raise ValueError(f"maxlen must be >= 1, got {self.maxlen}")
        if self.dim < 1 or self.num_heads < 1 or self.head_dim < 1:
            raise ValueError(
                f"dim ({self.dim}), num_heads ({self.num_heads}) and head_dim ({self.head_dim}) must be >= 1"
            )
        if self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def num_launchers(self) -> int:
        """M of the user vectors (the manifest's dims.num_launchers)."""
        return 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class HSTULayer(nn.Module):
    def __init__(self, cfg: HSTUConfig) -> None:
        super().__init__()
        H, d = cfg.num_heads, cfg.head_dim
        self.num_heads, self.head_dim, self.maxlen = H, d, cfg.maxlen
        self.in_ln = nn.LayerNorm(cfg.dim, eps=1e-8)
        self.f1 = nn.Linear(cfg.dim, 4 * H * d)
        self.rab = nn.Parameter(torch.zeros(H, cfg.maxlen))  # bias per head and distance t - s
        self.av_ln = nn.LayerNorm(H * d, eps=1e-8)
        self.f2 = nn.Linear(H * d, cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
        """x (B, L, D); allowed (B, 1, L, L) float 0/1 causal over real items; dist (L, L) t - s."""
        H, d = self.num_heads, self.head_dim
        uvqk = F.silu(self.f1(self.in_ln(x))).unflatten(-1, (4, H, d))  # (B, L, 4, H, d)
        u, v, q, k = (uvqk.select(2, j).transpose(1, 2) for j in range(4))  # (B, H, L, d) each
        score = q @ k.transpose(-1, -2) / math.sqrt(d) + self.rab[:, dist]  # (B, H, L, L)
        att = F.silu(score) * allowed / self.maxlen  # pointwise, eq. 2
        av = (self.dropout(att) @ v).transpose(1, 2).flatten(-2)  # (B, L, H * d)
        gated = self.av_ln(av) * u.transpose(1, 2).flatten(-2)  # (B, L, H * d), eq. 3
        return x + self.dropout(self.f2(gated))


class HSTU(nn.Module):
    def __init__(self, config: HSTUConfig) -> None:
        super().__init__()
        self.config = config
        D = config.dim
        self.item_embedding = nn.Embedding(config.num_items + 1, D, padding_idx=0)
        self.position = nn.Embedding(config.maxlen, D) if config.abs_positions else None
        self.emb_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(HSTULayer(config) for _ in range(config.num_blocks))
        self.last_ln = nn.LayerNorm(D, eps=1e-8)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_sequence_encoder(self, self.item_embedding)

    def _encode(self, item_seq: torch.Tensor) -> torch.Tensor:
        """(B, L) left-padded -> (B, L', D) item states, L' = min(L, maxlen)."""
        item_seq = item_seq[:, -self.config.maxlen :]
        L = item_seq.shape[1]
        x = self.item_embedding(item_seq) * math.sqrt(self.config.dim)
        if self.position is not None:
            # right-aligned positions, as SASRec: the last item is always position maxlen - 1
            x = x + self.position(torch.arange(self.config.maxlen - L, self.config.maxlen, device=x.device))
        real = (item_seq != 0).unsqueeze(-1).to(x.dtype)  # (B, L, 1)
        x = self.emb_dropout(x * real)
        idx = torch.arange(L, device=x.device)
        dist = idx[:, None] - idx[None, :]  # (L, L) t - s
        causal = (dist >= 0).to(x.dtype)
        allowed = (causal[None] * real.transpose(1, 2)).unsqueeze(1)  # (B, 1, L, L): key s real, s <= t
        for block in self.blocks:
            x = block(x, allowed, dist.clamp(min=0))
        return self.last_ln(x)

    def forward(self, item_seq: torch.Tensor) -> torch.Tensor:
        """Training view: (B, L) -> (B, L', 1, D) user vectors at every position."""
        return self._encode(item_seq).unsqueeze(2)

    def encode_user(self, item_seq: torch.Tensor) -> torch.Tensor:
        """Serving view: (B, L) left-padded history -> (B, 1, D)."""
        return self._encode(item_seq)[:, -1:]

    def item_embeddings(self) -> torch.Tensor:
        """(N, D) embeddings of items 1..N (tied with the input embedding)."""
        return self.item_embedding.weight[1:]
