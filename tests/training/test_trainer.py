"""training/trainer.fit: early stopping with the best weights, no evaluator, the time budget, the
average of the best epochs (training/early_stopping.py keep / averaged);
training/catalog_growth.unchanged_rows (which item heads reindex takes from the first pass)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from training.early_stopping import EarlyStopping
from training.publish.item_side import unchanged_rows
from training.trainer import Bar, StepResult, fit


def _model() -> nn.Linear:
    m = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(0.0)
    return m


def _step(model: nn.Linear, rows: int = 10):  # type: ignore[no-untyped-def]
    def step(epoch: int, bar: Bar) -> StepResult:
        assert model.training
        for _ in bar(range(2)):
            bar.postfix(1.0)
        with torch.no_grad():
            model.weight.fill_(float(epoch))  # the weights say which epoch wrote them
        return StepResult(loss=1.0 / epoch, rows=rows)

    return step


def test_early_stopping_restores_the_best_epoch() -> None:
    model = _model()
    scores = iter([0.1, 0.3, 0.2, 0.25, 0.9])
    seen: list[int] = []
    res = fit(model, 5, 2, _step(model), lambda: next(scores), progress=False, on_epoch=lambda r: seen.append(r.epoch))
    assert (res.best_epoch, res.best_score, res.stopped) == (2, 0.3, "early stop")
    assert seen == [1, 2, 3, 4] and [r.step.loss for r in res.epochs] == [1.0, 0.5, 1 / 3, 0.25]
    assert model.weight.item() == 2.0 and not model.training
    assert all(r.rows_per_s > 0 and r.seconds >= r.train_seconds for r in res.epochs)


def test_the_average_of_the_best_epochs_is_kept_when_it_validates_higher() -> None:
    model = _model()
    # epochs 1-5 write weights 1-5 and score as listed; the 3 best are epochs 4, 2, 5 (weights 4, 2, 5:
    # mean 11/3); the evaluator then sees the averaged weights and scores them 0.8 > 0.6
    scores = iter([0.1, 0.5, 0.2, 0.6, 0.4, 0.8])
    res = fit(model, 5, 5, _step(model), lambda: next(scores), progress=False, average=3)
    assert res.averaged == [4, 2, 5] and (res.best_epoch, res.best_score, res.averaged_score) == (4, 0.8, 0.8)
    assert model.weight.item() == pytest.approx(11 / 3) and not model.training


def test_the_best_epoch_stays_when_the_average_validates_no_higher() -> None:
    model = _model()
    scores = iter([0.1, 0.5, 0.2, 0.6, 0.4, 0.6])  # the average ties the best epoch: not kept
    res = fit(model, 5, 5, _step(model), lambda: next(scores), progress=False, average=3)
    assert res.averaged == [] and (res.best_epoch, res.best_score, res.averaged_score) == (4, 0.6, 0.6)
    assert model.weight.item() == 4.0


def test_averaging_needs_two_scored_epochs_and_leaves_integer_tensors_alone() -> None:
    model = _model()
    res = fit(model, 1, 1, _step(model), lambda: 0.3, progress=False, average=5)  # one epoch: nothing to average
    assert res.averaged == [] and math.isnan(res.averaged_score) and model.weight.item() == 1.0
    net = nn.BatchNorm1d(1)  # num_batches_tracked is an integer buffer: taken from the best epoch
    stopper = EarlyStopping(net, patience=5, keep=2)
    for epoch, score in ((1, 0.2), (2, 0.4), (3, 0.1)):
        with torch.no_grad():
            net.weight.fill_(float(epoch))
            tracked = net.num_batches_tracked
            assert tracked is not None
            tracked.fill_(epoch)
        stopper.update(epoch, score)
    avg = stopper.averaged()
    assert avg is not None and stopper.kept_epochs == [2, 1]
    assert avg["weight"].item() == 1.5 and avg["num_batches_tracked"].item() == 2
    with pytest.raises(ValueError, match="keep must be >= 1, got 0"):
        EarlyStopping(net, patience=1, keep=0)


def test_start_score_keeps_the_given_weights_when_no_epoch_beats_it() -> None:
    model = _model()
    res = fit(model, 3, 1, _step(model), lambda: 0.1, start_score=0.5, progress=False)
    assert (res.best_epoch, res.best_score, len(res.epochs)) == (0, 0.5, 1)
    assert model.weight.item() == 0.0


def test_without_an_evaluator_every_epoch_runs_and_the_last_weights_stay() -> None:
    model = _model()
    res = fit(model, 3, 1, _step(model), None, progress=False)
    assert res.best_epoch == 3 and math.isnan(res.best_score) and res.stopped == "epochs"
    assert all(math.isnan(r.score) for r in res.epochs) and model.weight.item() == 3.0


def test_max_minutes_stops_after_the_epoch_that_ran_out() -> None:
    model = _model()
    res = fit(model, 10, 10, _step(model), lambda: 0.0, max_minutes=1e-9, progress=False)
    assert res.stopped == "max minutes" and len(res.epochs) == 1


def test_sync_decides_for_every_rank() -> None:
    model = _model()
    res = fit(model, 4, 1, _step(model), lambda: 0.0, progress=False, sync=lambda s, late: (s + 1.0, True))
    assert res.stopped == "max minutes" and res.epochs[0].score == 1.0


def test_bad_patience_names_the_value() -> None:
    with pytest.raises(ValueError, match="patience must be >= 0, got -1"):
        fit(_model(), 1, -1, _step(_model()), None, progress=False)


def test_unchanged_rows_compares_every_input_of_the_data_set_items() -> None:
    ref = {"item_id": np.arange(5), "genre": np.array([[0, 0], [1, 0], [2, 3], [1, 0], [4, 0]]),
           "price": np.array([0, 1.0, 2.0, 3.0, 4.0], dtype=np.float32)}
    # a grown catalog: item 2's genres changed, item 3's price changed, item 5 is new, lists wider
    raw = {"item_id": np.arange(6), "genre": np.array([[0, 0, 0], [1, 0, 0], [2, 5, 0], [1, 0, 0], [4, 0, 0], [1, 2, 3]]),
           "price": np.array([0, 1.0, 2.0, 9.0, 4.0, 5.0], dtype=np.float32)}
    np.testing.assert_array_equal(unchanged_rows(raw, ref, 4), [1, 4])
    assert unchanged_rows({**raw, "extra": np.zeros(6)}, ref, 4).size == 0  # an input the reference lacks
