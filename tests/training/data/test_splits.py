from pathlib import Path

import numpy as np
import pytest

from training.data.dataset import DataError
from training.data.sources import load
from training.data.splits import CTRSplit, LeaveOneOut


def csv(tmp_path: Path, rows: list[str]) -> str:
    f = tmp_path / "log.csv"
    f.write_text("\n".join(rows) + "\n")
    return f"csv:{f}"


def test_leave_one_out_hand_example(tmp_path: Path) -> None:
    # u1: a b c d e (5 items), u2: a b (too short to evaluate)
    rows = [f"u1,{x},{t}" for t, x in enumerate("abcde")] + ["u2,a,1", "u2,b,2"]
    ds = load(csv(tmp_path, rows))
    loo = LeaveOneOut(ds)
    idx = {name: i for i, name in enumerate(ds.item_ids)}
    assert loo.eval_users.tolist() == [0]
    assert loo.targets("test").tolist() == [idx["e"]]
    assert loo.targets("valid").tolist() == [idx["d"]]
    assert loo.histories("test").tolist() == [[idx[x] for x in "abcd"]]
    assert loo.histories("valid").tolist() == [[idx[x] for x in "abc"]]
    assert loo.histories("test", maxlen=2).tolist() == [[idx["c"], idx["d"]]]
    # training part: u1's first three items, and all of u2
    assert loo.train_mask.tolist() == [True, True, True, False, False, True, True]
    # counts known at test time include the validation item d, not the test item e
    assert loo.item_counts("test")[idx["d"]] == 1 and loo.item_counts("test")[idx["e"]] == 0
    assert loo.item_counts("valid")[idx["d"]] == 0
    train = loo.train_sequences()
    assert train.tolist() == [[idx["a"], idx["b"], idx["c"]], [0, idx["a"], idx["b"]]]


def test_leave_one_out_needs_three_interactions(tmp_path: Path) -> None:
    ds = load(csv(tmp_path, ["u1,a,1", "u1,b,2"]))
    with pytest.raises(DataError, match="3 interactions"):
        LeaveOneOut(ds)


def test_ctr_split_drops_threes_and_is_temporal(tmp_path: Path) -> None:
    rows = [f"u1,i{t},{t},{r}" for t, r in enumerate([5, 3, 1, 4, 5, 2, 3, 4, 5, 1, 4, 4])]
    ds = load(csv(tmp_path, rows))
    sp = CTRSplit(ds, valid_frac=0.2, test_frac=0.2)
    kept = ds.ratings != 3
    assert sp.train_idx.size + sp.valid_idx.size + sp.test_idx.size == int(kept.sum())
    assert (ds.ratings[np.concatenate([sp.train_idx, sp.valid_idx, sp.test_idx])] != 3).all()
    # temporal: every train row precedes every valid row, which precede every test row
    assert ds.timestamps[sp.train_idx].max() < ds.timestamps[sp.valid_idx].min()
    assert ds.timestamps[sp.valid_idx].max() < ds.timestamps[sp.test_idx].min()
    assert sp.labels[sp.test_idx].tolist() == [float(r > 3) for r in ds.ratings[sp.test_idx]]


def test_ctr_aggregates_use_training_rows_only(tmp_path: Path) -> None:
    base = [f"u1,i{t},{t},{r}" for t, r in enumerate([5, 1, 5, 1, 5, 1, 5, 1, 5, 1])]
    changed = base[:-2] + ["u1,i8,8,1", "u1,i9,9,5"]  # flip labels in the test part only
    a = CTRSplit(load(csv(tmp_path, base)), valid_frac=0.0, test_frac=0.2).aggregates()
    b = CTRSplit(load(csv(tmp_path, changed)), valid_frac=0.0, test_frac=0.2).aggregates()
    assert a["user_mean_label"][0] == pytest.approx(0.5)
    assert np.array_equal(a["user_mean_label"], b["user_mean_label"])
    # items only seen in the test part get the training prior and count 0
    assert a["item_log_count"][-1] == 0.0


def test_ctr_split_needs_ratings(tmp_path: Path) -> None:
    ds = load(csv(tmp_path, ["u1,a,1", "u1,b,2", "u1,c,3"]))
    with pytest.raises(DataError, match="needs ratings"):
        CTRSplit(ds)


def test_holdout_rows_are_the_held_out_training_items_with_their_histories(tmp_path: Path) -> None:
    # u1: a b c d e f g (7 items: training a..e, valid f, test g), u2: a b (training only)
    rows = [f"u1,{x},{t}" for t, x in enumerate("abcdefg")] + ["u2,a,1", "u2,b,2"]
    ds = load(csv(tmp_path, rows))
    idx = {name: i for i, name in enumerate(ds.item_ids)}
    assert LeaveOneOut(ds).holdout_rows().size == 0
    loo = LeaveOneOut(ds, holdout=2)
    rows_ = loo.holdout_rows()
    # u1's last two training items d, e and u2's b (a user keeps one training item)
    assert sorted(ds.item_ids[ds.items[rows_]].tolist()) == ["b", "d", "e"]
    assert not loo.train_mask[rows_].any()
    hist = loo.row_histories(rows_)
    by_item = {str(ds.item_ids[ds.items[r]]): [x for x in h.tolist() if x] for r, h in zip(rows_, hist)}
    assert by_item["d"] == [idx["a"], idx["b"], idx["c"]]
    assert by_item["e"] == [idx["a"], idx["b"], idx["c"], idx["d"]]
    assert by_item["b"] == [idx["a"]]
