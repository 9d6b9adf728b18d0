"""training/trainer.fit: early stopping with the best weights, no evaluator, the time budget;
training/catalog_growth.unchanged_rows (which item heads reindex takes from the first pass)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

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
