"""The three re-rankers (PRM, PRM-BASE, the pointwise MLP): their configs, fitting on the
impressions (training/stages/rerank/impressions.py) and their checkpoints (the one format of
training/checkpoints.py; read them with training.checkpoints.load_reranker)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from models.prm import PointwiseMLPConfig, PRMConfig, RerankConfig, RerankModel
from service.contract.rerank_inputs import PVStats
from training.checkpoints import kind_of, save_checkpoint
from training.stages.rerank.impressions import Impressions
from training.stages.rerank.sampling import ImpressionConfig
from training.stages.rerank.train import ListData, RerankTrainConfig, TrainResult, train_listwise


RERANKERS = ("prm", "prm_base", "mlp")


@dataclass(frozen=True)
class RerankerHParams:
    d_model: int = 64
    heads: int = 2
    layers: int = 2
    ffn_dim: int = 128
    dropout: float = 0.1
    mlp_hidden: tuple[int, ...] = (128, 64)
    residual: bool = True  # start from the pre-rank order (models/prm.py)


def reranker_config(name: str, item_dim: int, pv_dim: int, max_len: int, hp: RerankerHParams,
                    num_scores: int = 1, residual: bool = False) -> RerankConfig:
    """PRM (with PV), PRM-BASE (pv_dim 0) or the pointwise MLP (with PV)."""
    if name == "mlp":
        return PointwiseMLPConfig(item_dim=item_dim, pv_dim=pv_dim, hidden=hp.mlp_hidden, dropout=hp.dropout,
                                  max_len=max_len, num_scores=num_scores, residual=residual)
    if name not in ("prm", "prm_base"):
        raise ValueError(f"unknown re-ranker {name!r} (expected one of {RERANKERS})")
    return PRMConfig(item_dim=item_dim, pv_dim=pv_dim if name == "prm" else 0, d_model=hp.d_model, heads=hp.heads,
                     layers=hp.layers, ffn_dim=hp.ffn_dim, dropout=hp.dropout, max_len=max_len,
                     num_scores=num_scores, residual=residual)


def new_reranker(name: str, imp: Impressions, hp: RerankerHParams, train_cfg: RerankTrainConfig) -> RerankModel:
    """The fresh re-ranker `name` for these impressions' shapes, seeded (train_cfg.seed)."""
    cfg = reranker_config(name, imp.train.item_dim, imp.train.pv_dim, imp.config.list_len, hp, imp.train.num_scores,
                          residual=hp.residual)
    torch.manual_seed(train_cfg.seed)
    return cast(RerankModel, kind_of("rerank", name).build(cfg))


def fit_reranker(name: str, imp: Impressions, hp: RerankerHParams, train_cfg: RerankTrainConfig,
                 progress: bool = False, valid: ListData | None = None, model: RerankModel | None = None) -> TrainResult:
    """Seeded init (new_reranker; or `model` as given, e.g. warm-started), listwise training on the
    lists with a click, early stopping on validation NDCG@10 of `valid` (default: the validation
    impressions)."""
    if model is None:
        model = new_reranker(name, imp, hp, train_cfg)
    # lists without a click add nothing to the listwise loss or to the list metrics (both skip
    # them): leaving them out changes no number and saves most of the compute
    return train_listwise(model, with_clicks(imp.train), train_cfg,
                          valid=with_clicks(imp.valid if valid is None else valid), progress=progress)


def with_clicks(data: ListData) -> ListData:
    """The lists with at least one click on a real entry."""
    return data.take(np.flatnonzero((data.labels * data.mask).sum(axis=1) > 0))


def save_reranker(path: str | Path, name: str, model: RerankModel, stats: PVStats, imp_cfg: ImpressionConfig,
                  fingerprint: str, **extra: Any) -> Path:
    """One checkpoint per model, kind rerank/<name>; extra: PV statistics, list config, then `extra`."""
    return save_checkpoint(path, f"rerank/{name}", model.config, model.state_dict(), fingerprint,
                           {"pv_stats": asdict(stats), "impressions": asdict(imp_cfg), **extra})
