"""The one epoch loop of the three model trainers (retrieval, pre-rank, re-rank).

A trainer plugs in its per-epoch train step and its validation metric; `fit` does the
bookkeeping they share: epochs, early stopping with the best weights restored
(training/early_stopping.py), the `--max-minutes` budget, a tqdm bar per epoch and the
throughput (rows/s of the train step, validation excluded). It draws no random numbers itself,
so a trainer's seeds give the same weights as its own loop did.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from torch import nn
from tqdm import tqdm

from training.early_stopping import EarlyStopping

log = logging.getLogger(__name__)
T = TypeVar("T")


class Bar(Protocol):
    """Wraps one epoch's batches in a progress bar; `postfix` shows the running loss."""

    def __call__(self, batches: Iterable[T]) -> Iterator[T]: ...

    def postfix(self, loss: float) -> None: ...


@dataclass(frozen=True)
class StepResult:
    """One epoch's train step: mean loss, rows it trained on (sequences, pairs or lists), extras."""

    loss: float
    rows: int
    extra: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class EpochResult:
    epoch: int  # 1-based
    step: StepResult
    score: float  # the validation metric; nan without an evaluator
    train_seconds: float  # the train step alone
    seconds: float  # train step + validation

    @property
    def rows_per_s(self) -> float:
        return self.step.rows / self.train_seconds if self.train_seconds > 0 else math.inf


@dataclass
class FitResult:
    best_epoch: int  # the last epoch without an evaluator
    best_score: float  # nan without an evaluator; the kept weights' score (the average's when kept)
    epochs: list[EpochResult]
    stopped: str  # "epochs", "early stop" or "max minutes"
    averaged: list[int] = field(default_factory=list)  # the epochs whose average is kept (empty: best_epoch's)
    averaged_score: float = math.nan  # that average's validation score, kept or not (nan: none tried)


class _TqdmBar:
    def __init__(self, epoch: int, enabled: bool) -> None:
        self.epoch, self.enabled = epoch, enabled
        self._bar: Any = None

    def __call__(self, batches: Iterable[T]) -> Iterator[T]:
        self._bar = tqdm(batches, desc=f"epoch {self.epoch}", unit="batch", disable=not self.enabled, leave=False)
        return iter(self._bar)

    def postfix(self, loss: float) -> None:
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}")


def fit(
    model: nn.Module,
    epochs: int,
    patience: int,
    train_step: Callable[[int, Bar], StepResult],
    evaluate: Callable[[], float] | None,
    *,
    start_score: float = -math.inf,
    max_minutes: float | None = None,
    metric: str = "NDCG@10",
    progress: bool = True,
    sync: Callable[[float, bool], tuple[float, bool]] | None = None,
    on_epoch: Callable[[EpochResult], None] | None = None,
    average: int = 1,
) -> FitResult:
    """Run up to `epochs` epochs of `train_step(epoch, bar)` (model in train mode), each followed
    by `evaluate()` (higher is better); stop `patience` epochs past the best one or once
    `max_minutes` have passed since the start; restore the best weights; model in eval mode.

    start_score: the weights as given (epoch 0), e.g. a residual model that must beat its input
    order. evaluate=None: every epoch runs and the last weights are kept. sync: under DDP, rank 0's
    (score, out of time) for every rank. on_epoch: the trainer's own history / log line.
    average: with an evaluator, also try the uniform average of the `average` best epochs' weights
    (training/early_stopping.py) and keep it when it validates strictly higher than the best epoch.
    """
    stopper = EarlyStopping(model, patience, score=start_score, keep=average)
    budget = 60 * max_minutes if max_minutes else math.inf
    results: list[EpochResult] = []
    stopped = "epochs"
    started = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        t0 = time.perf_counter()
        step = train_step(epoch, _TqdmBar(epoch, progress))
        train_seconds = time.perf_counter() - t0
        score = evaluate() if evaluate is not None else math.nan
        out_of_time = time.perf_counter() - started > budget
        if sync is not None:
            score, out_of_time = sync(score, out_of_time)
        result = EpochResult(epoch, step, score, train_seconds, time.perf_counter() - t0)
        results.append(result)
        if on_epoch is not None:
            on_epoch(result)
        log.debug("epoch %d loss %.4f valid %s %.4f (%.1fs, %.0f rows/s)",
                  epoch, step.loss, metric, score, train_seconds, result.rows_per_s)
        if evaluate is not None and stopper.update(epoch, score):
            log.info("early stop: no better validation %s for %d epochs", metric, patience)
            stopped = "early stop"
            break
        if out_of_time:
            # the time ceiling (sync: rank 0's, which this rank may not have been given)
            log.info("stopping: the time ceiling (--max-minutes %s) reached", "?" if max_minutes is None else max_minutes)
            stopped = "max minutes"
            break
    model.eval()
    if evaluate is None:
        return FitResult(len(results), math.nan, results, stopped)
    stopper.restore()
    fitted = FitResult(stopper.best_epoch, stopper.best, results, stopped)
    averaged = stopper.averaged()
    if averaged is None:
        return fitted
    model.load_state_dict(averaged)
    score = evaluate()
    if sync is not None:
        score, _ = sync(score, False)
    model.eval()
    fitted.averaged_score = score
    epochs_kept = stopper.kept_epochs
    if score > stopper.best:
        fitted.averaged, fitted.best_score = epochs_kept, score
        log.info("kept the average of epochs %s: validation %s %.4f (best epoch %d alone %.4f)",
                 epochs_kept, metric, score, stopper.best_epoch, stopper.best)
    else:
        stopper.restore()
        log.info("kept epoch %d (validation %s %.4f); the average of epochs %s scored %.4f",
                 stopper.best_epoch, metric, stopper.best, epochs_kept, score)
    return fitted
