"""Multi-launcher SASRec (reference: multi-launcher-retrieval.md).

SASRec blocks (pre-LN attention + point-wise FFN, causal, learnable positions) over the item
sequence, with M learnable launcher tokens appended. Launchers attend to the whole sequence and
to each other; each launcher's output is one user vector, so one model gives M recall routes.

Training uses every position at once: the token layout is
    [item_0 .. item_{L-1}] [launchers of position 0] ... [launchers of position L-1]
where the launchers of position t see items 0..t and their M siblings, and items see only
earlier items (so item states are exactly SASRec's). Inference appends the launchers of the
last position only. num_launchers = 0 is plain SASRec: the user vector is the last item state.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

LauncherInit = Literal["independent", "copy_last"]
_NEG = -1e9  # additive mask value; finite so a row can never be all -inf


@dataclass(frozen=True)
class SASRecConfig:
    num_items: int  # N, padding excluded; embeddings have N + 1 rows
    maxlen: int = 50
    dim: int = 64
    num_blocks: int = 2
    num_heads: int = 1
    dropout: float = 0.2
    num_launchers: int = 1  # 0 = plain SASRec
    launcher_init: LauncherInit = "copy_last"

    def __post_init__(self) -> None:
        if self.num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {self.num_items}")
        if self.maxlen < 1:
            raise ValueError(f"maxlen must be >= 1, got {self.maxlen}")
        if self.dim < 1 or self.num_heads < 1 or self.dim % self.num_heads:
            raise ValueError(f"dim ({self.dim}) must be a positive multiple of num_heads ({self.num_heads})")
        if self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.num_launchers < 0:
            raise ValueError(f"num_launchers must be >= 0, got {self.num_launchers}")
        if self.launcher_init not in ("independent", "copy_last"):
            raise ValueError(f"launcher_init must be 'independent' or 'copy_last', got {self.launcher_init!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SelfAttention(nn.Module):
    """Multi-head attention with an additive (B, S, S) or (S, S) mask; export-friendly."""

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, query: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, S, D = context.shape
        H, d = self.num_heads, D // self.num_heads
        q = self.q(query).view(B, S, H, d).transpose(1, 2)  # (B, H, S, d)
        k, v = self.kv(context).view(B, S, 2, H, d).permute(2, 0, 3, 1, 4)  # 2 x (B, H, S, d)
        att = q @ k.transpose(-1, -2) / math.sqrt(d) + mask.unsqueeze(1)  # (B, H, S, S)
        att = self.dropout(att.softmax(dim=-1))
        return self.out((att @ v).transpose(1, 2).reshape(B, S, D))


class PointWiseFeedForward(nn.Module):
    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, dim), nn.Dropout(dropout), nn.ReLU(), nn.Linear(dim, dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + x


class SASRecBlock(nn.Module):
    """Original SASRec block: LN on the attention query, residual, LN, FFN with residual."""

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.attn_ln = nn.LayerNorm(dim, eps=1e-8)
        self.attn = SelfAttention(dim, num_heads, dropout)
        self.ffn_ln = nn.LayerNorm(dim, eps=1e-8)
        self.ffn = PointWiseFeedForward(dim, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.attn_ln(x), x, mask) + x
        return self.ffn(self.ffn_ln(x))


class MultiLauncherSASRec(nn.Module):
    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.config = config
        D, M = config.dim, config.num_launchers
        self.item_embedding = nn.Embedding(config.num_items + 1, D, padding_idx=0)
        self.position = nn.Embedding(config.maxlen, D)
        self.launchers = nn.Parameter(torch.empty(max(M, 1), D)) if M else None
        self.emb_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            SASRecBlock(D, config.num_heads, config.dropout) for _ in range(config.num_blocks)
        )
        self.last_ln = nn.LayerNorm(D, eps=1e-8)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Xavier for embeddings and linear weights: N(0, 1) embeddings train far worse (DESIGN §3)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.xavier_normal_(m.weight)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()
        if self.launchers is not None:
            nn.init.xavier_normal_(self.launchers)

    # --- token construction ---

    def _item_tokens(self, item_seq: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, L, D): scaled embeddings + right-aligned positions, padding zeroed."""
        L = item_seq.shape[1]
        if L > self.config.maxlen:
            item_seq = item_seq[:, -self.config.maxlen :]
            L = self.config.maxlen
        pos = torch.arange(self.config.maxlen - L, self.config.maxlen, device=item_seq.device)
        x = self.item_embedding(item_seq) * math.sqrt(self.config.dim) + self.position(pos)
        return x * (item_seq != 0).unsqueeze(-1).to(x.dtype)

    def _launcher_tokens(self, anchor: torch.Tensor) -> torch.Tensor:
        """(B, T) anchor items -> (B, T * M, D) launcher tokens (launcher + anchor if copy_last)."""
        assert self.launchers is not None
        B, T = anchor.shape
        M, D = self.config.num_launchers, self.config.dim
        tok = self.launchers.view(1, 1, M, D).expand(B, T, M, D)
        if self.config.launcher_init == "copy_last":
            tok = tok + self.item_embedding(anchor).unsqueeze(2)  # (B, T, M, D)
        return (tok * math.sqrt(D)).reshape(B, T * M, D)

    def _mask(self, item_seq: torch.Tensor, launcher_slots: torch.Tensor | None) -> torch.Tensor:
        """Additive mask (B, S, S) for S = L + T*M tokens.

        launcher_slots (T,): the item position each launcher group is attached to.
        """
        B, L = item_seq.shape
        dev = item_seq.device
        M = self.config.num_launchers
        idx = torch.arange(L, device=dev)
        allowed_items = idx[None, :] <= idx[:, None]  # (L, L) causal
        key_ok = (item_seq != 0).unsqueeze(1)  # (B, 1, L)
        if launcher_slots is None:
            allowed = allowed_items.unsqueeze(0) & key_ok  # (B, L, L)
        else:
            slot = launcher_slots.repeat_interleave(M)  # (T*M,) item position of each launcher
            n_l = slot.shape[0]
            l_to_items = idx[None, :] <= slot[:, None]  # (T*M, L)
            l_to_l = slot[:, None] == slot[None, :]  # (T*M, T*M) siblings only
            top = torch.cat([allowed_items, torch.zeros(L, n_l, dtype=torch.bool, device=dev)], dim=1)
            bottom = torch.cat([l_to_items, l_to_l], dim=1)
            key_ok = torch.cat([key_ok, torch.ones(B, 1, n_l, dtype=torch.bool, device=dev)], dim=2)
            allowed = torch.cat([top, bottom], dim=0).unsqueeze(0) & key_ok  # (B, S, S)
        S = allowed.shape[-1]
        allowed = allowed | torch.eye(S, dtype=torch.bool, device=dev).unsqueeze(0)  # no empty rows
        return torch.zeros(allowed.shape, device=dev).masked_fill(~allowed, _NEG)

    def _encode(self, item_seq: torch.Tensor, launcher_slots: torch.Tensor | None) -> torch.Tensor:
        x = self._item_tokens(item_seq)
        item_seq = item_seq[:, -x.shape[1] :]
        if launcher_slots is not None:
            x = torch.cat([x, self._launcher_tokens(item_seq[:, launcher_slots])], dim=1)
        mask = self._mask(item_seq, launcher_slots)
        x = self.emb_dropout(x)
        for block in self.blocks:
            x = block(x, mask)
        return self.last_ln(x)  # (B, S, D)

    # --- public contract ---

    def forward(self, item_seq: torch.Tensor) -> torch.Tensor:
        """Training view: (B, L) -> (B, L, M', D) user vectors at every position.

        M' = num_launchers, or 1 (the item state itself) for plain SASRec.
        """
        B, L = item_seq.shape
        L = min(L, self.config.maxlen)
        M = self.config.num_launchers
        if M == 0:
            return self._encode(item_seq, None).unsqueeze(2)  # (B, L, 1, D)
        h = self._encode(item_seq, torch.arange(L, device=item_seq.device))
        return h[:, L:].reshape(B, L, M, self.config.dim)

    def encode_user(self, item_seq: torch.Tensor) -> torch.Tensor:
        """Serving view: (B, L) left-padded history -> (B, M', D) user vectors."""
        L = min(item_seq.shape[1], self.config.maxlen)
        if self.config.num_launchers == 0:
            return self._encode(item_seq, None)[:, -1:]  # (B, 1, D)
        h = self._encode(item_seq, torch.tensor([L - 1], device=item_seq.device))
        return h[:, L:]  # (B, M, D)

    def item_embeddings(self) -> torch.Tensor:
        """(N, D) embeddings of items 1..N (tied with the input embedding)."""
        return self.item_embedding.weight[1:]


class EncodeUser(nn.Module):
    """Wrapper whose forward is encode_user, for ONNX export."""

    def __init__(self, model: MultiLauncherSASRec) -> None:
        super().__init__()
        self.model = model

    def forward(self, item_seq: torch.Tensor) -> torch.Tensor:
        return self.model.encode_user(item_seq)
