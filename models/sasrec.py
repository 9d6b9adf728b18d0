"""Multi-launcher SASRec (reference: multi-launcher-retrieval.md).

SASRec blocks (pre-LN attention + point-wise FFN, causal, learnable positions) over the item
sequence, with M learnable launcher tokens appended. Launchers attend to the whole sequence and
to each other; each launcher's output is one user vector, so one model gives M recall routes.

Training uses every position at once: each position t gets its own group of M launchers that
sees items 0..t and its M - 1 siblings, while items see only earlier items (so item states are
exactly SASRec's and nothing attends to a launcher but its siblings). Attention is computed in
that block structure, item->item (L x L) plus launcher->item (T*M x L) plus launcher->sibling
(T x M x M), rather than as one (L + T*M)^2 masked matrix: the same numbers at a fraction of
the cost. Inference uses the launcher group of the last position only.
num_launchers = 0 is plain SASRec: the user vector is the last item state.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn as nn

from models.layers import init_sequence_encoder

if TYPE_CHECKING:  # annotations only: hstu and mind import nothing from here at run time either
    from models.hstu import HSTU
    from models.mind import MIND

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
    """Multi-head attention for items (causal) and for launcher groups; export-friendly."""

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., H, d)"""
        return x.unflatten(-1, (self.num_heads, -1))

    def _kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., D) -> keys and values (..., H, d); kv's output is laid out as [k heads | v heads]."""
        kv = self.kv(x).unflatten(-1, (2, self.num_heads, -1))  # (..., 2, H, d)
        return kv.select(-3, 0), kv.select(-3, 1)

    def forward(self, query: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Items: query = LN(x), context = x, (B, L, D); mask (B, L, L) additive."""
        q = self._split(self.q(query)).transpose(1, 2)  # (B, H, L, d)
        k, v = self._kv(context)  # (B, L, H, d) x 2
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, H, L, d)
        att = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + mask.unsqueeze(1)  # (B, H, L, L)
        att = self.dropout(att.softmax(dim=-1))
        return self.out((att @ v).transpose(1, 2).flatten(-2))

    def launchers(
        self, query: torch.Tensor, launchers: torch.Tensor, items: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Launcher groups attend to items and to their siblings.

        query = LN(launchers), launchers (B, T, M, D); items (B, L, D) (the block's item input);
        mask (B, T, L) additive over items. Returns (B, T, M, D).
        """
        q = self._split(self.q(query))  # (B, T, M, H, d)
        k_i, v_i = self._kv(items)  # (B, L, H, d)
        k_s, v_s = self._kv(launchers)  # (B, T, M, H, d)
        scale = 1.0 / math.sqrt(q.shape[-1])
        s_items = torch.einsum("btmhd,blhd->btmhl", q, k_i) * scale + mask[:, :, None, None, :]
        s_sib = torch.einsum("btmhd,btnhd->btmhn", q, k_s) * scale  # (B, T, M, H, M)
        att = self.dropout(torch.cat([s_items, s_sib], dim=-1).softmax(dim=-1))
        L = items.shape[1]
        out = torch.einsum("btmhl,blhd->btmhd", att[..., :L], v_i) + torch.einsum(
            "btmhn,btnhd->btmhd", att[..., L:], v_s
        )
        return self.out(out.flatten(-2))


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

    def forward(
        self,
        items: torch.Tensor,
        item_mask: torch.Tensor,
        launchers: torch.Tensor | None = None,
        launcher_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """items (B, L, D), launchers (B, T, M, D) -> the same shapes."""
        if launchers is not None:
            assert launcher_mask is not None
            launchers = self.attn.launchers(self.attn_ln(launchers), launchers, items, launcher_mask) + launchers
            launchers = self.ffn(self.ffn_ln(launchers))
        items = self.attn(self.attn_ln(items), items, item_mask) + items
        return self.ffn(self.ffn_ln(items)), launchers


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
        init_sequence_encoder(self, self.item_embedding)
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
        """(B, T) anchor items -> (B, T, M, D) launcher tokens (launcher + anchor if copy_last)."""
        assert self.launchers is not None
        B, T = anchor.shape
        M, D = self.config.num_launchers, self.config.dim
        tok = self.launchers.view(1, 1, M, D).expand(B, T, M, D)
        if self.config.launcher_init == "copy_last":
            tok = tok + self.item_embedding(anchor).unsqueeze(2)  # (B, T, M, D)
        return tok * math.sqrt(D)

    @staticmethod
    def _masks(item_seq: torch.Tensor, slots: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Additive masks: items (B, L, L) causal over real items, launchers (B, T, L).

        slots (T,): the item position each launcher group is attached to. A position may always
        attend to itself, so padding rows never end up with every key masked.
        """
        L = item_seq.shape[1]
        idx = torch.arange(L, device=item_seq.device)
        key_ok = (item_seq != 0).unsqueeze(1)  # (B, 1, L)
        allowed = (idx[None, :] <= idx[:, None]).unsqueeze(0) & key_ok  # (B, L, L)
        allowed = allowed | torch.eye(L, dtype=torch.bool, device=item_seq.device)
        item_mask = torch.zeros(allowed.shape, device=item_seq.device).masked_fill(~allowed, _NEG)
        if slots is None:
            return item_mask, None
        l_allowed = (idx[None, :] <= slots[:, None]).unsqueeze(0) & key_ok  # (B, T, L)
        launcher_mask = torch.zeros(l_allowed.shape, device=item_seq.device).masked_fill(~l_allowed, _NEG)
        return item_mask, launcher_mask

    def _encode(
        self, item_seq: torch.Tensor, slots: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, L) -> item states (B, L, D) and launcher states (B, T, M, D) for the given slots."""
        x = self._item_tokens(item_seq)
        item_seq = item_seq[:, -x.shape[1] :]
        item_mask, launcher_mask = self._masks(item_seq, slots)
        x = self.emb_dropout(x)
        lt = None
        if slots is not None and self.config.num_launchers:
            lt = self.emb_dropout(self._launcher_tokens(item_seq[:, slots]))
        for block in self.blocks:
            x, lt = block(x, item_mask, lt, launcher_mask)
        return self.last_ln(x), None if lt is None else self.last_ln(lt)

    # --- public contract ---

    def forward(self, item_seq: torch.Tensor) -> torch.Tensor:
        """Training view: (B, L) -> (B, L, M', D) user vectors at every position.

        M' = num_launchers, or 1 (the item state itself) for plain SASRec.
        """
        L = min(item_seq.shape[1], self.config.maxlen)
        if self.config.num_launchers == 0:
            return self._encode(item_seq, None)[0].unsqueeze(2)  # (B, L, 1, D)
        _, lt = self._encode(item_seq, torch.arange(L, device=item_seq.device))
        assert lt is not None
        return lt

    def encode_user(self, item_seq: torch.Tensor) -> torch.Tensor:
        """Serving view: (B, L) left-padded history -> (B, M', D) user vectors."""
        L = min(item_seq.shape[1], self.config.maxlen)
        if self.config.num_launchers == 0:
            return self._encode(item_seq, None)[0][:, -1:]  # (B, 1, D)
        # slot = the last position; built from L so the export stays dynamic in L
        slot = torch.arange(L, device=item_seq.device)[-1:]
        _, lt = self._encode(item_seq, slot)
        assert lt is not None
        return lt[:, 0]  # (B, M, D)

    def item_embeddings(self) -> torch.Tensor:
        """(N, D) embeddings of items 1..N (tied with the input embedding)."""
        return self.item_embedding.weight[1:]


class EncodeUser(nn.Module):
    """Wrapper whose forward is encode_user, for ONNX export."""

    def __init__(self, model: MultiLauncherSASRec | HSTU | MIND) -> None:
        super().__init__()
        self.model = model

    def forward(self, item_seq: torch.Tensor) -> torch.Tensor:
        return self.model.encode_user(item_seq)
