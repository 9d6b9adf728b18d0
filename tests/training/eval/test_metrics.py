import math
from pathlib import Path

import numpy as np
import pytest

from training.eval.metrics import auc, list_metrics, logloss, mask_seen, ranking_metrics, target_ranks, top_k


def test_target_ranks_breaks_ties_by_item_index() -> None:
    scores = np.array(
        [
            [-np.inf, 0.5, 0.9, 0.5, 0.1],  # target 3 ties with item 1 (smaller index) -> rank 2
            [-np.inf, 0.5, 0.9, 0.5, 0.1],  # target 1 ties with item 3 (larger index) -> rank 1
            [-np.inf, 0.2, 0.3, 0.4, 0.9],  # target 4 is best -> rank 0
        ],
        dtype=np.float32,
    )
    assert target_ranks(scores, np.array([3, 1, 4])).tolist() == [2, 1, 0]


def test_ranking_metrics_hand_computed() -> None:
    m = ranking_metrics(np.array([0, 2, 9, 30]), ks=(1, 5, 10))
    assert m["HR@1"] == pytest.approx(0.25)
    assert m["HR@5"] == pytest.approx(0.5)
    assert m["HR@10"] == pytest.approx(0.75)
    expected_ndcg10 = (1.0 + 1 / math.log2(4) + 1 / math.log2(11)) / 4
    assert m["NDCG@10"] == pytest.approx(expected_ndcg10)
    assert m["NDCG@1"] == pytest.approx(0.25)
    assert m["MRR"] == pytest.approx((1 + 1 / 3 + 1 / 10 + 1 / 31) / 4)


def test_mask_seen_hides_history_and_padding() -> None:
    scores = np.ones((2, 5), dtype=np.float32)
    mask_seen(scores, np.array([[0, 2], [3, 4]]))
    assert np.isneginf(scores[:, 0]).all()
    assert np.isneginf(scores[0, 2]) and np.isneginf(scores[1, 3]) and np.isneginf(scores[1, 4])
    assert scores[0, 1] == 1 and scores[0, 3] == 1 and scores[1, 1] == 1


def test_top_k_orders_best_first_ties_by_index() -> None:
    scores = np.array([[0.0, 0.3, 0.9, 0.3, 0.5]])
    assert top_k(scores, 3).tolist() == [[2, 4, 1]]


def test_auc_hand_computed_and_ties() -> None:
    assert auc(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.3, 0.1])) == pytest.approx(0.75)
    assert auc(np.array([1, 0]), np.array([0.5, 0.5])) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="positive and one negative"):
        auc(np.array([1, 1]), np.array([0.1, 0.2]))


def test_logloss_hand_computed() -> None:
    got = logloss(np.array([1, 0]), np.array([0.8, 0.4]))
    assert got == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)


def test_list_metrics_hand_computed() -> None:
    # one list, displayed order by score: items with labels [0, 1, 1, 0]
    scores = np.array([[0.9, 0.8, 0.7, 0.1]])
    labels = np.array([[0, 1, 1, 0]])
    m = list_metrics(scores, labels, ks=(2, 4))
    dcg2 = 1 / math.log2(3)
    idcg2 = 1 + 1 / math.log2(3)
    assert m["NDCG@2"] == pytest.approx(dcg2 / idcg2)
    assert m["P@2"] == pytest.approx(0.5)
    # AP@4: hits at ranks 2 and 3 -> (1/2 + 2/3) / 2
    assert m["MAP@4"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert m["lists"] == 1


def test_list_metrics_ignores_padding_and_empty_lists() -> None:
    scores = np.array([[0.1, 0.9, 5.0], [0.3, 0.2, 0.1]])
    labels = np.array([[1, 0, 1], [0, 0, 0]])
    mask = np.array([[True, True, False], [True, True, True]])
    m = list_metrics(scores, labels, ks=(1,), mask=mask)
    # the padded entry (score 5.0, label 1) must not count; the second list has no positive
    assert m["lists"] == 1
    assert m["P@1"] == 0.0
    assert m["NDCG@1"] == 0.0


def test_stopping_ndcg10_reads_the_validation_item_and_the_held_out_items(tmp_path: Path) -> None:
    from training.data.sources import load
    from training.data.splits import LeaveOneOut
    from training.eval.metrics import evaluate_retrieval, stopping_ndcg10

    # one user: a b c d e f g; training a..e, valid f, test g; H = 2 holds out d and e
    f = tmp_path / "log.csv"
    f.write_text("\n".join(f"u1,{x},{t}" for t, x in enumerate("abcdefg")) + "\n")
    ds = load(f"csv:{f}")
    idx = {name: i for i, name in enumerate(ds.item_ids)}
    order = [idx[x] for x in "defgabc"]  # a fixed preference: d first, then e, f, g (seen ones removed)

    def scorer(hist: np.ndarray) -> np.ndarray:
        s = np.zeros((hist.shape[0], ds.num_items + 1), dtype=np.float32)
        for rank, item in enumerate(order):
            s[:, item] = 100.0 - rank
        return s

    plain = LeaveOneOut(ds)
    assert stopping_ndcg10(scorer, plain) == evaluate_retrieval(scorer, plain, "valid", ks=(10,), progress=False)["NDCG@10"]
    # valid f after history a..e: d, e seen -> f first (rank 0); held-out d after a..c: rank 0;
    # held-out e after a..d: rank 0 -> all three at the top
    assert stopping_ndcg10(scorer, LeaveOneOut(ds, holdout=2)) == pytest.approx(1.0)
    order[:] = [idx[x] for x in "gfedabc"]  # now: valid f at rank 1 (g ahead), d at rank 3 (g f e), e at rank 2
    expected = (1 / math.log2(3) + 1 / math.log2(5) + 1 / math.log2(4)) / 3
    assert stopping_ndcg10(scorer, LeaveOneOut(ds, holdout=2)) == pytest.approx(expected)
