"""MIND: multi-interest extraction by capsule dynamic routing (Li et al. 2019, "Multi-Interest
Network with Dynamic Routing for Recommendation at Tmall"), as a retrieval encoder with K
user vectors.

Behaviour-to-interest (B2I) dynamic routing over the history's item embeddings e_i (L of them):
    ê_i = S e_i                                  shared bilinear map S (D x D), one for all K
    b_ki ← fixed random init                     (breaks the symmetry of the K capsules)
    repeat R times (a fixed number of routing iterations):
        w_ki = softmax_k(b_ki)                   each behaviour splits itself over the K capsules
        z_k  = sum_i w_ki ê_i
        u_k  = squash(z_k) = |z_k|^2 / (1 + |z_k|^2) * z_k / |z_k|
        b_ki ← b_ki + <u_k, ê_i>
    v_k = LN(u_k + FFN(u_k))                     the paper's ReLU layers after the capsules
The routing-logit init is a fixed N(0, 1) buffer saved with the weights and indexed by the
distance t - i of behaviour i from the last position t, so the same history always gives the
same interests (training, eager serving and the ONNX graph agree). The dynamic interest count
K'_u = max(1, min(K, log2 |I_u|)) of the paper is not used: K is fixed, because the serving
contract has a fixed M.

Training: label-aware attention (the paper's eq. 9) mixes the K interests with the target
item e_y before the softmax: v_u = sum_k a_k v_k, a = softmax_k(p * <v_k, e_y>), i.e.
pow(exp(<v_k, e_y>), p): p = 0 averages the interests, p -> inf takes the interest nearest the
target. That loss lives in training.stages.retrieval.train (label_aware_loss); this module returns the K
interests at every position.

Serving: the K interests are K user vectors, `encode_user(item_seq) -> (B, K, D)`; each goes
through the existing per-launcher FAISS search and the candidates are merged by max-fusion
(score(i) = max_k <v_k, e_i>), the same path as multi-launcher SASRec: the p -> inf limit of
label-aware attention, with the target unknown.

Same contract as models.sasrec.MultiLauncherSASRec: `forward(item_seq) -> (B, L, K, D)`,
`encode_user(item_seq) -> (B, K, D)`, `item_embeddings() -> (N, D)` tied with the input table
`item_embedding` ((N + 1, D), row 0 padding).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn

from models.layers import init_sequence_encoder


@dataclass(frozen=True)
class MINDConfig:
    num_items: int  # N, padding excluded; embeddings have N + 1 rows
    maxlen: int = 50
    dim: int = 64
    num_interests: int = 4  # K
    routing_iters: int = 3  # R
    label_power: float = 2.0  # p of label-aware attention (training only)
    dropout: float = 0.2
    init_seed: int = 0  # seed of the fixed routing-logit init

    def __post_init__(self) -> None:
        if self.num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {self.num_items}")
        if self.maxlen < 1 or self.dim < 1:
            raise ValueError(f"maxlen and dim must be >= 1, got {self.maxlen}, {self.dim}")
        if self.num_interests < 1:
            raise ValueError(f"num_interests must be >= 1, got {self.num_interests}")
        if self.routing_iters < 1:
            raise ValueError(f"routing_iters must be >= 1, got {self.routing_iters}")
        if self.label_power < 0:
            raise ValueError(f"label_power must be >= 0, got {self.label_power}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def num_launchers(self) -> int:
        """M of the user vectors (the manifest's dims.num_launchers)."""
        return self.num_interests

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def squash(z: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """(..., D) -> (..., D): |z|^2 / (1 + |z|^2) * z / |z| (norm in [0, 1), direction kept)."""
    sq = (z * z).sum(dim=-1, keepdim=True)
    return z * (sq / (1.0 + sq) / torch.sqrt(sq + eps))


class MIND(nn.Module):
    routing_init: torch.Tensor  # (K, maxlen) buffer: the fixed initial routing logits per distance

    def __init__(self, config: MINDConfig) -> None:
        super().__init__()
        self.config = config
        D, K = config.dim, config.num_interests
        self.item_embedding = nn.Embedding(config.num_items + 1, D, padding_idx=0)
        self.bilinear = nn.Linear(D, D, bias=False)  # S, shared by all K capsules
        g = torch.Generator().manual_seed(config.init_seed)
        self.register_buffer("routing_init", torch.randn(K, config.maxlen, generator=g))  # (K, distance)
        self.emb_dropout = nn.Dropout(config.dropout)
        self.ffn = nn.Sequential(nn.Linear(D, 2 * D), nn.ReLU(), nn.Dropout(config.dropout), nn.Linear(2 * D, D))
        self.out_ln = nn.LayerNorm(D, eps=1e-8)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_sequence_encoder(self, self.item_embedding)

    def _interests(self, item_seq: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """(B, L) left-padded history, (T,) last positions -> (B, T, K, D) interests of each prefix."""
        item_seq = item_seq[:, -self.config.maxlen :]
        L = item_seq.shape[1]
        e = self.item_embedding(item_seq) * math.sqrt(self.config.dim)  # (B, L, D)
        e_hat = self.bilinear(self.emb_dropout(e))  # (B, L, D)
        idx = torch.arange(L, device=item_seq.device)
        dist = ends[:, None] - idx[None, :]  # (T, L) distance of behaviour i from the end t
        allowed = (dist >= 0)[None] & (item_seq != 0)[:, None, :]  # (B, T, L)
        weight_mask = allowed.unsqueeze(2).to(e.dtype)  # (B, T, 1, L)
        b = self.routing_init[:, dist.clamp(min=0)].transpose(0, 1).unsqueeze(0)  # (1, T, K, L)
        b = b.expand(item_seq.shape[0], -1, -1, -1)  # (B, T, K, L)
        u = e_hat.new_zeros(())
        for it in range(self.config.routing_iters):
            w = b.softmax(dim=2) * weight_mask  # softmax over the K capsules, padding and future out
            z = torch.einsum("btkl,bld->btkd", w, e_hat)  # (B, T, K, D)
            u = squash(z)
            if it + 1 < self.config.routing_iters:
                b = b + torch.einsum("btkd,bld->btkl", u, e_hat)
        return self.out_ln(u + self.ffn(u))  # (B, T, K, D)

    def forward(self, item_seq: torch.Tensor) -> torch.Tensor:
        """Training view: (B, L) -> (B, L', K, D) interests after every position, L' = min(L, maxlen)."""
        L = min(item_seq.shape[1], self.config.maxlen)
        return self._interests(item_seq, torch.arange(L, device=item_seq.device))

    def encode_user(self, item_seq: torch.Tensor) -> torch.Tensor:
        """Serving view: (B, L) left-padded history -> (B, K, D) interest vectors."""
        L = min(item_seq.shape[1], self.config.maxlen)
        end = torch.arange(L, device=item_seq.device)[-1:]  # built from L so the export stays dynamic in L
        return self._interests(item_seq, end)[:, 0]

    def item_embeddings(self) -> torch.Tensor:
        """(N, D) embeddings of items 1..N (tied with the input embedding)."""
        return self.item_embedding.weight[1:]
