"""Re-ranking: list data, the listwise loss, the training loop, evaluation and the slate oracle.

Models (models/prm.py) see tensors only; this module owns NumPy, batching and losses. Every
re-ranker takes the same four inputs, so `train_listwise`, `score_lists` and the export serve
PRM, PRM-BASE and the pointwise MLP alike.

Slate accuracy = share of lists (with a positive) whose top-scored real entry is a positive.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from models.prm import PAD_LOGIT, RerankModel
from training.trainer import Bar, EpochResult, StepResult, fit
from training.eval.metrics import KEEP_TRAINED_SE, beats_start, list_metrics, ndcg_rows

log = logging.getLogger(__name__)


# --- data ---


@dataclass
class ListData:
    """B candidate lists of length L (padded), in the pre-ranker's order.

    item_feats (B, L, F) float32, pv (B, L, P) float32 (P may be 0), init_score (B, L) float32
    the pre-rank score, labels (B, L) float32 relevance >= 0 (clicks), mask (B, L) bool True =
    real candidate, ret_score (B, L) float32 or None: the fused retrieval score, a second score
    input for a re-ranker with num_scores = 2 (both z-scored within the list).
    """

    item_feats: np.ndarray
    pv: np.ndarray
    init_score: np.ndarray
    labels: np.ndarray
    mask: np.ndarray
    ret_score: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.item_feats = np.asarray(self.item_feats, dtype=np.float32)
        self.pv = np.asarray(self.pv, dtype=np.float32)
        self.init_score = np.asarray(self.init_score, dtype=np.float32)
        self.labels = np.asarray(self.labels, dtype=np.float32)
        self.mask = np.asarray(self.mask, dtype=bool)
        if self.item_feats.ndim != 3:
            raise ValueError(f"item_feats must be (B, L, F), got shape {self.item_feats.shape}")
        B, L = self.item_feats.shape[:2]
        if self.pv.ndim != 3 or self.pv.shape[:2] != (B, L):
            raise ValueError(f"pv must be ({B}, {L}, P), got shape {self.pv.shape}")
        if self.ret_score is not None:
            self.ret_score = np.asarray(self.ret_score, dtype=np.float32)
        for name in ("init_score", "labels", "mask") + (("ret_score",) if self.ret_score is not None else ()):
            if getattr(self, name).shape != (B, L):
                raise ValueError(f"{name} must be ({B}, {L}), got shape {getattr(self, name).shape}")
        if (self.labels < 0).any():
            raise ValueError("labels must be >= 0")

    def __len__(self) -> int:
        return int(self.item_feats.shape[0])

    @property
    def list_len(self) -> int:
        return int(self.item_feats.shape[1])

    @property
    def item_dim(self) -> int:
        return int(self.item_feats.shape[2])

    @property
    def pv_dim(self) -> int:
        return int(self.pv.shape[2])

    @property
    def num_scores(self) -> int:
        return 1 if self.ret_score is None else 2

    def scores(self) -> np.ndarray:
        """The model's `init_score` input: (B, L), or (B, L, 2) [pre-rank, retrieval] with ret_score."""
        return self.init_score if self.ret_score is None else np.stack([self.init_score, self.ret_score], axis=-1)

    def take(self, idx: np.ndarray | slice) -> ListData:
        return ListData(self.item_feats[idx], self.pv[idx], self.init_score[idx], self.labels[idx], self.mask[idx],
                        None if self.ret_score is None else self.ret_score[idx])

    def tensors(self, idx: np.ndarray | slice = slice(None)) -> tuple[torch.Tensor, ...]:
        """The model inputs (item_feats, pv, init_score, mask) of the selected lists."""
        return tuple(torch.from_numpy(np.ascontiguousarray(a[idx])) for a in
                     (self.item_feats, self.pv, self.scores(), self.mask))


# --- loss ---


def listwise_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy against the normalised label distribution, mean over lists.

    logits, labels (B, L), mask (B, L) bool. Per list: p = labels / sum(labels) over real
    entries, q = softmax(logits) over real entries, loss = -sum_i p_i log q_i. This is
    KL(p || q) + H(p); H(p) does not depend on the model, so the gradients are the KL's
    (with one click per list H(p) = 0 and the two are equal).
    Lists without any positive label over real entries have no target distribution: they
    are skipped (left out of the mean). A batch with none returns a zero that keeps the graph.
    """
    if bool((labels < 0).any()):
        raise ValueError("labels must be >= 0")
    labels = labels * mask
    total = labels.sum(dim=1)  # (B,)
    keep = total > 0
    if not bool(keep.any()):
        return logits.sum() * 0.0
    target = labels[keep] / total[keep].unsqueeze(1)  # (B', L)
    logq = torch.log_softmax(logits[keep].masked_fill(~mask[keep], PAD_LOGIT), dim=1)  # (B', L)
    return -(target * logq).sum(dim=1).mean()


# --- training ---


@dataclass(frozen=True)
class RerankTrainConfig:
    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4  # AdamW, decoupled
    patience: int = 3  # epochs without a better validation NDCG@10 before stopping
    seed: int = 0
    max_minutes: float | None = None
    eval_batch_size: int = 1024

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "patience", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be > 0, got {self.max_minutes}")


@dataclass
class EpochStats:
    epoch: int
    loss: float
    seconds: float
    valid_ndcg10: float  # nan without validation data
    valid_slate_acc: float


@dataclass
class TrainResult:
    model: RerankModel
    best_epoch: int
    best_valid_ndcg10: float  # nan without validation data
    history: list[EpochStats] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {"best_epoch": self.best_epoch, "best_valid_ndcg10": self.best_valid_ndcg10,
                "history": [asdict(h) for h in self.history]}


def _check_compatible(model: RerankModel, data: ListData) -> None:
    cfg = model.config
    if data.item_dim != cfg.item_dim:
        raise ValueError(f"data has item_dim {data.item_dim} but the model expects {cfg.item_dim}")
    if cfg.pv_dim and data.pv_dim != cfg.pv_dim:
        raise ValueError(f"data has pv_dim {data.pv_dim} but the model expects {cfg.pv_dim}")
    if data.list_len > cfg.max_len:
        raise ValueError(f"data lists have length {data.list_len} > the model's max_len {cfg.max_len}")


def train_listwise(
    model: RerankModel,
    data: ListData,
    cfg: RerankTrainConfig,
    valid: ListData | None = None,
    progress: bool = True,
) -> TrainResult:
    """AdamW on `listwise_loss` over shuffled minibatches of lists.

    With `valid`: early stopping on validation NDCG@10 (patience epochs), best weights
    restored; a residual model's untrained weights (the given order) count as epoch 0. Without: all epochs, last weights. Shuffling and dropout are seeded by
    cfg.seed; the initial weights are the caller's (seed before building the model).
    """
    _check_compatible(model, data)
    if valid is not None:
        _check_compatible(model, valid)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    labels = torch.from_numpy(data.labels)
    history: list[EpochStats] = []
    start = -math.inf
    start_state: dict[str, Any] | None = None
    start_rows = np.zeros(0)
    if valid is not None and getattr(model.config, "residual", False):
        # a residual model starts at the order it is given: training has to beat that to be kept
        given = score_lists(model, valid, cfg.eval_batch_size)
        start = evaluate_lists(given, valid, ks=(10,))["NDCG@10"]
        start_rows = ndcg_rows(given, valid.labels, 10, valid.mask)
        start_state = copy.deepcopy(model.state_dict())
        log.info("epoch 0 (the given order) valid NDCG@10 %.4f", start)

    def train_step(epoch: int, bar: Bar) -> StepResult:
        order = rng.permutation(len(data))
        total, seen = 0.0, 0
        for start in bar(range(0, order.size, cfg.batch_size)):
            idx = order[start : start + cfg.batch_size]
            logits = model(*data.tensors(idx))  # (b, L)
            mask = torch.from_numpy(data.mask[idx])
            loss = listwise_loss(logits, labels[idx], mask)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * idx.size
            seen += idx.size
            bar.postfix(loss.item())
        return StepResult(total / max(seen, 1), seen)

    acc = [math.nan]  # the last validation's slate accuracy

    def validate(held_out: ListData) -> float:
        m = evaluate_lists(score_lists(model, held_out, cfg.eval_batch_size), held_out, ks=(10,))
        acc[0] = m["slate_acc"]
        return m["NDCG@10"]

    def record(r: EpochResult) -> None:
        stats = EpochStats(r.epoch, r.step.loss, round(r.seconds, 3), r.score, acc[0])
        history.append(stats)
        log.info("epoch %d loss %.4f valid NDCG@10 %.4f slate acc %.4f (%.1fs, %.0f lists/s)",
                 r.epoch, stats.loss, r.score, acc[0], stats.seconds, r.rows_per_s)

    result = fit(model, cfg.epochs, cfg.patience, train_step,
                 (lambda: validate(valid)) if valid is not None else None, start_score=start,
                 max_minutes=cfg.max_minutes, progress=progress, on_epoch=record)
    best_epoch, best_score = result.best_epoch, result.best_score
    if start_state is not None and valid is not None and best_epoch > 0:
        # the trained order replaces the given one only beyond noise (metrics.beats_start)
        keep, gain, se = beats_start(ndcg_rows(score_lists(model, valid, cfg.eval_batch_size), valid.labels, 10,
                                               valid.mask), start_rows)
        if not keep:
            model.load_state_dict(start_state)
            model.eval()
            log.info("best epoch %d: valid NDCG@10 %+.4f over the given order, not above %g x its paired SE %.4f: "
                     "the given order kept", best_epoch, gain, KEEP_TRAINED_SE, se)
            best_epoch, best_score = 0, start
    return TrainResult(model=model, best_epoch=best_epoch, best_valid_ndcg10=best_score, history=history)


# --- evaluation ---


def score_lists(model: RerankModel, data: ListData, batch_size: int = 1024) -> np.ndarray:
    """(B, L) float32 model logits in eval mode; padding entries hold PAD_LOGIT."""
    model.eval()
    out = np.empty(data.labels.shape, dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            sl = slice(start, start + batch_size)
            out[sl] = model(*data.tensors(sl)).numpy()
    return out


def unchanged_scores(data: ListData) -> np.ndarray:
    """(B, L) scores that keep the input (pre-ranker) order: minus the position."""
    return np.broadcast_to(-np.arange(data.list_len, dtype=np.float32), data.labels.shape).copy()


def slate_accuracy(scores: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> float:
    """Share of lists with a positive whose top-scored real entry (ties: first) is positive."""
    scores = np.where(mask, scores, -np.inf)
    labels = np.where(mask, labels, 0.0)
    keep = labels.sum(axis=1) > 0
    if not keep.any():
        return 0.0
    top = np.argmax(scores[keep], axis=1)
    return float((labels[keep][np.arange(top.size), top] > 0).mean())


def evaluate_lists(scores: np.ndarray, data: ListData, ks: Iterable[int] = (5, 10)) -> dict[str, float]:
    """slate_acc plus NDCG@K / MAP@K / P@K (training.eval.metrics.list_metrics) of `scores`."""
    return {"slate_acc": slate_accuracy(scores, data.labels, data.mask),
            **list_metrics(scores, data.labels, tuple(ks), data.mask)}


# --- slate oracle ---


def _value_model(rng: np.random.Generator, user_dim: int, item_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed random linear map [user ; mean ; std ; max] (user_dim + 3F) -> coefficients (F).

    Xavier-uniform weight, bias as nn.Linear's default (uniform +-1/sqrt(fan_in)).
    """
    fan_in = user_dim + 3 * item_dim
    bound = math.sqrt(6.0 / (fan_in + item_dim))
    W = rng.uniform(-bound, bound, size=(fan_in, item_dim))
    b = rng.uniform(-1.0, 1.0, size=item_dim) / math.sqrt(fan_in)
    return W, b


def _coefficients(W: np.ndarray, b: np.ndarray, user: np.ndarray, items: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """user (B, U), items (B, L, F), mask (B, L) -> coefficients (B, F) from the real entries' stats."""
    m = mask[..., None]
    n = m.sum(axis=1)  # (B, 1)
    mean = np.where(m, items, 0.0).sum(axis=1) / n  # (B, F)
    std = np.sqrt((np.where(m, items - mean[:, None], 0.0) ** 2).sum(axis=1) / n)  # population std
    mx = np.where(m, items, -np.inf).max(axis=1)
    return np.concatenate([user, mean, std, mx], axis=1) @ W + b


def slate_oracle(
    num_lists: int,
    list_len: int,
    item_dim: int,
    user_dim: int,
    seed: int,
    *,
    oracle_seed: int = 0,
    min_len: int | None = None,
    noise: float = 1.0,
    list_shift: float = 1.0,
    list_scale: float = 0.5,
) -> ListData:
    """Synthetic lists whose one clicked item depends on the whole candidate set.

    A fixed random value model (drawn from `oracle_seed`, the same for every `seed`, so train,
    validation and test sets drawn with different seeds share it) maps
    [user features ; mean, std, max of the list's item features] to a coefficient vector c;
    the clicked item (label 1, all others 0) is argmax_i <c, x_i>.

    - Users u ~ N(0, I). Items of one list are x = s * z + t with z ~ N(0, I) and a per-list
      shift t ~ N(0, list_shift^2 I) and scale s = exp(N(0, list_scale^2)): a retrieval
      stage returns candidates clustered around a context, so list statistics vary between
      lists. list_shift = list_scale = 0 gives the reference's i.i.d. N(0, I) candidates,
      whose statistics barely vary at L = 30, so a pointwise model already does well there.
    - pv (B, L, user_dim) holds the user features, repeated over the list. PRM-BASE ignores pv,
      so it sees no user information at all: that is the point of the PV comparison. The
      pointwise MLP sees the user but no list statistics; only PRM sees both.
    - init_score = a noisy pointwise pre-ranker: <c_bar, x_i> with c_bar the population-mean
      coefficient (no user, no list context) plus Gaussian noise, `noise` times the signal's
      standard deviation for N(0, I) items, divided by the total standard deviation for
      N(0, I) items. The lists are sorted by it (descending), so "unchanged order" is a
      meaningful baseline, and the initial rank carries its information.
    - min_len: when set, list lengths are uniform in [min_len, list_len], the rest padded
      (zero features, mask False) at the end; statistics use real entries only.
    `seed` draws users, items, lengths and noise.
    """
    if num_lists < 1 or list_len < 1 or item_dim < 1 or user_dim < 1:
        raise ValueError(
            f"num_lists, list_len, item_dim and user_dim must be >= 1, got {num_lists}, {list_len}, {item_dim}, {user_dim}"
        )
    if min_len is not None and not 1 <= min_len <= list_len:
        raise ValueError(f"min_len must be in [1, list_len={list_len}], got {min_len}")
    for name, v in (("noise", noise), ("list_shift", list_shift), ("list_scale", list_scale)):
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    world = np.random.default_rng(oracle_seed)
    W, b = _value_model(world, user_dim, item_dim)
    rng = np.random.default_rng(seed)

    def draw(g: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """n users (n, U) and lists (n, L, F) of full length."""
        user = g.standard_normal((n, user_dim))
        z = g.standard_normal((n, list_len, item_dim))
        scale = np.exp(list_scale * g.standard_normal((n, 1, 1)))
        shift = list_shift * g.standard_normal((n, 1, item_dim))
        return user, z * scale + shift

    # population-mean coefficient over a fixed reference sample of full lists
    ref_user, ref_items = draw(world, 4096)
    c_bar = _coefficients(W, b, ref_user, ref_items, np.ones(ref_items.shape[:2], dtype=bool)).mean(axis=0)

    user, items = draw(rng, num_lists)
    lengths = np.full(num_lists, list_len) if min_len is None else rng.integers(min_len, list_len + 1, num_lists)
    mask = np.arange(list_len)[None, :] < lengths[:, None]  # (B, L)
    items = np.where(mask[..., None], items, 0.0)
    coef = _coefficients(W, b, user, items, mask)  # (B, F)
    value = np.where(mask, np.einsum("blf,bf->bl", items, coef), -np.inf)  # (B, L)
    labels = np.zeros((num_lists, list_len), dtype=np.float32)
    labels[np.arange(num_lists), value.argmax(axis=1)] = 1.0

    signal = np.linalg.norm(c_bar)  # std of <c_bar, x> for x ~ N(0, I)
    init = items @ c_bar + noise * signal * rng.standard_normal((num_lists, list_len))
    init = init / (signal * math.sqrt(1.0 + noise**2))  # (B, L)
    # pre-ranker order: real entries by init_score descending (stable), padding stays last
    order = np.argsort(np.where(mask, -init, np.inf), axis=1, kind="stable")  # (B, L)
    items = np.take_along_axis(items, order[..., None], axis=1)
    init = np.where(mask, np.take_along_axis(init, order, axis=1), 0.0)
    labels = np.take_along_axis(labels, order, axis=1)
    pv = np.broadcast_to(user[:, None, :], (num_lists, list_len, user_dim)) * mask[..., None]
    return ListData(items, pv, init, labels, mask)
