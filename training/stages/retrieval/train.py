"""Training, evaluation and checkpoints for the retrievers (the losses: training/stages/retrieval/losses.py).

Loss (reference: multi-launcher-retrieval.md), at every position with a next item y:
    s_l(i) = <u_l, e_i>,  s*(i) = max_l s_l(i),  l* = argmax_l s_l(y)
    loss = -log( exp(s_{l*}(y)) / (sum_l exp(s_l(y)) + sum_{i != y} exp(s*(i))) )
i.e. cross-entropy over [s_1(y) .. s_M(y), s*(i) for i != y] with target l*. With M = 1 this
is the plain SASRec cross-entropy at every position. Negatives are the full catalog, or
sampled (NegativeSampler, for large catalogs): K items shared by the batch drawn uniformly or in
proportion to their popularity as training targets (--num-negatives K --sampler ...), or the
batch's own targets (--sampler in-batch). A sampled negative's logit is logQ-corrected,
s(i) - log(K q(i) / c(i)) for an item drawn c(i) times out of K with probability q(i) per draw,
so sum_i c(i) exp(s(i) - log(K q(i) / c(i))) = sum_draws exp(s) / (K q) is the importance-sampled
estimate of the full softmax's sum over the catalog (Bengio & Senecal 2008; Yi et al. 2019 for
in-batch negatives); the positive is not corrected.

Event weights (Dataset.weights, from the event types of csv: / parquet: data): each position's
loss is weighted by its target's weight, normalised to mean 1 over the training targets (a
purchase that follows counts w_purchase / w_view times a view; the loss keeps its scale and the
learning rate its meaning): mean_p w_p loss_p. The negatives and the logQ counts are unweighted.

MIND (training.stages.retrieval.encoders) trains with label-aware attention instead of max-fusion
(label_aware_loss); SASRec, multi-launcher SASRec and HSTU with max_fusion_loss.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from models.sasrec import MultiLauncherSASRec
from training import distributed
from service.contract.layout import RETRIEVAL_CHECKPOINT
from training.checkpoints import save_checkpoint as save_payload
from training.stages.retrieval.encoders import RetrievalConfig, RetrievalModel, build_model, encoder_of, served_vectors
from training.data.dataset import Dataset
from training.data.splits import LeaveOneOut, Split, pad_left
from training.eval.metrics import KS, Scorer, evaluate_retrieval, mask_seen, stopping_ndcg10
from training.stages.retrieval.losses import SAMPLERS, NegativeSampler, Sampler, encoder_loss
from training.trainer import Bar, EpochResult, StepResult, fit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetrievalTrainConfig:
    epochs: int = 200
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    num_negatives: int = 0  # 0 = full softmax over the catalog (unless sampler = "in-batch")
    sampler: Sampler = "uniform"  # how the num_negatives shared negatives are drawn
    logq: bool = True  # subtract log(K q / c) from each sampled negative's logit
    patience: int = 10  # epochs without a better validation NDCG@10 before stopping
    # the uniform average of the `average` best epochs' weights replaces the best epoch when it
    # validates higher (training/trainer.fit; 1: the best epoch alone)
    average: int = 5
    seed: int = 0
    max_minutes: float | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.num_negatives < 0:
            raise ValueError(f"num_negatives must be >= 0, got {self.num_negatives}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.sampler == "in-batch" and self.num_negatives:
            raise ValueError("in-batch negatives are the batch's targets: num_negatives must be 0 with sampler 'in-batch'")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")
        if self.average < 1:
            raise ValueError(f"average (--average-best) must be >= 1, got {self.average}")


@dataclass
class EpochStats:
    epoch: int
    loss: float
    seconds: float
    sequences_per_s: float
    launcher_entropy: float
    valid_ndcg10: float  # what early stopping read (stopping_ndcg10; the held-out items too under a holdout)


@dataclass
class TrainResult:
    model: RetrievalModel
    best_epoch: int
    history: list[EpochStats] = field(default_factory=list)
    stopped: str = "epochs"  # why training ended: "epochs", "early stop" or "max minutes" (trainer.FitResult)
    averaged: list[int] = field(default_factory=list)  # the epochs whose average was kept (empty: best_epoch's)
    averaged_score: float = math.nan  # that average's validation score, kept or not (nan: none tried)

    def summary(self) -> str:
        """One line: epochs run, the kept weights and their validation NDCG@10, why training stopped."""
        best = max((e.valid_ndcg10 for e in self.history), default=math.nan)
        line = f"{len(self.history)} epochs, best {self.best_epoch} (valid NDCG@10 {best:.4f})"
        if self.averaged:
            line += f", kept the average of epochs {self.averaged} (valid {self.averaged_score:.4f})"
        elif not math.isnan(self.averaged_score):
            line += f", kept it (the average of the best epochs: valid {self.averaged_score:.4f})"
        return f"{line}, stopped: {self.stopped}"


def model_scorer(model: RetrievalModel, batch_size: int = 512) -> Scorer:
    """Scorer over the whole catalog: max over launchers of <u_l, e_i> (B, N + 1)."""

    @torch.no_grad()
    def score(histories: np.ndarray) -> np.ndarray:
        model.eval()
        seq = torch.from_numpy(histories[:, -model.config.maxlen :])
        items = model.item_embedding.weight  # (N + 1, D)
        out = []
        for start in range(0, seq.shape[0], batch_size):
            u = model.encode_user(seq[start : start + batch_size])  # (b, M, D)
            out.append(torch.einsum("bmd,nd->bmn", u, items).amax(dim=1))
        return torch.cat(out).numpy()

    return score


@dataclass
class FusedTop:
    """A retriever's view of B histories, as the service sees it (one FAISS search, max-fusion).

    items (B, C) int64 best first (0 = none left), scores (B, C) float32 fused scores (-inf for
    none), launchers (B, C) int64 the launcher that gave each score, users (B, M, D) float32.
    """

    items: np.ndarray
    scores: np.ndarray
    launchers: np.ndarray
    users: np.ndarray


@torch.no_grad()
def fused_top(model: RetrievalModel, histories: np.ndarray, k: int, batch_size: int = 512) -> FusedTop:
    """Top-k of max_l <u_l, e_i> over the catalog with each row's history removed (the whole
    left-padded history (B, L), not only the encoder's last maxlen items)."""
    model.eval()
    table = model.item_embedding.weight  # (N + 1, D)
    k = min(k, table.shape[0] - 1)
    parts: list[tuple[np.ndarray, ...]] = []
    for start in range(0, histories.shape[0], batch_size):
        hist = histories[start : start + batch_size]
        users = model.encode_user(torch.from_numpy(hist[:, -model.config.maxlen :]))  # (b, M, D)
        per = torch.einsum("bmd,nd->bmn", users, table)  # (b, M, N + 1)
        fused, launcher = per.max(dim=1)  # (b, N + 1)
        s = fused.numpy().copy()
        mask_seen(s, hist)
        top = torch.topk(torch.from_numpy(s), k, dim=1)
        items = torch.where(torch.isfinite(top.values), top.indices, torch.zeros_like(top.indices))
        parts.append((items.numpy(), top.values.numpy(), torch.gather(launcher, 1, top.indices).numpy(),
                      users.numpy()))
    return FusedTop(*(np.concatenate([p[j] for p in parts]) for j in range(4)))


def training_pairs(split: LeaveOneOut, maxlen: int) -> tuple[np.ndarray, np.ndarray]:
    """(U', L) inputs and next-item targets from each user's training sequence (last window)."""
    seqs = split.train_sequences(maxlen + 1)  # (U, maxlen + 1), left-padded
    keep = (seqs[:, -2:] != 0).all(axis=1)  # at least one (input, target) pair
    seqs = seqs[keep]
    inputs, targets = seqs[:, :-1], seqs[:, 1:].copy()
    targets[inputs == 0] = 0  # no target where the input is padding
    return inputs, targets


def training_weights(split: LeaveOneOut, maxlen: int) -> np.ndarray | None:
    """(U', L) float32 weight of each of training_pairs' targets, 0 where there is no target,
    normalised to mean 1 over the targets; None when the data set has no event weights."""
    weights = split.dataset.weights
    if weights is None:
        return None
    seqs = split.train_sequences(maxlen + 1)
    keep = (seqs[:, -2:] != 0).all(axis=1)  # as training_pairs
    w = split.train_sequences(maxlen + 1, values=weights)[keep][:, 1:].astype(np.float32)
    valid = (seqs[keep][:, :-1] != 0) & (seqs[keep][:, 1:] != 0)
    w = np.where(valid, w, 0.0).astype(np.float32)
    return w / w[valid].mean()


def warm_start(model: RetrievalModel, source: RetrievalModel, noise: float = 0.01) -> None:
    """Copy a trained model's item embeddings, positions and blocks into `model`.

    Launchers: with copy_last, launcher j starts as the source's launcher j mod M_src plus
    small noise (so the M routes start near the trained single route and can drift apart);
    with independent init, or a launcher-less source, they keep their fresh Xavier values.
    """
    if not isinstance(model, MultiLauncherSASRec) or not isinstance(source, MultiLauncherSASRec):
        raise ValueError(f"cannot warm-start {encoder_of(model)} from {encoder_of(source)}: only sasrec from sasrec")
    a, b = model.config, source.config
    for name in ("num_items", "maxlen", "dim", "num_blocks", "num_heads"):
        if getattr(a, name) != getattr(b, name):
            raise ValueError(f"cannot warm-start: {name} is {getattr(a, name)} here, {getattr(b, name)} in the source")
    state = {k: v for k, v in source.state_dict().items() if k != "launchers"}
    missing, _ = model.load_state_dict(state, strict=False)
    assert set(missing) <= {"launchers"}, missing
    if model.launchers is not None and source.launchers is not None and a.launcher_init == "copy_last":
        with torch.no_grad():
            src = source.launchers[torch.arange(a.num_launchers) % source.launchers.shape[0]]
            model.launchers.copy_(src + noise * src.std() * torch.randn_like(src))


def train_retrieval(
    split: LeaveOneOut,
    model_cfg: RetrievalConfig,
    train_cfg: RetrievalTrainConfig,
    progress: bool = True,
    init_from: RetrievalModel | None = None,
    resume: RetrievalModel | None = None,
) -> TrainResult:
    """Train with early stopping on NDCG@10 of the targets the model never trains on short of the test
    item (training/eval/metrics.py stopping_ndcg10: the validation item, and the held-out training
    items of a split with a holdout), then keep the average of the `train_cfg.average` best epochs'
    weights instead of the best epoch's when it scores higher there (trainer.fit); `init_from` warm-starts (warm_start: a model
    of the same data set); `resume` is trained as given (its config is model_cfg; e.g. a fresh model
    that training/warm_start.py filled from another data set's checkpoint).

    Inside a torchrun process group (training.distributed) the model is wrapped in DDP and each
    global batch of `batch_size` sequences is split across the ranks. Each rank's loss is its
    share of the global batch's mean, times the world size, so DDP's gradient average equals the
    one-process gradient. Rank 0 validates and broadcasts the score and the time-limit decision,
    so every rank stops at the same epoch; every rank returns the same best weights.
    """
    rank, world = distributed.rank(), distributed.world_size()
    torch.manual_seed(train_cfg.seed)  # the same initial weights on every rank
    rng = np.random.default_rng(train_cfg.seed)  # the same batches and negatives on every rank
    if resume is not None and init_from is not None:
        raise ValueError("give init_from or resume, not both")
    if resume is not None and resume.config != model_cfg:
        raise ValueError(f"resume: the model's config {resume.config} is not {model_cfg}")
    model = resume if resume is not None else build_model(model_cfg)
    if init_from is not None:
        warm_start(model, init_from)
    net: nn.Module = model
    if world > 1:
        net = DistributedDataParallel(model)
        torch.manual_seed(train_cfg.seed + rank)  # different dropout masks per rank
    opt = torch.optim.AdamW(model.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    inputs, targets = training_pairs(split, model_cfg.maxlen)
    weights = training_weights(split, model_cfg.maxlen)  # (U', L) or None: every target counts 1
    sampler = None
    if train_cfg.num_negatives or train_cfg.sampler == "in-batch":
        counts = np.bincount(targets.ravel(), minlength=model_cfg.num_items + 1)
        sampler = NegativeSampler(train_cfg.sampler, counts, train_cfg.num_negatives, train_cfg.logq)
    M = served_vectors(model_cfg)
    history: list[EpochStats] = []

    def train_step(epoch: int, bar: Bar) -> StepResult:
        order = rng.permutation(inputs.shape[0])
        loss_sum, assign = 0.0, np.zeros(M, dtype=np.int64)
        batches = range(0, order.size, train_cfg.batch_size)
        shards = distributed.rank_batches(order, train_cfg.batch_size, rank, world)
        for start, idx in zip(bar(batches), shards):
            global_valid = int((targets[order[start : start + train_cfg.batch_size]] != 0).sum())
            x = torch.from_numpy(inputs[idx])
            y = torch.from_numpy(targets[idx])
            user = net(x)  # (B, L, M, D)
            valid = y != 0
            negatives = log_q = None
            if sampler is not None:  # the same draw on every rank (in-batch: the global batch's targets)
                negatives, log_q = sampler.draw(rng, targets[order[start : start + train_cfg.batch_size]])
            if valid.any():
                w = None if weights is None else torch.from_numpy(weights[idx])[valid]
                loss, best = encoder_loss(model, user[valid], y[valid], negatives, log_q, w)
                loss = loss * (int(valid.sum()) / global_valid)  # this rank's share of the batch mean
                assign += np.bincount(best.numpy(), minlength=M)
            else:  # an empty shard still joins DDP's gradient all-reduce, with zero gradients
                loss = user.sum() * 0.0
            opt.zero_grad()
            (loss * world).backward()
            opt.step()
            loss_sum += loss.item()
            bar.postfix(loss.item() * world)
        totals = distributed.all_reduce_sum(np.concatenate([[loss_sum], assign]))
        freq = totals[1:] / max(totals[1:].sum(), 1)
        entropy = max(0.0, float(-(freq[freq > 0] * np.log(freq[freq > 0])).sum()))
        return StepResult(float(totals[0]) / len(batches), int(inputs.shape[0]), {"entropy": entropy})

    def validate() -> float:  # rank 0 validates; rounded as recorded, so early stopping sees the recorded score
        if rank > 0:
            return -1.0
        return round(stopping_ndcg10(model_scorer(model), split), 5)

    def sync(score: float, out_of_time: bool) -> tuple[float, bool]:
        score, late = distributed.broadcast_from_rank0([score, float(out_of_time)])
        return score, bool(late)

    def record(r: EpochResult) -> None:
        entropy = r.step.extra["entropy"]
        stats = EpochStats(epoch=r.epoch, loss=r.step.loss, seconds=round(r.train_seconds, 3),
                           sequences_per_s=round(r.rows_per_s, 1), launcher_entropy=round(entropy, 4),
                           valid_ndcg10=round(r.score, 5))
        history.append(stats)
        log.info("epoch %d loss %.4f valid NDCG@10 %.4f entropy %.3f (%.1fs, %.0f seq/s)",
                 r.epoch, stats.loss, stats.valid_ndcg10, entropy, r.train_seconds, stats.sequences_per_s)

    result = fit(model, train_cfg.epochs, train_cfg.patience, train_step, validate, start_score=-1.0,
                 max_minutes=train_cfg.max_minutes, progress=progress and rank == 0, sync=sync, on_epoch=record,
                 average=train_cfg.average)
    return TrainResult(model=model, best_epoch=result.best_epoch, history=history, stopped=result.stopped,
                       averaged=result.averaged, averaged_score=result.averaged_score)


def evaluate_model(model: RetrievalModel, split: LeaveOneOut, which: Split = "test") -> dict[str, float]:
    """Test metrics, plus the launcher-assignment entropy of the test targets."""
    metrics = evaluate_retrieval(model_scorer(model), split, which, KS, progress=False)
    metrics["LauncherEntropy"] = launcher_entropy(model, split, which)
    return metrics


@torch.no_grad()
def launcher_entropy(model: RetrievalModel, split: LeaveOneOut, which: Split = "test") -> float:
    """Entropy (nats) of which launcher scores each held-out target highest (0 for M <= 1)."""
    if model.config.num_launchers <= 1:
        return 0.0
    model.eval()
    seq = torch.from_numpy(split.histories(which, maxlen=model.config.maxlen))
    tgt = torch.from_numpy(split.targets(which))
    u = model.encode_user(seq)  # (B, M, D)
    best = torch.einsum("bmd,bd->bm", u, model.item_embedding(tgt)).argmax(dim=1).numpy()
    freq = np.bincount(best, minlength=model.config.num_launchers) / best.size
    return float(-(freq[freq > 0] * np.log(freq[freq > 0])).sum())


# --- checkpoints ---


def save_checkpoint(
    out_dir: str | Path, model: RetrievalModel, dataset: Dataset, data_spec: str, extra: dict[str, Any]
) -> Path:
    """out_dir/checkpoint.pt in the one format (training/checkpoints.py); read it with load_retrieval."""
    return save_payload(Path(out_dir) / RETRIEVAL_CHECKPOINT, f"retrieval/{encoder_of(model)}", model.config,
                        model.state_dict(), dataset.fingerprint,
                        {"data": data_spec, "item_ids": dataset.item_ids.tolist(), **extra})


def encode_histories(model: RetrievalModel, histories: list[np.ndarray]) -> np.ndarray:
    """Ragged item-id histories -> (B, M, D) float32 user vectors (eager reference)."""
    lengths = np.array([len(h) for h in histories])
    flat = np.concatenate(histories) if histories else np.zeros(0, dtype=np.int64)
    ends = np.cumsum(lengths)
    seq = pad_left(flat.astype(np.int64), ends - lengths, ends, model.config.maxlen)
    with torch.no_grad():
        return model.encode_user(torch.from_numpy(seq)).numpy()


def describe(result: TrainResult) -> dict[str, Any]:
    """JSON-friendly summary of a training run."""
    h = result.history
    secs = [e.seconds for e in h]
    return {
        "best_epoch": result.best_epoch,
        "averaged_epochs": result.averaged,
        "averaged_score": None if math.isnan(result.averaged_score) else result.averaged_score,
        "epochs_run": len(h),
        "seconds_per_epoch": round(float(np.mean(secs)), 3) if secs else math.nan,
        "sequences_per_s": round(float(np.mean([e.sequences_per_s for e in h])), 1) if h else math.nan,
        "train_entropy_last": h[-1].launcher_entropy if h else math.nan,
        "history": [asdict(e) for e in h],
    }
