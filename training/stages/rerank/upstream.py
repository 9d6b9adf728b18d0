"""The offline scorer of the stages before the re-ranker: retrieval + pre-rank over one data set.

`Pipeline` holds the trained retrieval and next-item pre-rank models (loaded and checked once,
training/checkpoints.py) with the catalog's pre-rank item heads and re-rank item features;
`rank_candidates` runs both stages for a batch of histories as the service does (retrieval top-C
with the whole history removed, then the pre-rank order) and keeps the raw PV of the top N. The
re-rank impressions (impressions.py), the export's upstream check (training/checkpoints.py) and
reindex (training/publish/item_side.py) all score through it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.cascade import PairPrior, RetrievalPrior
from service.contract.pair_features import PAIR_FEATURES
from service.contract.pair_features import PairPrior as PairPriorBlock
from service.contract.rerank_inputs import rerank_item_features
from training.checkpoints import Checkpoint, RetrievalModel, load_prerank, load_retrieval
from training.data.dataset import Dataset
from training.data.features import (
    RETRIEVAL_ITEM,
    RETRIEVAL_USER,
    FeatureSpec,
    item_columns,
    retrieval_columns,
    user_columns,
)
from training.data.splits import LeaveOneOut, pad_left
from training.stages.prerank import train as pr
from training.stages.prerank.lists import ListRoutes, list_routes, make_lists
from training.stages.prerank.train import HeadTowers
from training.stages.retrieval.item2item import Item2ItemConfig
from training.stages.rerank.sampling import ImpressionConfig
from training.stages.retrieval import train as rt


@dataclass(eq=False)
class Pipeline:
    """Trained retrieval and pre-rank stages over one data set, ready for batched scoring."""

    dataset: Dataset
    retrieval: RetrievalModel
    prerank: HeadTowers  # a tower with user_heads / item_heads
    spec: FeatureSpec  # of the pre-ranker
    user_log_count: np.ndarray  # (U,) float32 log1p training count (rank_candidates uses the history's length)
    item_heads: torch.Tensor  # (N + 1, G, d) pre-rank item heads of the catalog
    item_feats: np.ndarray  # (N + 1, F) float32 z-scored item features; row 0 = zeros
    prior: RetrievalPrior | PairPrior | None = None  # the pre-ranker's pair term (cascade inputs)
    # with a pair prior: the route and pair tables the lists are made with (training/stages/prerank/lists.py)
    routes: ListRoutes | None = None

    @property
    def cascade(self) -> bool:
        """The pre-ranker reads the retriever's vectors (RETRIEVAL_USER / RETRIEVAL_ITEM fields)."""
        return any(name.startswith(RETRIEVAL_USER + ":") for name in self.spec.user.dense)

    def pair_normalize(self, feats: np.ndarray) -> np.ndarray:
        """(..., P) raw pair features -> z-scored with the pair prior's statistics, by the service's
        own formula (PriorArrays.normalize over the exported numbers)."""
        assert isinstance(self.prior, PairPrior)
        return PairPriorBlock.from_dict(self.prior.serving(PAIR_FEATURES)).arrays().normalize(feats)

    @classmethod
    def load(cls, ds: Dataset, loo: LeaveOneOut, retrieval_dir: str | Path, prerank_dir: str | Path,
             data_spec: str | None = None) -> Pipeline:
        """Load and check both checkpoints (FileNotFoundError / DataError / CheckpointError on a bad one)."""
        retrieval, _ = load_retrieval(retrieval_dir, ds, data_spec)
        model, spec, ckpt = load_prerank(prerank_dir, ds, data_spec)
        return cls.from_models(ds, loo, retrieval, model, spec, ckpt)

    @classmethod
    def from_models(cls, ds: Dataset, loo: LeaveOneOut, retrieval: RetrievalModel, model: nn.Module,
                    spec: FeatureSpec, ckpt: Checkpoint) -> Pipeline:
        """From checkpoints loaded and checked already (load_retrieval / load_prerank); ValueError
        for a pre-ranker that cannot feed the re-ranker. A pre-ranker with a pair prior gets the
        route's table and the pair tables of the training part (its lists: make_lists, each
        without its own future)."""
        if not pr.has_heads(model):
            raise ValueError(f"{ckpt.path}: pre-ranker {ckpt.name!r} has no item heads (need inttower or two-tower)")
        objective = ckpt.extra.get("objective")
        if objective not in (None, "next-item"):
            raise ValueError(f"{ckpt.path}: pre-ranker was trained on objective {objective!r}, need next-item")
        train_rows = np.flatnonzero(loo.train_mask)
        user_cnt = np.log1p(np.bincount(ds.users[train_rows], minlength=ds.num_users)).astype(np.float32)
        item_cnt = np.log1p(np.bincount(ds.items[train_rows], minlength=ds.num_items + 1)).astype(np.float32)
        model.eval()
        heads = prerank_item_heads(model, spec, ds, retrieval.item_embedding.weight.detach().numpy(), item_cnt)
        feats = rerank_item_features(retrieval.item_embedding.weight.detach().numpy(), heads.numpy(), item_cnt)
        prior = pr.load_prior(ckpt)
        routes = None
        if isinstance(prior, PairPrior):
            made = ckpt.extra.get("retrieval") or {}
            routes = list_routes(ds, loo.train_mask, Item2ItemConfig(),
                                 made.get("route_serving"))  # the route settings its lists were made with
        return cls(ds, retrieval, model, spec, user_cnt, heads, feats, prior, routes)


def prerank_item_heads(model: HeadTowers, spec: FeatureSpec, ds: Dataset, table: np.ndarray, item_cnt: np.ndarray,
                       items: np.ndarray | None = None) -> torch.Tensor:
    """(N + 1, G, d) pre-rank item heads of the catalog (or of `items`) from raw item columns, the
    retriever's item table (N + 1, D) feeding the RETRIEVAL_ITEM fields when the spec has them."""
    rows = np.arange(ds.num_items + 1) if items is None else np.asarray(items)
    raw = item_columns(ds, rows)
    raw["item_log_count"] = item_cnt[rows]
    if any(name.startswith(RETRIEVAL_ITEM + ":") for name in spec.item.dense):
        raw.update(retrieval_columns(RETRIEVAL_ITEM, table[rows]))
    with torch.no_grad():
        return model.item_heads(pr.to_fields(spec.item.encode(raw)))


@dataclass
class Ranked:
    """Pre-rank ordered candidates of B (user, step) pairs.

    items (B, C) int64 in pre-rank order (0 = no candidate), scores (B, C) float32 pre-rank
    scores (-inf where no candidate), pv (B, N, L * H) float32 raw head interactions of the top N,
    ret_scores (B, C) float32 the fused retrieval scores in the same order (the merged ones for
    lists merged with the route); pair (B, N, F) float32 the raw pair features of the top N
    (None without a pair prior).
    """

    items: np.ndarray
    scores: np.ndarray
    pv: np.ndarray
    ret_scores: np.ndarray
    pair: np.ndarray | None = None

    @property
    def mask(self) -> np.ndarray:
        return self.items > 0


def rank_candidates(pipe: Pipeline, users: np.ndarray, ends: np.ndarray, cfg: ImpressionConfig,
                    progress: Callable[[str], None] | None = None) -> Ranked:
    """Retrieval top-C then pre-rank order, for histories ds.items[offsets[u] : ends].

    users (B,) user indices, ends (B,) exclusive end rows of each history (the row of the first
    item that is NOT history). The whole history is removed from the candidates (not only the
    retrieval window of maxlen items). Batched: one retrieval pass and one einsum per batch.
    """
    ds = pipe.dataset
    users, ends = np.asarray(users, dtype=np.int64), np.asarray(ends, dtype=np.int64)
    starts = ds.offsets[users]
    if (ends <= starts).any() or (ends > ds.offsets[users + 1]).any():
        raise ValueError("every history needs at least one item and must end inside its user's log")
    B, C, N = users.size, min(cfg.candidates, ds.num_items), cfg.list_len
    pair = isinstance(pipe.prior, PairPrior)
    W = C + (pipe.routes.route.candidates if pair and pipe.routes is not None and pipe.routes.route is not None else 0)
    items = np.zeros((B, W), dtype=np.int64)
    scores = np.full((B, W), -np.inf, dtype=np.float32)
    ret_scores = np.full((B, W), -np.inf, dtype=np.float32)
    pv_parts: list[np.ndarray] = []
    pair_parts: list[np.ndarray] = []
    pipe.prerank.eval()
    for b0 in range(0, B, cfg.batch_size):
        sl = slice(b0, b0 + cfg.batch_size)
        if pair:
            assert pipe.routes is not None
            ml = make_lists(pipe.retrieval, pipe.routes, ds, starts[sl], ends[sl], C)  # merged with the route, as served
            cand, r = torch.from_numpy(ml.items), torch.from_numpy(ml.merged)
            launch, user_vectors, feats = torch.from_numpy(ml.launchers), ml.users, torch.from_numpy(ml.features)
        else:
            hist = pad_left(ds.items, starts[sl], ends[sl], None)  # (b, Lmax) whole history; the encoder keeps maxlen
            top = rt.fused_top(pipe.retrieval, hist, C)
            cand, r = torch.from_numpy(top.items), torch.from_numpy(top.scores)  # (b, C)
            launch, user_vectors = torch.from_numpy(top.launchers), top.users
        # the pre-ranker's history field: left-padded, latest last (its LAST_ITEM is column -1)
        raw = user_columns(ds, users[sl], pad_left(ds.items, starts[sl], ends[sl], pipe.spec.history_len))
        raw["user_log_count"] = np.log1p(ends[sl] - starts[sl]).astype(np.float32)  # as the service: history length
        if pipe.cascade:
            raw.update(retrieval_columns(RETRIEVAL_USER, user_vectors))
        with torch.no_grad():
            uh = pipe.prerank.user_heads(pr.to_fields(pipe.spec.user.encode(raw)))  # (b, L, H, d)
            sims = torch.einsum("blhd,bcgd->bclhg", uh, pipe.item_heads[cand]).amax(dim=-1)  # (b, C, L, H)
            ps = sims.sum(dim=(-1, -2))  # (b, C) = IntTower score
            if isinstance(pipe.prior, PairPrior):
                ps = pipe.prior(ps, feats, launch)
            elif pipe.prior is not None:
                ps = pipe.prior(ps, torch.where(torch.isfinite(r), r, torch.zeros_like(r)), launch)
            ps = ps.masked_fill(cand == 0, -math.inf)
            order = torch.sort(ps, dim=1, descending=True, stable=True).indices  # (b, C)
            width = cand.shape[1]
            items[sl, :width] = torch.gather(cand, 1, order).numpy()
            scores[sl, :width] = torch.gather(ps, 1, order).numpy()
            ret_scores[sl, :width] = torch.gather(r, 1, order).numpy()
            top_n = order[:, :N]
            pv = torch.gather(sims.flatten(2), 1, top_n[..., None].expand(-1, -1, sims.shape[2] * sims.shape[3]))
            pv_parts.append(pv.numpy())  # (b, N, L * H)
            if pair:
                pair_parts.append(torch.gather(feats, 1, top_n[..., None].expand(-1, -1, feats.shape[-1])).numpy())
        if progress and (b0 // cfg.batch_size) % 10 == 0:
            progress(f"candidates {min(b0 + cfg.batch_size, B)}/{B}")
    return Ranked(items, scores, np.concatenate(pv_parts).astype(np.float32), ret_scores,
                  np.concatenate(pair_parts).astype(np.float32) if pair else None)
