"""The retrieval losses (training/stages/retrieval/train.py's module doc has the equations): max-fusion
cross-entropy over the full catalog or sampled negatives with the logQ correction
(NegativeSampler), and MIND's label-aware attention loss."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.mind import MIND

Sampler = Literal["uniform", "popularity", "in-batch"]


SAMPLERS = ("uniform", "popularity", "in-batch")


def max_fusion_loss(
    user: torch.Tensor,
    items: torch.Tensor,
    target: torch.Tensor,
    negatives: torch.Tensor | None = None,
    log_q: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Max-fusion cross-entropy.

    user (P, M, D) launcher vectors, items (N + 1, D) embeddings with row 0 = padding,
    target (P,) item ids, negatives (K',) sampled item ids or None for the full catalog,
    log_q (K',) the logQ correction subtracted from each negative's logit (None: none),
    weight (P,) each position's weight in the mean (None: all 1; the targets' event weights).
    Returns (mean loss, (P,) index of the launcher that matched the target best).
    """
    if user.shape[1] == 1 and negatives is None:
        # M = 1: the same loss as plain full-softmax cross-entropy, computed more cheaply
        logits = user[:, 0] @ items.T  # (P, N + 1)
        logits = logits.index_fill(1, torch.tensor([0], device=logits.device), float("-inf"))
        return weighted_cross_entropy(logits, target, weight), torch.zeros_like(target)
    pos = torch.einsum("pmd,pd->pm", user, items[target])  # (P, M)
    best = pos.detach().argmax(dim=1)
    if negatives is None:
        neg = torch.einsum("pmd,nd->pmn", user, items).amax(dim=1)  # (P, N + 1)
        neg = neg.index_fill(1, torch.tensor([0], device=neg.device), float("-inf"))
        neg = neg.scatter(1, target[:, None], float("-inf"))  # i != y
    else:
        neg = torch.einsum("pmd,kd->pmk", user, items[negatives]).amax(dim=1)  # (P, K)
        if log_q is not None:
            neg = neg - log_q[None, :]
        neg = neg.masked_fill(negatives[None, :] == target[:, None], float("-inf"))  # accidental hits
    logits = torch.cat([pos, neg], dim=1)
    return weighted_cross_entropy(logits, best, weight), best


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """mean_p w_p CE(logits_p, target_p); weight None: the plain mean (the same operation as before weights)."""
    if weight is None:
        return F.cross_entropy(logits, target)
    return (F.cross_entropy(logits, target, reduction="none") * weight).mean()


def label_aware_loss(
    user: torch.Tensor,
    items: torch.Tensor,
    target: torch.Tensor,
    power: float,
    negatives: torch.Tensor | None = None,
    log_q: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MIND's training loss: label-aware attention over the K interests, then cross-entropy.

    user (P, K, D) interests, items (N + 1, D), target (P,); v = sum_k a_k u_k with
    a = softmax_k(power * <u_k, e_y>) (MIND eq. 9), logits <v, e_i> over the catalog or over
    [target, negatives] with the logQ correction; weight (P,) as in max_fusion_loss. Returns
    (mean loss, (P,) argmax_k a_k).
    """
    att = (torch.einsum("pkd,pd->pk", user, items[target]) * power).softmax(dim=1)  # (P, K)
    v = torch.einsum("pk,pkd->pd", att, user)  # (P, D)
    best = att.detach().argmax(dim=1)
    if negatives is None:
        logits = v @ items.T  # (P, N + 1)
        logits = logits.index_fill(1, torch.tensor([0], device=logits.device), float("-inf"))
        return weighted_cross_entropy(logits, target, weight), best
    pos = (v * items[target]).sum(dim=1, keepdim=True)  # (P, 1)
    neg = v @ items[negatives].T  # (P, K')
    if log_q is not None:
        neg = neg - log_q[None, :]
    neg = neg.masked_fill(negatives[None, :] == target[:, None], float("-inf"))  # accidental hits
    logits = torch.cat([pos, neg], dim=1)
    return weighted_cross_entropy(logits, torch.zeros_like(target), weight), best


class NegativeSampler:
    """Shared negatives for a batch, with their logQ corrections.

    q: (N + 1,) probability of drawing each item in one draw (row 0 = padding, q = 0): uniform
    over 1..N, or proportional to each item's count as a training target ("popularity"; the
    in-batch sampler draws with that same q, since a batch's targets are such draws).
    draw() returns (K',) distinct item ids and (K',) log(K q(i) / c(i)), c(i) = times drawn.
    """

    def __init__(self, kind: Sampler, target_counts: np.ndarray, num_negatives: int, logq: bool = True) -> None:
        if kind not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {kind!r}")
        counts = np.asarray(target_counts, dtype=np.float64).copy()
        counts[0] = 0.0
        if kind == "uniform":
            counts[1:] = 1.0
        if counts.sum() <= 0:
            raise ValueError("no training targets to sample negatives from")
        self.kind, self.num_negatives, self.logq = kind, num_negatives, logq
        self.q = counts / counts.sum()
        self._cdf = np.cumsum(self.q)

    def draw(self, rng: np.random.Generator, batch_targets: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.kind == "in-batch":
            assert batch_targets is not None
            drawn = batch_targets[batch_targets != 0]
        else:  # inverse-CDF sampling: O(K log N), also for a 1M-item catalog
            u = rng.random(self.num_negatives) * self._cdf[-1]
            drawn = np.minimum(np.searchsorted(self._cdf, u, side="right"), self.q.size - 1)
        ids, counts = np.unique(drawn, return_counts=True)
        log_q = np.log(drawn.size * self.q[ids] / counts) if self.logq else None
        return torch.from_numpy(ids.astype(np.int64)), None if log_q is None else torch.from_numpy(log_q).float()


def encoder_loss(
    model: nn.Module,
    user: torch.Tensor,
    target: torch.Tensor,
    negatives: torch.Tensor | None = None,
    log_q: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training loss of `model`'s encoder: label-aware for MIND, max-fusion otherwise."""
    table = model.item_embedding
    assert isinstance(table, nn.Embedding), type(table)
    items = table.weight  # (N + 1, D)
    if isinstance(model, MIND):
        return label_aware_loss(user, items, target, model.config.label_power, negatives, log_q, weight)
    return max_fusion_loss(user, items, target, negatives, log_q, weight)
