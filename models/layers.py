"""Layers shared by the pre-ranking models: field embedding, LightSE, MLP, late interaction.

Every tower reads one `Fields` triple (all tensors, so the user part exports to ONNX as three
named inputs):
    sparse (B, S) int64   one code per single-valued field (index 0 = padding, 1 = OOV)
    dense  (B, Dn) float32 already normalised numeric fields
    multi  (B, K) int64   the multi-valued fields concatenated along K, each right- or
                          left-padded with 0 to its declared width (masked mean pooling)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, NamedTuple, TypeVar

import torch
from torch import nn


class Fields(NamedTuple):
    sparse: torch.Tensor  # (B, S) int64
    dense: torch.Tensor  # (B, Dn) float32
    multi: torch.Tensor  # (B, K) int64, K = sum(multi_width)


@dataclass(frozen=True)
class FieldsConfig:
    """The shapes of one tower's input: vocabulary sizes (padding and OOV included)."""

    sparse_vocab: tuple[int, ...] = ()
    multi_vocab: tuple[int, ...] = ()
    multi_width: tuple[int, ...] = ()
    num_dense: int = 0

    def __post_init__(self) -> None:
        for name, sizes in (("sparse_vocab", self.sparse_vocab), ("multi_vocab", self.multi_vocab)):
            bad = [v for v in sizes if v < 2]
            if bad:
                raise ValueError(f"{name} sizes must be >= 2 (padding + OOV), got {bad[0]}")
        if len(self.multi_width) != len(self.multi_vocab):
            raise ValueError(
                f"multi_width has {len(self.multi_width)} entries but multi_vocab has {len(self.multi_vocab)}"
            )
        bad_w = [w for w in self.multi_width if w < 1]
        if bad_w:
            raise ValueError(f"multi_width entries must be >= 1, got {bad_w[0]}")
        if self.num_dense < 0:
            raise ValueError(f"num_dense must be >= 0, got {self.num_dense}")
        if self.num_fields == 0:
            raise ValueError("a tower needs at least one field, got none")

    @property
    def num_fields(self) -> int:
        return len(self.sparse_vocab) + len(self.multi_vocab) + self.num_dense

    @classmethod
    def from_dict(cls, d: dict) -> "FieldsConfig":
        return cls(
            sparse_vocab=tuple(d["sparse_vocab"]),
            multi_vocab=tuple(d["multi_vocab"]),
            multi_width=tuple(d["multi_width"]),
            num_dense=int(d["num_dense"]),
        )


C = TypeVar("C", bound="FieldModelConfig")


@dataclass(frozen=True)
class FieldModelConfig:
    """What every field-based pre-ranker shares: the two field sets, embedding size, MLP."""

    user_fields: FieldsConfig
    item_fields: FieldsConfig
    embed_dim: int = 16
    hidden: tuple[int, ...] = (256, 128, 64)
    dropout: float = 0.2

    def __post_init__(self) -> None:
        if self.embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1, got {self.embed_dim}")
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden must be a non-empty tuple of positive ints, got {self.hidden}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        return cls(
            **{
                **d,
                "user_fields": FieldsConfig.from_dict(d["user_fields"]),
                "item_fields": FieldsConfig.from_dict(d["item_fields"]),
                "hidden": tuple(d["hidden"]),
            }
        )


class FieldEmbedding(nn.Module):
    """Fields -> (B, F, D): one D-vector per field.

    Sparse fields are looked up, multi-valued fields mean-pooled over their non-zero codes,
    and each dense value x_j becomes the field x_j * w_j + b_j, so every field (dense ones
    included) can be re-weighted by LightSE and crossed by DCN-v2 alike.
    """

    def __init__(self, cfg: FieldsConfig, dim: int, init_std: float = 0.05) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"embedding dim must be >= 1, got {dim}")
        self.cfg = cfg
        self.dim = dim
        self.sparse = nn.ModuleList(nn.Embedding(v, dim, padding_idx=0) for v in cfg.sparse_vocab)
        self.multi = nn.ModuleList(nn.Embedding(v, dim, padding_idx=0) for v in cfg.multi_vocab)
        self.dense_w = nn.Parameter(torch.empty(cfg.num_dense, dim))
        self.dense_b = nn.Parameter(torch.zeros(cfg.num_dense, dim))
        for emb in (*self.sparse, *self.multi):
            nn.init.normal_(emb.weight, std=init_std)
            with torch.no_grad():
                emb.weight[0].zero_()
        nn.init.normal_(self.dense_w, std=init_std)
        bounds = [0]
        for w in cfg.multi_width:
            bounds.append(bounds[-1] + w)
        self.multi_bounds = bounds

    def forward(self, fields: Fields) -> torch.Tensor:
        out = [emb(fields.sparse[:, j]) for j, emb in enumerate(self.sparse)]  # each (B, D)
        for j, emb in enumerate(self.multi):
            codes = fields.multi[:, self.multi_bounds[j] : self.multi_bounds[j + 1]]  # (B, K_j)
            out.append(masked_mean(emb(codes), codes != 0))
        parts = [torch.stack(out, dim=1)] if out else []  # (B, S + M, D)
        if self.cfg.num_dense:
            parts.append(fields.dense.unsqueeze(-1) * self.dense_w + self.dense_b)  # (B, Dn, D)
        return torch.cat(parts, dim=1)  # (B, F, D)


def init_sequence_encoder(module: nn.Module, item_embedding: nn.Embedding) -> None:
    """Xavier-normal linear and embedding weights, zero biases, a zero padding row (item 0): the
    initialisation the sequence encoders share (N(0, 1) embeddings train far worse, DESIGN §3)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.xavier_normal_(m.weight)
    with torch.no_grad():
        item_embedding.weight[0].zero_()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, K, D) values, (B, K) bool mask -> (B, D) mean over the unmasked K; 0 if none."""
    m = mask.to(values.dtype).unsqueeze(-1)  # (B, K, 1)
    return (values * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


class LightSE(nn.Module):
    """IntTower's light squeeze-excitation: e + e * softmax(W mean_D(e) + b) per field.

    (B, F, D) -> (B, F, D). The residual keeps the original embedding, as the public code does.
    """

    def __init__(self, num_fields: int) -> None:
        super().__init__()
        if num_fields < 1:
            raise ValueError(f"LightSE num_fields must be >= 1, got {num_fields}")
        self.excitation = nn.Linear(num_fields, num_fields)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        z = emb.mean(dim=-1)  # (B, F) squeeze
        a = torch.softmax(self.excitation(z), dim=-1)  # (B, F) field weights
        return emb + emb * a.unsqueeze(-1)


class MLP(nn.Module):
    """Linear -> ReLU -> Dropout per layer; `forward` returns every layer's output."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...], dropout: float = 0.0) -> None:
        super().__init__()
        if not hidden or any(h < 1 for h in hidden):
            raise ValueError(f"hidden sizes must be a non-empty tuple of positive ints, got {hidden}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        dims = (in_dim, *hidden)
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for lin in self.linears:
            x = self.dropout(torch.relu(lin(x)))  # (B, h_i)
            outs.append(x)
        return outs


def late_interaction_score(user_heads: torch.Tensor, item_heads: torch.Tensor) -> torch.Tensor:
    """IntTower eq. (score): sum over layers and user heads of the max over item heads.

    user_heads (..., L, H, d), item_heads (..., G, d) with broadcastable leading dims -> (...).
    With L = H = G = 1 this is the plain two-tower dot product.
    """
    sims = torch.einsum("...lhd,...gd->...lhg", user_heads, item_heads)  # (..., L, H, G)
    return sims.max(dim=-1).values.sum(dim=(-1, -2))
