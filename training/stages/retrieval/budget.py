"""How long `recsys demo` trains the retriever: until validation NDCG@10 stops improving
(early stopping, training/trainer.fit), under a ceiling that fits the data's size.

The ceiling has two parts, both from the training pairs (training_pairs: S sequences of at most
L = maxlen inputs, P positions with a next item) and the catalog size N:

    epochs  = clamp(ceil(STEPS / ceil(S / batch)), MIN_EPOCHS, MAX_EPOCHS)
    work    = S * L * ENCODER_ITEMS + P * N            (D-wide multiply-adds per epoch, / D)
    minutes = clamp(SLACK * epochs * work / RATE / 60, MIN_MINUTES, MAX_MINUTES)

Epochs: a small data set takes few gradient steps per epoch and needs many epochs; a large one
converges in fewer epochs, but gets at least MIN_EPOCHS. Work: the encoder runs on every padded
position (two blocks of ~12 D^2 + 2 L D multiply-adds, about 1000 D at D = 64, L = 50:
ENCODER_ITEMS), the full softmax on every position with a target (N D). Minutes: the time those epochs take at RATE, times SLACK,
because the machine may be shared; the ceiling is a guard, early stopping is what normally ends
training. Measurements behind the constants are next to each one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from training.data.splits import LeaveOneOut
from training.stages.retrieval.train import training_pairs

# Synthetic default (2000 users, 1000 items; 1995 sequences, 16 steps an epoch), from scratch:
# `recsys train retrieval --data synthetic --launchers 1 --dropout 0.2 --lr 2e-3 --patience 5 --epochs 100`
# (the demo's settings) had its best validation NDCG@10 at epoch 42 (0.2969; 672 steps; 0.2946 at
# epoch 32) and stopped at 47. STEPS = 1.5x that leaves room for other seeds and data sets.
STEPS = 1000
# Large sets take many steps an epoch; the floor still gives every sequence 15 passes (a choice,
# not a measurement: early stopping ends sooner where fewer suffice).
MIN_EPOCHS, MAX_EPOCHS = 15, 100
ENCODER_ITEMS = 1000  # from the multiply-add count above, not measured
# Work units per second: that run trained 400 sequences/s (66.7k units each) with one torch thread
# once its 2-core machine was quiet, and 70/s while three other training jobs shared it (5.7x
# slower); SLACK covers that.
RATE = 2.7e7
SLACK = 6.0
MIN_MINUTES, MAX_MINUTES = 1.0, 60.0


@dataclass(frozen=True)
class RetrievalBudget:
    """Ceiling of one retrieval training run: at most `epochs` epochs and `minutes` minutes."""

    epochs: int
    minutes: float

    def __post_init__(self) -> None:
        if self.epochs < 1 or not self.minutes > 0:
            raise ValueError(f"a budget needs epochs >= 1 and minutes > 0, got {self.epochs}, {self.minutes}")

    def describe(self) -> str:
        return f"up to {self.epochs} epochs / {self.minutes:.1f} min"


def retrieval_budget(sequences: int, positions: int, num_items: int, maxlen: int = 50,
                     batch_size: int = 128) -> RetrievalBudget:
    """The ceiling for S = sequences, P = positions, N = num_items (see the module doc)."""
    if sequences < 1 or positions < 1 or num_items < 1:
        raise ValueError(f"no training pairs to budget: sequences={sequences}, positions={positions}, "
                         f"num_items={num_items}")
    steps_per_epoch = math.ceil(sequences / batch_size)
    epochs = min(MAX_EPOCHS, max(MIN_EPOCHS, math.ceil(STEPS / steps_per_epoch)))
    work = sequences * maxlen * ENCODER_ITEMS + positions * num_items
    minutes = min(MAX_MINUTES, max(MIN_MINUTES, SLACK * epochs * work / RATE / 60))
    return RetrievalBudget(epochs, round(minutes, 2))


def budget_for(split: LeaveOneOut, maxlen: int = 50, batch_size: int = 128) -> RetrievalBudget:
    """retrieval_budget of a split's training pairs."""
    inputs, targets = training_pairs(split, maxlen)
    return retrieval_budget(int(inputs.shape[0]), int((targets != 0).sum()), split.num_items, maxlen, batch_size)


# How many of a user's most recent items the demo's encoder reads: the trainer's default (MAXLEN_FLOOR)
# unless the users' histories are long, then enough for MAXLEN_QUANTILE of them, at most MAXLEN_CAP
# (attention costs grow with its square). ml-100k (training lengths: median 63, 90th percentile 242) ->
# 200: SASRec alone on the test users 0.0922 -> 0.1120 NDCG@10 (H = 6, seed 0; issue 22's note); the
# synthetic sets (90th percentile 33-39) keep 50.
MAXLEN_FLOOR, MAXLEN_CAP, MAXLEN_QUANTILE = 50, 200, 0.9


def encoder_maxlen(split: LeaveOneOut) -> int:
    """The encoder's history length for this data set (see MAXLEN_QUANTILE)."""
    n = split.full_train_lengths()
    if n.size == 0:
        return MAXLEN_FLOOR
    return int(min(MAXLEN_CAP, max(MAXLEN_FLOOR, math.ceil(float(np.quantile(n, MAXLEN_QUANTILE))))))
