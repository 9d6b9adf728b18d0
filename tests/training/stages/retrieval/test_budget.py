"""The demo's retrieval ceiling (training/stages/retrieval/budget.py) on a tiny and a large data set."""

from __future__ import annotations

import numpy as np
import pytest

from training.data.sources import load
from training.data.splits import LeaveOneOut
from training.stages.retrieval import budget as b
from training.stages.retrieval.budget import RetrievalBudget, budget_for, retrieval_budget


def test_tiny_data_gets_many_epochs_and_a_short_ceiling() -> None:
    # 200 users x 80 items: 2 batches an epoch, so the epoch cap binds; the minutes follow the work
    got = retrieval_budget(sequences=198, positions=1505, num_items=80)
    assert got.epochs == b.MAX_EPOCHS == 100
    work = 198 * 50 * b.ENCODER_ITEMS + 1505 * 80
    assert got.minutes == pytest.approx(b.SLACK * 100 * work / b.RATE / 60, abs=0.01)
    assert b.MIN_MINUTES <= got.minutes < 10


def test_synthetic_default_budget() -> None:
    got = budget_for(LeaveOneOut(load("synthetic")))  # 1995 sequences, 16 batches an epoch
    assert got.epochs == -(-b.STEPS // 16)
    assert b.MIN_MINUTES < got.minutes < b.MAX_MINUTES


def test_large_data_gets_the_epoch_floor_and_the_minutes_cap() -> None:
    # 20k users x 10k items (the seqtxt figure of issue 22): 157 batches an epoch
    got = retrieval_budget(sequences=19974, positions=397276, num_items=9986)
    assert got == RetrievalBudget(b.MIN_EPOCHS, b.MAX_MINUTES)


def test_more_data_never_gets_less_time() -> None:
    small = retrieval_budget(sequences=2000, positions=30000, num_items=1000)
    large = retrieval_budget(sequences=4000, positions=60000, num_items=1000)
    assert large.minutes >= small.minutes and large.epochs <= small.epochs


def test_bad_inputs_name_the_values() -> None:
    with pytest.raises(ValueError, match="sequences=0"):
        retrieval_budget(sequences=0, positions=10, num_items=5)
    with pytest.raises(ValueError, match="epochs >= 1 and minutes > 0, got 0, 1.0"):
        RetrievalBudget(0, 1.0)


def test_the_encoder_reads_long_histories_up_to_its_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """encoder_maxlen: the trainer's default on short histories, the 90th percentile of the users'
    training lengths on long ones, never above the cap."""
    from training.stages.retrieval.budget import MAXLEN_CAP, MAXLEN_FLOOR, encoder_maxlen

    assert encoder_maxlen(LeaveOneOut(load("synthetic:users=300,items=100,seed=0"))) == MAXLEN_FLOOR
    mid = LeaveOneOut(load("synthetic:users=100,items=300,mean_len=100,min_len=60,max_len=150,seed=0"))
    want = int(np.ceil(np.quantile(mid.full_train_lengths(), 0.9)))
    assert MAXLEN_FLOOR < want < MAXLEN_CAP and encoder_maxlen(mid) == want
    monkeypatch.setattr(b, "MAXLEN_CAP", want - 10)
    assert encoder_maxlen(mid) == want - 10
