"""Feature pipeline: OOV mapping, training-only statistics, no leakage from eval rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.data.sources import load
from training.data.splits import CTRSplit
from service.contract.features import LAST_ITEM, OOV, PAD
from training.data.features import (
    FeatureDecl,
    FeatureSpec,
    Vocab,
    fit_spec,
    label_aggregates,
    recent_histories,
)
from training.stages.prerank.data import build_ctr_data

SYNTH = "synthetic:users=120,items=80,seed=3"


def test_vocab_maps_unseen_and_out_of_range_values_to_oov() -> None:
    v = Vocab.fit(np.array([5, 2, 5, 0]))  # 0 is "unknown", never a value
    assert v.size == 4  # padding, OOV, 2, 5
    enc = v.encode(np.array([2, 5, 3, 99, -1, 0]), zero_is_padding=False)
    assert enc.tolist() == [2, 3, OOV, OOV, OOV, OOV]
    assert v.encode(np.array([[0, 5]]), zero_is_padding=True).tolist() == [[PAD, 3]]


def test_dense_normalisation_uses_training_rows_only() -> None:
    decl = FeatureDecl(("user_id",), (), ("x",), ("item_id",), (), ("y",), history_len=2)
    train_u = {"user_id": np.array([1, 2, 3, 4]), "x": np.array([1.0, 2.0, 3.0, 4.0])}
    train_i = {"item_id": np.array([1, 1, 2, 2]), "y": np.array([5.0, 5.0, 5.0, 5.0])}
    spec = fit_spec(decl, train_u, train_i)
    assert spec.user.dense["x"].mean == pytest.approx(2.5)
    assert spec.user.dense["x"].std == pytest.approx(np.std([1, 2, 3, 4]))
    assert spec.item.dense["y"].std == 1.0  # constant column: finite, not a division by zero
    # an evaluation row far outside the training range is scaled with the training stats
    enc = spec.user.encode({"user_id": np.array([2, 7]), "x": np.array([2.5, 100.0])})
    assert enc.dense[:, 0].tolist() == pytest.approx([0.0, (100.0 - 2.5) / np.std([1, 2, 3, 4])])
    assert enc.sparse[:, 0].tolist() == [3, OOV]  # user 7 was never in training


def test_ctr_spec_is_fitted_on_training_rows_and_eval_labels_do_not_leak() -> None:
    ds = load(SYNTH)
    split = CTRSplit(ds)
    data = build_ctr_data(ds, split, history_len=5)
    names = list(data.spec.item.dense)
    # normalised training columns have mean 0 and std 1 exactly; evaluation ones need not
    assert np.allclose(data.train.item.dense.mean(axis=0), 0.0, atol=1e-4)
    assert np.allclose(data.train.item.dense.std(axis=0), 1.0, atol=1e-3)
    # flipping every validation/test label changes neither the spec nor any encoded feature
    ds2 = load(SYNTH)
    eval_rows = np.concatenate([split.valid_idx, split.test_idx])
    ds2.ratings[eval_rows] = np.where(ds2.ratings[eval_rows] > 3, 1.0, 5.0)
    data2 = build_ctr_data(ds2, CTRSplit(ds2), history_len=5)
    assert data2.spec.to_dict() == data.spec.to_dict()
    for part in ("train", "valid", "test"):
        for a, b in zip(getattr(data, part).item, getattr(data2, part).item):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(getattr(data, part).user, getattr(data2, part).user):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(data.test.labels, data2.test.labels)
    # evaluation rows carry exactly CTRSplit.aggregates() (training rows only)
    agg = split.aggregates()
    j = names.index("item_mean_label")
    st = data.spec.item.dense["item_mean_label"]
    np.testing.assert_allclose(data.test.item.dense[:, j] * st.std + st.mean,
                               agg["item_mean_label"][ds.items[split.test_idx]], rtol=1e-5, atol=1e-5)


def test_label_aggregates_leave_one_out_on_training_rows() -> None:
    ds = load(SYNTH)
    split = CTRSplit(ds)
    rows = split.train_idx[:50]
    loo = label_aggregates(ds, split.train_idx, split.labels, rows, leave_one_out=True)
    y = split.labels[split.train_idx]
    for k, r in enumerate(rows[:10]):
        same = split.train_idx[(ds.items[split.train_idx] == ds.items[r]) & (split.train_idx != r)]
        expected = split.labels[same].mean() if same.size else y.mean()
        assert loo["item_mean_label"][k] == pytest.approx(expected, abs=1e-6)
        assert loo["item_log_count"][k] == pytest.approx(np.log1p(same.size), abs=1e-6)


def test_recent_histories_are_strictly_before_the_row_and_left_padded() -> None:
    ds = load(SYNTH)
    u = 7
    start = ds.offsets[u]
    h = recent_histories(ds, np.array([start, start + 1, start + 4]), maxlen=3)
    seq = ds.sequence(u)
    assert h[0].tolist() == [0, 0, 0]
    assert h[1].tolist() == [0, 0, seq[0]]
    assert h[2].tolist() == seq[1:4].tolist()


def test_spec_round_trip_and_last_item_field(tmp_path: Path) -> None:
    ds = load(SYNTH)
    data = build_ctr_data(ds, CTRSplit(ds), history_len=4)
    assert list(data.spec.user.sparse)[:2] == ["user_id", LAST_ITEM]
    data.spec.save(tmp_path / "spec.json")
    again = FeatureSpec.load(tmp_path / "spec.json")
    assert again.to_dict() == data.spec.to_dict()
    assert again.user.fields_config() == data.spec.user.fields_config()
    assert data.train.user.multi.shape[1] == 4  # history width = history_len
