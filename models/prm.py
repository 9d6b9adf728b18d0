"""PRM re-ranker (Personalized Re-ranking for Recommendation; reference: prm-reranker-notes.txt).

Every candidate of a list is one token:
    x_i = [item features ; personalised vector PV_i ; earlier stages' scores]   (F_item + P + S)
    h_i = W x_i + pos(rank_i)        rank_i = initial (pre-ranker) rank, 0 = top
    H   = TransformerEncoder(h) with a key padding mask
    s_i = w^T H_i                    the list softmax over s gives the click distribution
`PRM` with `pv_dim = 0` is PRM-BASE (no personalised vector). `PointwiseMLP` reads the same
inputs but scores each candidate alone: no attention, no position.

The scores are the pre-rank score (S = 1) or [pre-rank score, fused retrieval score]
(S = 2, `num_scores`), each z-scored within the list, so the model sees what both earlier stages
thought and can reproduce either order.

With `residual` the model starts from the order it is given: its logits are
    s_i = skip * score_i[0] + net(x)_i
with the last layer of `net` zero-initialised and skip = 1, so the untrained re-ranker returns
the pre-rank order exactly (z-scored scores are monotone in it) and training moves away from it
only where that helps; early stopping scores that start too (training/stages/rerank/train.py).

All models share one call signature, so one training loop and one export path serve them:
    forward(item_feats (B, L, F_item), pv (B, L, P), init_score (B, L) or (B, L, S), mask (B, L) bool)
        -> logits (B, L)
`mask` is True for real candidates. Padding positions get the logit `PAD_LOGIT` (finite, so a
softmax over a list stays defined), and never influence real positions. The initial rank of a
real candidate is the number of real candidates before it, so the pre-ranker's order is the
input order and padding may sit anywhere (normally at the end).
When pv_dim = 0 the `pv` argument is ignored whatever its width (export feeds a (B, L, 1) zero
tensor, see training/publish/onnx/rerank.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

PAD_LOGIT = -1e9  # logit of padding entries: exp(PAD_LOGIT - max) is exactly 0 in float32


@dataclass(frozen=True)
class PRMConfig:
    item_dim: int  # F_item
    pv_dim: int = 0  # P; 0 = PRM-BASE
    d_model: int = 64
    heads: int = 2
    layers: int = 2
    ffn_dim: int = 128
    dropout: float = 0.1
    max_len: int = 100  # longest list; size of the initial-rank embedding
    use_position: bool = True
    num_scores: int = 1  # S: 1 = pre-rank score, 2 = + fused retrieval score
    residual: bool = False  # start from the given order (see the module doc)

    def __post_init__(self) -> None:
        _check_dims(self.item_dim, self.pv_dim, self.dropout, self.max_len, self.num_scores)
        if self.d_model < 1:
            raise ValueError(f"d_model must be >= 1, got {self.d_model}")
        if self.heads < 1 or self.d_model % self.heads:
            raise ValueError(f"d_model ({self.d_model}) must be a positive multiple of heads ({self.heads})")
        if self.layers < 1:
            raise ValueError(f"layers must be >= 1, got {self.layers}")
        if self.ffn_dim < 1:
            raise ValueError(f"ffn_dim must be >= 1, got {self.ffn_dim}")

    @property
    def input_dim(self) -> int:
        return self.item_dim + self.pv_dim + self.num_scores

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PointwiseMLPConfig:
    item_dim: int
    pv_dim: int = 0
    hidden: tuple[int, ...] = (128, 64)
    dropout: float = 0.1
    max_len: int = 100  # not used by the model; bounds the exported list length
    num_scores: int = 1
    residual: bool = False

    def __post_init__(self) -> None:
        _check_dims(self.item_dim, self.pv_dim, self.dropout, self.max_len, self.num_scores)
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden must be a non-empty tuple of positive ints, got {self.hidden}")

    @property
    def input_dim(self) -> int:
        return self.item_dim + self.pv_dim + self.num_scores

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_dims(item_dim: int, pv_dim: int, dropout: float, max_len: int, num_scores: int) -> None:
    if num_scores < 1:
        raise ValueError(f"num_scores must be >= 1, got {num_scores}")
    if item_dim < 1:
        raise ValueError(f"item_dim must be >= 1, got {item_dim}")
    if pv_dim < 0:
        raise ValueError(f"pv_dim must be >= 0 (0 = no personalised vector), got {pv_dim}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")


def _tokens(pv_dim: int, item_feats: torch.Tensor, pv: torch.Tensor, init_score: torch.Tensor) -> torch.Tensor:
    """[item ; pv ; scores] (B, L, F_item + P + S); pv left out when pv_dim = 0; init_score (B, L)
    is one score, (B, L, S) several."""
    scores = init_score.unsqueeze(-1) if init_score.dim() == 2 else init_score  # (B, L, S)
    parts = [item_feats, pv, scores] if pv_dim else [item_feats, scores]
    return torch.cat(parts, dim=-1)


def _first_score(init_score: torch.Tensor) -> torch.Tensor:
    """(B, L) the pre-rank score out of init_score (B, L) or (B, L, S)."""
    return init_score if init_score.dim() == 2 else init_score[..., 0]


def _xavier(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.xavier_uniform_(m.weight)


class PRM(nn.Module):
    """Transformer over the candidate list (PRM; PRM-BASE when config.pv_dim = 0)."""

    def __init__(self, config: PRMConfig) -> None:
        super().__init__()
        self.config = config
        D = config.d_model
        self.input = nn.Linear(config.input_dim, D)
        self.position = nn.Embedding(config.max_len, D) if config.use_position else None
        self.dropout = nn.Dropout(config.dropout)
        layer = nn.TransformerEncoderLayer(
            D, config.heads, config.ffn_dim, config.dropout, activation="relu", batch_first=True
        )
        # no nested tensors: the same dense graph in training, eval and ONNX export
        self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.output = nn.Linear(D, 1)
        _xavier(self)
        self.skip = nn.Parameter(torch.ones(())) if config.residual else None
        if config.residual:
            nn.init.zeros_(self.output.weight)
        # nn.MultiheadAttention keeps its packed q/k/v projection as a Parameter, not a Linear
        for m in self.encoder.modules():
            if isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None:
                nn.init.xavier_uniform_(m.in_proj_weight)
                nn.init.zeros_(m.in_proj_bias)

    def forward(
        self, item_feats: torch.Tensor, pv: torch.Tensor, init_score: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """item_feats (B, L, F_item), pv (B, L, P), init_score (B, L) / (B, L, S), mask (B, L) bool -> (B, L)."""
        if item_feats.shape[1] > self.config.max_len:
            raise ValueError(f"list length {item_feats.shape[1]} exceeds max_len {self.config.max_len}")
        h = self.input(_tokens(self.config.pv_dim, item_feats, pv, init_score))  # (B, L, D)
        if self.position is not None:
            rank = (torch.cumsum(mask.to(torch.int64), dim=1) - 1).clamp(min=0)  # (B, L) initial rank
            h = h + self.position(rank)
        # a list with no real entry would mask every key (NaN softmax): let it attend to all
        ignore = ~mask & mask.any(dim=1, keepdim=True)  # (B, L) True = key hidden
        h = self.encoder(self.dropout(h), src_key_padding_mask=ignore)  # (B, L, D)
        logits = self.output(h).squeeze(-1)  # (B, L)
        if self.skip is not None:
            logits = logits + self.skip * _first_score(init_score)
        return logits.masked_fill(~mask, PAD_LOGIT)  # (B, L)


class PointwiseMLP(nn.Module):
    """The same per-candidate inputs as PRM, scored independently: no list context, no position."""

    def __init__(self, config: PointwiseMLPConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        width = config.input_dim
        for h in config.hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(config.dropout)]
            width = h
        head = nn.Linear(width, 1)
        self.net = nn.Sequential(*layers, head)
        _xavier(self)
        self.skip = nn.Parameter(torch.ones(())) if config.residual else None
        if config.residual:
            nn.init.zeros_(head.weight)

    def forward(
        self, item_feats: torch.Tensor, pv: torch.Tensor, init_score: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """item_feats (B, L, F_item), pv (B, L, P), init_score (B, L) / (B, L, S), mask (B, L) bool -> (B, L)."""
        x = _tokens(self.config.pv_dim, item_feats, pv, init_score)  # (B, L, F_item + P + S)
        logits = self.net(x).squeeze(-1)  # (B, L)
        if self.skip is not None:
            logits = logits + self.skip * _first_score(init_score)
        return logits.masked_fill(~mask, PAD_LOGIT)  # (B, L)


RerankModel = PRM | PointwiseMLP
RerankConfig = PRMConfig | PointwiseMLPConfig


def build_reranker(config: RerankConfig) -> RerankModel:
    """The model a config describes (a checkpoint stores the config beside the weights)."""
    return PRM(config) if isinstance(config, PRMConfig) else PointwiseMLP(config)
