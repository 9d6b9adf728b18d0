"""Re-ranking impressions built from the real pipeline (issue #5) and the end-to-end evaluation.

An impression is what the re-ranker would have been shown: for a user at time step t (the
history is the user's first t interactions), retrieval scores the catalog, the history's items
are removed, the top C go to the pre-ranker, and its top N (in pre-rank order) form the list.
An entry is clicked (label 1) when the user interacts with that item within the next T steps,
i.e. at positions t .. t + T - 1 of the sequence.

Where the lists come from (LeaveOneOut; only each user's TRAINING part is ever read, so no
validation or test interaction is a history item or a click):
    n = training length of the user, positions 0 .. n - 1
    eval steps   s in [n - T - E + 1, n - T]    the last E steps whose whole click window
                                                [s, s + T) fits inside the training part
    train steps  t in [1, s_first - T]          sampled, at most `lists_per_user`, seeded;
                                                t + T <= s_first: a training list's clicks end
                                                before the first evaluation step
Evaluation lists are split by user (seeded, `valid_frac`) into validation lists (early
stopping, tuning) and test lists (reported). Why the last steps and not random steps: the
re-ranker is trained on the past and judged on the future, as deployed, and the gap of T steps
keeps every training click out of every evaluation window, so no click event is both trained
on and tested. Why split the evaluation users: the validation and test windows of one user
overlap, so a user's lists go to one side only.
With a ranking fold (training/stages/prerank/folds.py: the upstream retriever trained with
`--holdout H`) the lists are out of sample instead: every step comes from the user's re-rank
window [n - H + P, n), the retriever never trained on those positions and the pre-ranker only on
earlier ones; the window's users are split train / valid / test (`valid_frac` / 2 each for the
two evaluation sides). Without one (H = 0) the steps are sampled as above from the whole
training part, in-sample for both upstream stages.

Per candidate (what models/prm.py reads; all fixed, no label enters a feature):
    item_feats (F)  [retrieval item embedding (D) ; pre-rank item heads mean-pooled (d) ;
                     log1p training count], each column z-scored over the catalog
    pv (L * H)      the IntTower interactions: for every user layer l and user head h,
                    max over item heads g of <m_u^{l,h}, m_v^{g}>; z-scored per column with
                    training-list statistics. Their sum is the pre-rank score.
    init_score      the pre-rank score, z-scored within each list (real entries); with
                    `retrieval_score` also the fused retrieval score, z-scored the same way
                    (the re-ranker's num_scores = 2)

End-to-end (`end_to_end`): each leave-one-out test user (history = training part + validation
item), retrieval top-C with the whole history removed -> pre-rank order of the C -> the
re-ranker reorders the top N; items after the top N keep the pre-rank order. HR@K / NDCG@K of
the test item over that final order (an item outside the C counts as a miss).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.cascade import RetrievalPrior
from models.prm import RerankModel
from models.sasrec import MultiLauncherSASRec
from service.contract.features import list_zscore
from training.stages.prerank import train as pr
from training.stages.retrieval import train as rt
from training.data.dataset import DataError, Dataset
from training.data.splits import LeaveOneOut, Split, pad_left
from training.data.features import RETRIEVAL_ITEM, RETRIEVAL_USER, item_columns, retrieval_columns, user_columns
from training.eval.metrics import ranking_metrics
from training.stages.rerank.sampling import ImpressionConfig, Steps, click_labels, sample_steps
from training.stages.rerank.train import ListData, score_lists

E2E_KS = (1, 5, 10, 20)


# --- the upstream stages ---


@dataclass(eq=False)
class Pipeline:
    """Trained retrieval and pre-rank stages over one data set, ready for batched scoring."""

    dataset: Dataset
    retrieval: MultiLauncherSASRec
    prerank: nn.Module  # a tower with user_heads / item_heads (IntTower, TwoTower)
    spec: Any  # training.data.features.FeatureSpec of the pre-ranker
    user_log_count: np.ndarray  # (U,) float32 log1p training count (rank_candidates uses the history's length)
    item_heads: torch.Tensor  # (N + 1, G, d) pre-rank item heads of the catalog
    item_feats: np.ndarray  # (N + 1, F) float32 z-scored item features; row 0 = zeros
    prior: RetrievalPrior | None = None  # the pre-ranker's pair term (cascade inputs)

    @property
    def cascade(self) -> bool:
        """The pre-ranker reads the retriever's vectors (RETRIEVAL_USER / RETRIEVAL_ITEM fields)."""
        return any(name.startswith(RETRIEVAL_USER + ":") for name in self.spec.user.dense)

    @classmethod
    def load(cls, ds: Dataset, loo: LeaveOneOut, retrieval_dir: str | Path, prerank_dir: str | Path) -> Pipeline:
        """Load both checkpoints (FileNotFoundError / DataError / ValueError on a bad one)."""
        retrieval, payload = rt.load_checkpoint(retrieval_dir)
        if retrieval.config.num_items != ds.num_items:
            raise DataError(f"{retrieval_dir}: retrieval checkpoint has {retrieval.config.num_items} items, "
                            f"the data set {ds.num_items}")
        if payload.get("fingerprint") not in (None, ds.fingerprint):
            raise DataError(f"{retrieval_dir}: retrieval checkpoint was trained on another data set "
                            f"(fingerprint {payload['fingerprint']}, data {ds.fingerprint})")
        model, spec, ckpt = pr.load_checkpoint(prerank_dir)
        if ckpt.get("fingerprint") not in (None, ds.fingerprint):
            raise DataError(f"{prerank_dir}: pre-rank checkpoint was trained on another data set")
        return cls.from_models(ds, loo, retrieval, model, spec, ckpt, prerank_dir)

    @classmethod
    def from_models(cls, ds: Dataset, loo: LeaveOneOut, retrieval: MultiLauncherSASRec, model: nn.Module, spec: Any,
                    ckpt: dict[str, Any], prerank_dir: str | Path) -> Pipeline:
        """From checkpoints loaded already (training/checkpoints.py loads them once for export and
        reindex); ValueError for a pre-ranker that cannot feed the re-ranker."""
        if not pr.has_heads(model):
            raise ValueError(f"{prerank_dir}: pre-ranker {ckpt.get('model')!r} has no item heads (need inttower or two-tower)")
        if ckpt.get("objective") not in (None, "next-item"):
            raise ValueError(f"{prerank_dir}: pre-ranker was trained on objective {ckpt['objective']!r}, need next-item")
        train_rows = np.flatnonzero(loo.train_mask)
        user_cnt = np.log1p(np.bincount(ds.users[train_rows], minlength=ds.num_users)).astype(np.float32)
        item_cnt = np.log1p(np.bincount(ds.items[train_rows], minlength=ds.num_items + 1)).astype(np.float32)
        model.eval()
        heads = prerank_item_heads(model, spec, ds, retrieval.item_embedding.weight.detach().numpy(), item_cnt)
        feats = rerank_item_features(retrieval.item_embedding.weight.detach().numpy(), heads.numpy(), item_cnt)
        return cls(ds, retrieval, model, spec, user_cnt, heads, feats, pr.load_prior(ckpt))


def prerank_item_heads(model: nn.Module, spec: Any, ds: Dataset, table: np.ndarray, item_cnt: np.ndarray,
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


def rerank_item_features(table: np.ndarray, heads: np.ndarray, item_log_count: np.ndarray,
                         reference: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """(N + 1, F) float32 re-rank item features: [retrieval embedding ; mean pre-rank item head ;
    log1p count], each column z-scored over the catalog (no labels involved); row 0 = zeros.

    table (N + 1, D), heads (N + 1, G, d), item_log_count (N + 1,). `reference`: the (table,
    heads, log count) whose statistics z-score these rows (`recsys reindex`: the data set's
    catalog the re-ranker was trained with); default these rows themselves.
    """

    def raw(emb: np.ndarray, h: np.ndarray, cnt: np.ndarray) -> np.ndarray:
        return np.concatenate([emb, h.mean(axis=1), cnt[:, None]], axis=1, dtype=np.float32)

    feats = raw(table, heads, item_log_count)
    ref = feats if reference is None else raw(*reference)
    mu, sd = ref[1:].mean(axis=0), ref[1:].std(axis=0)
    feats = (feats - mu) / np.where(sd > 1e-8, sd, 1.0)
    feats[0] = 0.0
    return feats.astype(np.float32)


@dataclass
class Ranked:
    """Pre-rank ordered candidates of B (user, step) pairs.

    items (B, C) int64 in pre-rank order (0 = no candidate), scores (B, C) float32 pre-rank
    scores (-inf where no candidate), pv (B, N, L * H) float32 raw head interactions of the top N,
    ret_scores (B, C) float32 the fused retrieval scores in the same order.
    """

    items: np.ndarray
    scores: np.ndarray
    pv: np.ndarray
    ret_scores: np.ndarray

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
    items = np.zeros((B, C), dtype=np.int64)
    scores = np.full((B, C), -np.inf, dtype=np.float32)
    ret_scores = np.full((B, C), -np.inf, dtype=np.float32)
    pv_parts: list[np.ndarray] = []
    pipe.prerank.eval()
    for b0 in range(0, B, cfg.batch_size):
        sl = slice(b0, b0 + cfg.batch_size)
        hist = pad_left(ds.items, starts[sl], ends[sl], None)  # (b, Lmax) whole history; the encoder keeps maxlen
        top = rt.fused_top(pipe.retrieval, hist, C)
        cand = torch.from_numpy(top.items)  # (b, C)
        # the pre-ranker's history field: left-padded, latest last (its LAST_ITEM is column -1)
        raw = user_columns(ds, users[sl], pad_left(ds.items, starts[sl], ends[sl], pipe.spec.history_len))
        raw["user_log_count"] = np.log1p(ends[sl] - starts[sl]).astype(np.float32)  # as the service: history length
        if pipe.cascade:
            raw.update(retrieval_columns(RETRIEVAL_USER, top.users))
        with torch.no_grad():
            uh = pipe.prerank.user_heads(pr.to_fields(pipe.spec.user.encode(raw)))  # (b, L, H, d)
            sims = torch.einsum("blhd,bcgd->bclhg", uh, pipe.item_heads[cand]).amax(dim=-1)  # (b, C, L, H)
            ps = sims.sum(dim=(-1, -2))  # (b, C) = IntTower score
            r = torch.from_numpy(top.scores)
            if pipe.prior is not None:
                ps = pipe.prior(ps, torch.where(torch.isfinite(r), r, torch.zeros_like(r)),
                                torch.from_numpy(top.launchers))
            ps = ps.masked_fill(cand == 0, -math.inf)
            order = torch.sort(ps, dim=1, descending=True, stable=True).indices  # (b, C)
            items[sl] = torch.gather(cand, 1, order).numpy()
            scores[sl] = torch.gather(ps, 1, order).numpy()
            ret_scores[sl] = torch.gather(r, 1, order).numpy()
            top_n = order[:, :N]
            pv = torch.gather(sims.flatten(2), 1, top_n[..., None].expand(-1, -1, sims.shape[2] * sims.shape[3]))
            pv_parts.append(pv.numpy())  # (b, N, L * H)
        if progress and (b0 // cfg.batch_size) % 10 == 0:
            progress(f"candidates {min(b0 + cfg.batch_size, B)}/{B}")
    return Ranked(items, scores, np.concatenate(pv_parts).astype(np.float32), ret_scores)


# --- list data ---


@dataclass(frozen=True)
class PVStats:
    """Per-column mean / std of the raw PV over the training lists' real entries (saved with the model)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def fit(cls, pv: np.ndarray, mask: np.ndarray) -> PVStats:
        x = pv[mask]  # (R, P)
        sd = x.std(axis=0)
        return cls(tuple(float(v) for v in x.mean(axis=0)), tuple(float(v) if v > 1e-8 else 1.0 for v in sd))


def list_data(pipe: Pipeline, ranked: Ranked, labels: np.ndarray, stats: PVStats, list_len: int,
              retrieval_score: bool = False) -> ListData:
    """ListData of the top `list_len` of `ranked` (pre-rank order); labels (B, list_len); with
    `retrieval_score` the fused retrieval scores as the second score input."""
    items = ranked.items[:, :list_len]
    mask = items > 0
    pv = (ranked.pv[:, :list_len] - np.asarray(stats.mean, np.float32)) / np.asarray(stats.std, np.float32)
    init = list_zscore(ranked.scores[:, :list_len], mask)  # z-score within the list
    ret = list_zscore(ranked.ret_scores[:, :list_len], mask) if retrieval_score else None
    return ListData(pipe.item_feats[items] * mask[..., None], pv * mask[..., None], init, labels * mask, mask, ret)



@dataclass
class Impressions:
    """Train / valid / test lists, the steps they come from and the PV statistics."""

    train: ListData
    valid: ListData
    test: ListData
    steps: dict[str, Steps]
    items: dict[str, np.ndarray]  # split -> (B, N) item indices of the lists
    pv_stats: PVStats
    config: ImpressionConfig

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"config": asdict(self.config)}
        for name in ("train", "valid", "test"):
            d: ListData = getattr(self, name)
            pos = d.labels.sum(axis=1)
            out[name] = {"lists": len(d), "with_click": int((pos > 0).sum()),
                         "clicks_per_list": float(pos.mean()), "users": int(np.unique(self.steps[name].users).size)}
        return out


def build_impressions(pipe: Pipeline, loo: LeaveOneOut, cfg: ImpressionConfig,
                      progress: Callable[[str], None] | None = None) -> Impressions:
    """Sample steps, generate candidates with the real stages, label clicks, assemble ListData."""
    ds = pipe.dataset
    steps = sample_steps(loo, cfg)
    ranked, labels = {}, {}
    for name, st in steps.items():
        ranked[name] = rank_candidates(pipe, st.users, st.ends(ds), cfg, progress)
        labels[name] = click_labels(ds, loo, st, ranked[name].items[:, : cfg.list_len], cfg.horizon)
    top = ranked["train"].items[:, : cfg.list_len] > 0
    stats = PVStats.fit(ranked["train"].pv[:, : cfg.list_len], top)
    parts = {n: list_data(pipe, ranked[n], labels[n], stats, cfg.list_len, cfg.retrieval_score) for n in steps}
    return Impressions(parts["train"], parts["valid"], parts["test"], steps,
                       {n: ranked[n].items[:, : cfg.list_len] for n in steps}, stats, cfg)


# --- lists of the leave-one-out users ---


def leave_one_out_lists(pipe: Pipeline, loo: LeaveOneOut, split: Split, stats: PVStats, cfg: ImpressionConfig,
                        progress: Callable[[str], None] | None = None) -> ListData:
    """The lists the service would re-rank for each leave-one-out user (history before the
    `split` target; retrieval top-C -> pre-rank top N), labelled with that target: early stopping
    on these measures what is served (the next item), not the impressions' click horizon."""
    users = loo.eval_users
    ranked = rank_candidates(pipe, users, loo.history_end(split), cfg, progress)
    labels = (ranked.items[:, : cfg.list_len] == loo.targets(split)[:, None]).astype(np.float32)
    return list_data(pipe, ranked, labels, stats, cfg.list_len, cfg.retrieval_score)


# --- end to end ---


def end_to_end(pipe: Pipeline, loo: LeaveOneOut, models: dict[str, RerankModel], stats: PVStats,
               cfg: ImpressionConfig, ks: tuple[int, ...] = E2E_KS,
               progress: Callable[[str], None] | None = None) -> dict[str, dict[str, float]]:
    """HR@K / NDCG@K of the leave-one-out test item: "prerank" (retrieval -> pre-rank order of
    the top C) and "rerank_<name>" per model (its top N reordered, the rest in pre-rank order).

    Retrieval alone is `training.eval.metrics.evaluate_retrieval` (full ranking); the caller adds it.
    """
    users = loo.eval_users
    ranked = rank_candidates(pipe, users, loo.history_end("test"), cfg, progress)
    targets = loo.targets("test")
    N = cfg.list_len
    lists = list_data(pipe, ranked, np.zeros((users.size, N), np.float32), stats, N, cfg.retrieval_score)
    miss = np.iinfo(np.int64).max // 4

    def ranks_of(order_items: np.ndarray) -> np.ndarray:
        hit = order_items == targets[:, None]
        return np.where(hit.any(axis=1), hit.argmax(axis=1), miss)

    out = {"prerank": ranking_metrics(ranks_of(ranked.items), ks)}
    for name, model in models.items():
        s = score_lists(model, lists)  # (B, N)
        order = np.argsort(-np.where(lists.mask, s, -np.inf), axis=1, kind="stable")
        final = np.concatenate([np.take_along_axis(ranked.items[:, :N], order, axis=1), ranked.items[:, N:]], axis=1)
        out[f"rerank_{name}"] = ranking_metrics(ranks_of(final), ks)
    for m in out.values():
        m["users"] = float(users.size)
        m[f"Recall@{ranked.items.shape[1]}"] = float((ranked.items == targets[:, None]).any(axis=1).mean())
        m[f"Recall@{N}"] = float((ranked.items[:, :N] == targets[:, None]).any(axis=1).mean())
    return out

