"""Pre-ranking: data building, the two objectives, evaluation, checkpoints and export.

Objectives
- `ctr`: explicit ratings, label = rating > 3, rating 3 dropped, per-user temporal split
  (CTRSplit); binary cross-entropy (+ CIR for IntTower); AUC / LogLoss.
- `next-item`: implicit; each training position's next item is the positive, negatives are
  retrieval candidates of its history plus uniform random items; sampled softmax over
  [positive, negatives] (+ CIR). Evaluated on leave-one-out: the retrieval top-C of each
  user is re-ordered by the pre-ranker; list metrics against the held-out item.

Models come from models/ and see only tensors; this module owns NumPy, files and losses.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.cascade import RetrievalPrior, RetrievalPriorConfig
from models.dcnv2 import DCNv2, DCNv2Config
from models.inttower import IntTower, IntTowerConfig
from models.layers import Fields
from models.sasrec import MultiLauncherSASRec
from models.two_tower import TwoTower, TwoTowerConfig
from training.data.dataset import DataError, Dataset
from training.data.splits import CTRSplit, LeaveOneOut, Split, pad_left
from training.features import (
    RETRIEVAL_ITEM,
    RETRIEVAL_USER,
    EncodedFields,
    FeatureSpec,
    declare_features,
    fit_spec,
    item_columns,
    label_aggregates,
    recent_histories,
    retrieval_columns,
    user_columns,
)
from training.ranking_data import prerank_rows
from training.retrieval import FusedTop, fused_top
from training.metrics import Scorer, auc, list_metrics, logloss, mask_seen

MODELS: dict[str, tuple[type[nn.Module], type]] = {
    "two-tower": (TwoTower, TwoTowerConfig),
    "inttower": (IntTower, IntTowerConfig),
    "dcnv2": (DCNv2, DCNv2Config),
}
CHECKPOINT = "prerank.pt"
FEATURES = "prerank_features.json"
USER_ONNX = "prerank_user.onnx"
ITEMS_NPY = "prerank_items.npy"
MANIFEST = "prerank_manifest.json"


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 2  # epochs without validation improvement before stopping
    cir_weight: float = 0.0  # weight of the CIR loss; 0 disables it
    temperature: float = 0.1  # CIR InfoNCE temperature
    random_negatives: int = 16  # next-item only
    hard_negatives: int = 16  # next-item only: sampled from the retrieval candidates
    candidates: int = 200  # next-item: retrieval top-C that is re-ordered
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "candidates"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("patience", "random_negatives", "hard_negatives"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.cir_weight < 0:
            raise ValueError(f"cir_weight must be >= 0, got {self.cir_weight}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.random_negatives + self.hard_negatives < 1:
            raise ValueError("next-item training needs at least one negative (random or hard), got 0")


# --- losses ---


def cir_loss(
    user_vec: torch.Tensor, item_vec: torch.Tensor, temperature: float, item_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Contrastive interaction regularisation: in-batch InfoNCE over positive pairs.

    user_vec, item_vec (Q, P): row q of each is a positive (user, item) pair. Logits are
    cosine similarities / temperature (Q, Q); the target of row q is column q (the diagonal).
    The public code indexes the columns by the click label instead, which is a bug. Other
    rows holding the same item are not negatives for row q (`item_ids`), so they are masked.
    """
    q = user_vec.shape[0]
    if q < 2:
        return user_vec.sum() * 0.0  # no in-batch negatives: contributes nothing
    u = F.normalize(user_vec, dim=-1)
    v = F.normalize(item_vec, dim=-1)
    logits = u @ v.T / temperature  # (Q, Q)
    if item_ids is not None:
        same = (item_ids[:, None] == item_ids[None, :]) & ~torch.eye(q, dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill(same, float("-inf"))
    return F.cross_entropy(logits, torch.arange(q, device=logits.device))


# --- data ---


@dataclass
class PairRows:
    """Aligned (user, item, label) rows for the CTR objective."""

    user: EncodedFields
    item: EncodedFields
    items: np.ndarray  # (E,) item index of each row
    labels: np.ndarray  # (E,) float32

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class CTRData:
    spec: FeatureSpec
    train: PairRows
    valid: PairRows
    test: PairRows
    catalog: EncodedFields  # (N + 1,) item rows with training aggregates, for export


def build_ctr_data(ds: Dataset, split: CTRSplit, history_len: int = 50) -> CTRData:
    """Encode the CTR split; the spec (vocabularies, statistics, aggregates) sees train rows only."""
    decl = declare_features(ds, "ctr", history_len)
    labels = split.labels

    def raw(rows: np.ndarray, train: bool) -> tuple[dict, dict]:
        agg = label_aggregates(ds, split.train_idx, labels, rows, leave_one_out=train)
        u = user_columns(ds, ds.users[rows], recent_histories(ds, rows, history_len))
        i = item_columns(ds, ds.items[rows])
        u.update({k: v for k, v in agg.items() if k.startswith("user_")})
        i.update({k: v for k, v in agg.items() if k.startswith("item_")})
        return u, i

    u_train, i_train = raw(split.train_idx, train=True)
    spec = fit_spec(decl, u_train, i_train)

    def rows_of(idx: np.ndarray, u: dict, i: dict) -> PairRows:
        return PairRows(spec.user.encode(u), spec.item.encode(i), ds.items[idx], labels[idx].astype(np.float32))

    parts = {"train": rows_of(split.train_idx, u_train, i_train)}
    for name, idx in (("valid", split.valid_idx), ("test", split.test_idx)):
        parts[name] = rows_of(idx, *raw(idx, train=False))
    agg = split.aggregates()  # per item, training rows only
    cat = item_columns(ds, np.arange(ds.num_items + 1))
    cat.update({k: v for k, v in agg.items() if k.startswith("item_")})
    return CTRData(spec, **parts, catalog=spec.item.encode(cat))


@dataclass
class CandidateLists:
    """Evaluation lists for one leave-one-out split: retrieval top-C per evaluated user."""

    user: EncodedFields  # (B,) rows
    candidates: np.ndarray  # (B, C) item indices in retrieval order
    retrieval_scores: np.ndarray  # (B, C)
    targets: np.ndarray  # (B,)
    launchers: np.ndarray | None = None  # (B, C) int64 launcher of each fused score (cascade inputs)


@dataclass(eq=False)
class Retrievers:
    """Where the pre-ranker's lists and cascade inputs come from (training/ranking_data.py).

    served: the retriever the version serves (validation / test lists, export); upstream: the one
    that made the training lists, trained with `holdout` (the same model and 0 for in-sample
    lists); window: held-out positions the training examples come from (default: holdout; 0 =
    every training position); features: the retrieval score, launcher and vectors as inputs.
    """

    served: MultiLauncherSASRec
    upstream: MultiLauncherSASRec
    holdout: int = 0
    window: int | None = None
    features: bool = True

    @property
    def dims(self) -> tuple[int, int]:
        """(M, D) of the user vectors: M = launchers, or 1 for plain SASRec."""
        cfg = self.served.config
        return max(cfg.num_launchers, 1), cfg.dim


@dataclass
class NextItemData:
    spec: FeatureSpec
    catalog: EncodedFields  # (N + 1,) item rows as served; row 0 = padding
    train_user: EncodedFields  # (E,) one row per training example
    train_targets: np.ndarray  # (E,)
    train_candidates: np.ndarray  # (E, C) int32 retrieval candidates of each example's history
    valid: CandidateLists
    test: CandidateLists
    # cascade inputs (None without them): the upstream retriever's user vectors of each example
    # (E, M, D), its item table (N + 1, D) and the catalog rows encoded with it (training only)
    train_users: np.ndarray | None = None
    train_table: np.ndarray | None = None
    train_catalog: EncodedFields | None = None

    @property
    def cascade(self) -> bool:
        return self.train_users is not None

    @property
    def num_launchers(self) -> int:
        return 1 if self.train_users is None else int(self.train_users.shape[1])


def top_candidates(scorer: Scorer, histories: np.ndarray, k: int, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Retrieval top-k with seen items removed: (B, k) item indices and their scores."""
    items, scores = [], []
    for start in range(0, histories.shape[0], batch_size):
        hist = histories[start : start + batch_size]
        s = np.array(scorer(hist), dtype=np.float32, copy=True)
        mask_seen(s, hist)
        top = torch.topk(torch.from_numpy(s), min(k, s.shape[1] - 1), dim=1)
        items.append(top.indices.numpy())
        scores.append(top.values.numpy())
    return np.concatenate(items), np.concatenate(scores)


def build_next_item_data(
    ds: Dataset,
    loo: LeaveOneOut,
    scorers: dict[Split, Scorer] | None = None,
    history_len: int = 50,
    candidates: int = 200,
    max_train_examples: int | None = None,
    seed: int = 0,
    retrievers: Retrievers | None = None,
) -> NextItemData:
    """Training examples from the training part; evaluation lists from the retriever.

    With `retrievers` (a SASRec): training lists from the upstream retriever over the ranking
    window (training/ranking_data.py), validation / test lists from the served one, and with
    `retrievers.features` the cascade inputs. Without: `scorers[split]` (e.g. last-item) make
    the lists; `scorers["valid"]` must only know the training part (it also supplies the
    training examples' hard negatives), `scorers["test"]` may know the validation items too.
    """
    if retrievers is None and scorers is None:
        raise ValueError("build_next_item_data needs scorers or retrievers")
    cascade = retrievers is not None and retrievers.features
    decl = declare_features(ds, "next-item", history_len, retrievers.dims if cascade else None)
    window = 0 if retrievers is None else (retrievers.holdout if retrievers.window is None else retrievers.window)
    rows = prerank_rows(loo, window)
    if max_train_examples is not None and rows.size > max_train_examples:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_train_examples, replace=False))
    if rows.size == 0:
        raise DataError(f"{ds.name}: no training example with a history for the next-item objective")
    train_rows = np.flatnonzero(loo.full_train_mask())
    item_cnt = np.log1p(np.bincount(ds.items[train_rows], minlength=ds.num_items + 1)).astype(np.float32)

    def users_raw(users: np.ndarray, hist: np.ndarray, vectors: np.ndarray | None, ends: np.ndarray) -> dict:
        u = user_columns(ds, users, hist)
        # log1p of the history's length: what a request's history gives the service (a user's
        # total training count would differ from it at every training step)
        u["user_log_count"] = np.log1p(ends - ds.offsets[users]).astype(np.float32)
        if cascade:
            assert vectors is not None
            u.update(retrieval_columns(RETRIEVAL_USER, vectors))
        return u

    def items_raw(table: np.ndarray | None) -> dict:
        i = item_columns(ds, np.arange(ds.num_items + 1))
        i["item_log_count"] = item_cnt
        if cascade:
            assert table is not None
            i.update(retrieval_columns(RETRIEVAL_ITEM, table))
        return i

    hist = recent_histories(ds, rows, history_len)
    targets = ds.items[rows]
    users_vec: np.ndarray | None = None
    if retrievers is not None:
        top = _fused_rows(retrievers.upstream, ds, rows, candidates)
        train_cands, users_vec = top.items, top.users
    else:
        assert scorers is not None
        train_cands, _ = top_candidates(scorers["valid"], hist, candidates)
    up_table = _table(retrievers.upstream) if cascade else None
    served_table = _table(retrievers.served) if cascade else None
    u_train = users_raw(ds.users[rows], hist, users_vec, rows)
    i_up = items_raw(up_table)
    spec = fit_spec(decl, u_train, {k: v[targets] for k, v in i_up.items()})

    def lists(which: Split) -> CandidateLists:
        # candidates from the whole history, so every seen item is removed, not only the last
        # history_len ones (the scorers truncate to their own maxlen themselves)
        h = loo.histories(which, maxlen=history_len)
        if retrievers is None:
            assert scorers is not None
            cands, scores = top_candidates(scorers[which], loo.histories(which), candidates)
            return CandidateLists(spec.user.encode(users_raw(loo.eval_users, h, None, loo.history_end(which))),
                                  cands, scores, loo.targets(which))
        top = fused_top(retrievers.served, loo.histories(which), candidates)
        return CandidateLists(spec.user.encode(users_raw(loo.eval_users, h, top.users, loo.history_end(which))),
                              top.items, top.scores, loo.targets(which), top.launchers)

    return NextItemData(
        spec=spec,
        catalog=spec.item.encode(items_raw(served_table)),
        train_user=spec.user.encode(u_train),
        train_targets=targets,
        train_candidates=train_cands.astype(np.int32),
        valid=lists("valid"),
        test=lists("test"),
        train_users=users_vec if cascade else None,
        train_table=up_table,
        train_catalog=spec.item.encode(i_up) if cascade else None,
    )


def _table(model: MultiLauncherSASRec) -> np.ndarray:
    """(N + 1, D) float32 item embeddings of a retriever."""
    return model.item_embedding.weight.detach().numpy().astype(np.float32)


def _fused_rows(model: MultiLauncherSASRec, ds: Dataset, rows: np.ndarray, k: int, chunk: int = 2048) -> FusedTop:
    """fused_top for the histories ds.items[user start : row] of each row, built in chunks
    (whole histories, so every seen item is removed; the encoder keeps its maxlen)."""
    parts = []
    for start in range(0, rows.size, chunk):
        r = rows[start : start + chunk]
        parts.append(fused_top(model, pad_left(ds.items, ds.offsets[ds.users[r]], r, None), k))
    return FusedTop(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("items", "scores", "launchers", "users")))


def retrieval_prior(data: NextItemData) -> RetrievalPrior | None:
    """A fresh prior for cascade data (None without cascade inputs)."""
    return RetrievalPrior(RetrievalPriorConfig(data.num_launchers)) if data.cascade else None


def fused_pair(users: np.ndarray, table: np.ndarray, items: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """users (b, M, D), table (N + 1, D), items (b, K) -> fused scores (b, K) and launchers (b, K)."""
    per = torch.einsum("bmd,bkd->bkm", torch.from_numpy(users), torch.from_numpy(table[items]))  # (b, K, M)
    score, launcher = per.max(dim=-1)
    return score, launcher


# --- models ---


def build_model(name: str, spec: FeatureSpec, **hparams: Any) -> nn.Module:
    """A model over the spec's fields; hparams the model's config does not have are ignored."""
    if name not in MODELS:
        raise ValueError(f"unknown pre-ranking model '{name}' (expected one of {sorted(MODELS)})")
    cls, cfg_cls = MODELS[name]
    known = {f.name for f in fields(cfg_cls)}
    cfg = cfg_cls(
        user_fields=spec.user.fields_config(),
        item_fields=spec.item.fields_config(),
        **{k: v for k, v in hparams.items() if k in known and v is not None},
    )
    return cls(cfg)


def to_fields(enc: EncodedFields, rows: np.ndarray | None = None) -> Fields:
    e = enc if rows is None else enc.take(rows)
    return Fields(torch.from_numpy(e.sparse), torch.from_numpy(e.dense), torch.from_numpy(e.multi))


def has_heads(model: nn.Module) -> bool:
    """Towers whose item side is precomputable (TwoTower, IntTower)."""
    return hasattr(model, "user_heads") and hasattr(model, "item_heads")


# --- CTR objective ---


def predict_ctr(model: nn.Module, rows: PairRows, batch_size: int = 4096) -> np.ndarray:
    """(E,) click probabilities."""
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            idx = np.arange(start, min(start + batch_size, len(rows)))
            out.append(torch.sigmoid(model(to_fields(rows.user, idx), to_fields(rows.item, idx))).numpy())
    return np.concatenate(out).astype(np.float64)


def evaluate_ctr(model: nn.Module, rows: PairRows) -> dict[str, float]:
    p = predict_ctr(model, rows)
    return {"AUC": auc(rows.labels, p), "LogLoss": logloss(rows.labels, p)}


class BestWeights:
    """Early stopping on a validation score: keeps a copy of the best weights and says when
    more than `patience` epochs in a row failed to improve on it."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best = -np.inf
        self._state: dict[str, torch.Tensor] | None = None
        self._bad = 0

    def update(self, score: float, model: nn.Module) -> bool:
        """Record an epoch's score; True when training should stop."""
        if score > self.best:
            self.best, self._state, self._bad = score, copy.deepcopy(model.state_dict()), 0
            return False
        self._bad += 1
        return self._bad > self.patience

    def restore(self, model: nn.Module) -> None:
        if self._state is not None:
            model.load_state_dict(self._state)


def train_ctr(model: nn.Module, data: CTRData, cfg: TrainConfig, progress: Callable[[str], None] | None = None) -> dict:
    """Adam on BCE (+ cir_weight * CIR over the batch's positive pairs); early stopping on
    validation AUC, best weights restored. Returns the training history."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    use_cir = cfg.cir_weight > 0 and isinstance(model, IntTower)
    train = data.train
    stopper, history = BestWeights(cfg.patience), []
    for epoch in range(cfg.epochs):
        model.train()
        t0, total = time.perf_counter(), 0.0
        order = rng.permutation(len(train))
        for start in range(0, len(train), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            u, i = to_fields(train.user, idx), to_fields(train.item, idx)
            y = torch.from_numpy(train.labels[idx])
            if use_cir:
                uh, ih = model.user_heads(u), model.item_heads(i)  # (B, L, H, d), (B, H, d)
                logits = model.score(uh, ih)
                pos = y > 0.5
                # M_u^L, M_v^L: the concatenated heads of the last layer
                cir = cir_loss(uh[pos, -1].flatten(1), ih[pos].flatten(1), cfg.temperature,
                               torch.from_numpy(train.items[idx])[pos])
                loss = F.binary_cross_entropy_with_logits(logits, y) + cfg.cir_weight * cir
            else:
                loss = F.binary_cross_entropy_with_logits(model(u, i), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.detach().item() * idx.size
        metrics = evaluate_ctr(model, data.valid)
        history.append({"epoch": epoch + 1, "loss": total / len(train), **{f"valid_{k}": v for k, v in metrics.items()},
                        "seconds": round(time.perf_counter() - t0, 2)})
        if progress:
            progress(f"epoch {epoch + 1}: loss {total / len(train):.4f} valid AUC {metrics['AUC']:.4f} "
                     f"LogLoss {metrics['LogLoss']:.4f}")
        if stopper.update(metrics["AUC"], model):
            break
    stopper.restore(model)
    return {"history": history, "best_valid_AUC": stopper.best}


# --- next-item objective ---


def score_lists(model: nn.Module, user: EncodedFields, candidates: np.ndarray, catalog: EncodedFields,
                batch_size: int = 256, prior: RetrievalPrior | None = None,
                lists: CandidateLists | None = None) -> np.ndarray:
    """(B,) users x (B, C) candidate items -> (B, C) scores (eval mode, no grad).

    Towers compute the catalog's item heads once (as serving does); DCN-v2 scores every
    (user, candidate) row in full. With a prior, its pair term from the lists' fused retrieval
    scores and launchers is added (as serving does).
    """
    model.eval()
    B, C = candidates.shape
    out = np.empty((B, C), dtype=np.float32)
    with torch.no_grad():
        item_heads = model.item_heads(to_fields(catalog)) if has_heads(model) else None  # (N + 1, H, d)
        for start in range(0, B, batch_size):
            idx = np.arange(start, min(start + batch_size, B))
            cands = torch.from_numpy(candidates[idx].astype(np.int64))  # (b, C)
            u = to_fields(user, idx)
            if item_heads is not None:
                uh = model.user_heads(u)  # (b, L, H, d)
                out[idx] = model.score(uh[:, None], item_heads[cands]).numpy()
            else:
                rep = np.repeat(idx, C)
                flat = candidates[idx].ravel().astype(np.int64)
                out[idx] = model(to_fields(user, rep), to_fields(catalog, flat)).view(-1, C).numpy()
        if prior is not None:
            if lists is None or lists.launchers is None:
                raise ValueError("a retrieval prior needs lists with fused retrieval scores and launchers")
            prior.eval()
            r = torch.from_numpy(np.where(np.isfinite(lists.retrieval_scores), lists.retrieval_scores, 0.0))
            out = prior(torch.from_numpy(out), r.float(), torch.from_numpy(lists.launchers.astype(np.int64))).numpy()
    return out


def list_quality(scores: np.ndarray, lists: CandidateLists, ks: tuple[int, ...] = (5, 10, 20)) -> dict[str, float]:
    """List metrics of the candidates ordered by `scores`.

    `list_metrics` averages over the lists that contain the held-out item; `Recall@C` is the
    share of users whose item retrieval put in the list, and `NDCG@10_all` averages over all
    users (0 where the item was not retrieved), which is what the full pipeline sees.
    """
    labels = (lists.candidates == lists.targets[:, None]).astype(np.float64)
    m = list_metrics(scores, labels, ks)
    m["users"] = float(labels.shape[0])
    m[f"Recall@{lists.candidates.shape[1]}"] = float(labels.any(axis=1).mean())
    for k in ks:
        m[f"NDCG@{k}_all"] = m[f"NDCG@{k}"] * m["lists"] / m["users"]
    return m


def evaluate_next_item(model: nn.Module, data: NextItemData, which: Split = "test",
                       prior: RetrievalPrior | None = None) -> dict[str, float]:
    lists = data.valid if which == "valid" else data.test
    return list_quality(score_lists(model, lists.user, lists.candidates, data.catalog, prior=prior, lists=lists), lists)


def train_next_item(model: nn.Module, data: NextItemData, cfg: TrainConfig,
                    progress: Callable[[str], None] | None = None, prior: RetrievalPrior | None = None) -> dict:
    """Sampled softmax over [positive, hard negatives from the retrieval candidates, random
    items] (+ cir_weight * in-batch CIR); early stopping on validation NDCG@10. With a prior
    (cascade data) every logit gets its pair term from the upstream retriever's fused score."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if prior is not None and not data.cascade:
        raise ValueError("a retrieval prior needs data built with cascade inputs")
    both = nn.ModuleDict({"tower": model, **({"prior": prior} if prior is not None else {})})
    opt = torch.optim.Adam(both.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    use_cir = cfg.cir_weight > 0 and isinstance(model, IntTower)
    n_items = data.catalog.sparse.shape[0] - 1
    catalog = data.train_catalog if data.train_catalog is not None else data.catalog
    E, C = data.train_candidates.shape
    n_hard = min(cfg.hard_negatives, C)
    stopper, history = BestWeights(cfg.patience), []
    if prior is not None:  # the starting point is the retrieval order: training must beat it to be kept
        start = evaluate_next_item(model, data, "valid", prior)
        stopper.update(start["NDCG@10"], both)
        history.append({"epoch": 0, "valid_NDCG@10": start["NDCG@10"], "prior": prior.serving()})
    for epoch in range(cfg.epochs):
        model.train()
        t0, total = time.perf_counter(), 0.0
        order = rng.permutation(E)
        for start in range(0, E, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            b = idx.size
            hard = data.train_candidates[idx[:, None], rng.integers(0, C, size=(b, n_hard))]
            rand = rng.integers(1, n_items + 1, size=(b, cfg.random_negatives))
            items = np.concatenate([data.train_targets[idx, None], hard, rand], axis=1).astype(np.int64)  # (b, M)
            collide = torch.from_numpy(items[:, 1:] == items[:, :1])  # a negative that is the positive
            u = to_fields(data.train_user, idx)
            both.train()
            if has_heads(model):
                uniq, inv = np.unique(items, return_inverse=True)
                uh = model.user_heads(u)  # (b, L, H, d)
                ih = model.item_heads(to_fields(catalog, uniq))[torch.from_numpy(inv.reshape(items.shape))]
                logits = model.score(uh[:, None], ih)  # (b, M)
            else:
                logits = model(to_fields(data.train_user, np.repeat(idx, items.shape[1])),
                               to_fields(catalog, items.ravel())).view(b, -1)
            if prior is not None:
                assert data.train_users is not None and data.train_table is not None
                logits = prior(logits, *fused_pair(data.train_users[idx], data.train_table, items))
            logits = torch.cat([logits[:, :1], logits[:, 1:].masked_fill(collide, float("-inf"))], dim=1)
            loss = F.cross_entropy(logits, torch.zeros(b, dtype=torch.long))
            if use_cir:
                loss = loss + cfg.cir_weight * cir_loss(uh[:, -1].flatten(1), ih[:, 0].flatten(1), cfg.temperature,
                                                        torch.from_numpy(items[:, 0]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.detach().item() * b
        metrics = evaluate_next_item(model, data, "valid", prior)
        history.append({"epoch": epoch + 1, "loss": total / E, "valid_NDCG@10": metrics["NDCG@10"],
                        "seconds": round(time.perf_counter() - t0, 2),
                        **({"prior": prior.serving()} if prior is not None else {})})
        if progress:
            progress(f"epoch {epoch + 1}: loss {total / E:.4f} valid NDCG@10 {metrics['NDCG@10']:.4f}")
        if stopper.update(metrics["NDCG@10"], both):
            break
    stopper.restore(both)
    both.eval()
    return {"history": history, "best_valid_NDCG@10": stopper.best}


# --- checkpoints and export ---


def save_checkpoint(model: nn.Module, name: str, spec: FeatureSpec, out_dir: str | Path,
                    prior: RetrievalPrior | None = None, **extra: Any) -> Path:
    """`prerank.pt` (model name, config, weights, the retrieval prior, extra) + `prerank_features.json`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    saved_prior = None if prior is None else {"config": prior.cfg.to_dict(), "state_dict": prior.state_dict()}
    torch.save({"model": name, "config": model.cfg.to_dict(), "state_dict": model.state_dict(),
                "prior": saved_prior, **extra}, out / CHECKPOINT)
    spec.save(out / FEATURES)
    return out / CHECKPOINT


def load_checkpoint(out_dir: str | Path) -> tuple[nn.Module, FeatureSpec, dict]:
    out = Path(out_dir)
    if not (out / CHECKPOINT).is_file():
        raise FileNotFoundError(f"{out / CHECKPOINT}: no pre-ranking checkpoint")
    ckpt = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=True)
    cls, cfg_cls = MODELS[ckpt["model"]]
    model = cls(cfg_cls.from_dict(ckpt["config"]))
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model, FeatureSpec.load(out / FEATURES), ckpt


def load_prior(ckpt: dict) -> RetrievalPrior | None:
    """The retrieval prior a pre-rank checkpoint holds (None for one trained without cascade inputs)."""
    saved = ckpt.get("prior")
    if not saved:
        return None
    prior = RetrievalPrior(RetrievalPriorConfig(**saved["config"]))
    state = dict(saved["state_dict"])
    state.setdefault("tower_weight", torch.ones(()))  # priors saved before the gate added the tower at weight 1
    prior.load_state_dict(state)
    prior.eval()
    return prior


class UserPart(nn.Module):
    """The exported user side: (user_sparse, user_dense, user_multi) -> user_heads (B, L, H, d)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor, multi: torch.Tensor) -> torch.Tensor:
        return self.model.user_heads(Fields(sparse, dense, multi))


def export_prerank(model: nn.Module, spec: FeatureSpec, catalog: EncodedFields, out_dir: str | Path,
                   prior: RetrievalPrior | None = None) -> dict[str, str]:
    """Write prerank_user.onnx, prerank_items.npy and prerank_manifest.json.

    prerank_user.onnx: user_sparse int64 (B, S), user_dense float32 (B, Dn), user_multi int64
    (B, K) -> user_heads float32 (B, L, H, d). prerank_items.npy: float32 (N + 1, H, d), the
    item heads of the whole catalog, row 0 (padding) zero. Serving: service.prerank.
    """
    if not has_heads(model):
        raise ValueError(f"{type(model).__name__} has no precomputable item side and is never served")
    import onnx  # deferred: export-only dependency

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    cfg = spec.user.fields_config()
    example = (
        torch.zeros(2, len(cfg.sparse_vocab), dtype=torch.long),
        torch.zeros(2, cfg.num_dense),
        torch.zeros(2, sum(cfg.multi_width), dtype=torch.long),
    )
    names = ["user_sparse", "user_dense", "user_multi"]
    # the exporter restores the wrapper's train/eval mode afterwards, recursively: keep it eval
    torch.onnx.export(
        UserPart(model).eval(), example, out / USER_ONNX, input_names=names, output_names=["user_heads"],
        dynamic_axes={**{n: {0: "batch"} for n in names}, "user_heads": {0: "batch"}}, dynamo=False,
    )
    onnx.checker.check_model(str(out / USER_ONNX))
    with torch.no_grad():
        items = model.item_heads(to_fields(catalog)).numpy().astype(np.float32)  # (N + 1, H, d)
    items[0] = 0.0
    np.save(out / ITEMS_NPY, items)
    with torch.no_grad():
        uh = model.user_heads(Fields(*example))
    manifest = {
        "model": type(model).__name__,
        "inputs": {"user_sparse": ["B", example[0].shape[1], "int64"], "user_dense": ["B", example[1].shape[1], "float32"],
                   "user_multi": ["B", example[2].shape[1], "int64"]},
        "outputs": {"user_heads": ["B", *uh.shape[1:], "float32"]},
        "items": {"file": ITEMS_NPY, "shape": list(items.shape), "dtype": "float32", "padding_row": 0},
        "features": FEATURES,
        "score": ("tower_weight * " if prior is not None else "")
                 + "(sum over layers and user heads of the max over item heads of the dot product)"
                 + (" + weight * fused retrieval score + launcher_bias[launcher]" if prior is not None else ""),
        "retrieval_prior": None if prior is None else prior.serving(),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return {"user_onnx": str(out / USER_ONNX), "items": str(out / ITEMS_NPY), "manifest": str(out / MANIFEST)}


def train_config_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)
