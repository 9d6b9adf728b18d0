"""The pair features (service/pair_features.py) and the pre-ranker's pair prior block
(service/contract/pair_features.py) on hand-made tables with known values."""

from __future__ import annotations

import json

import numpy as np
import pytest

from service.contract.blocks import BlockError
from service.contract.catalog import ItemFeatures
from service.contract.pair_features import PAIR_FEATURES, RECENT_PER_USER, PairPrior
from service.item2item import Merged
from service.pair_features import PairTables, category_codes, item_popularity, pair_features

# 6 items; row i = the neighbours of item i (as tests/service/test_item2item.py)
NB = np.array([[0, 0], [2, 3], [3, 0], [4, 1], [0, 0], [6, 0], [0, 0]], np.int32)
SC = np.array([[0, 0], [0.5, 0.25], [0.8, 0], [1.0, 0.1], [0, 0], [0.3, 0], [0, 0]], np.float32)
# category codes: item 1 {1, 3}, item 2 {3}, item 3 {1}, item 4 {1, 2}, item 5 {2, 3}, item 6 none
CATS = np.array([[0, 0], [1, 3], [3, 0], [1, 0], [1, 2], [2, 3], [0, 0]], np.int64)
POP = np.stack([np.arange(7) * 0.5, np.arange(7) * 0.25], axis=1).astype(np.float32)


def merged() -> Merged:
    """Three candidates: 4 (route only, its best), 2 (FAISS first, route second), 6 (FAISS only)."""
    return Merged(items=np.array([4, 2, 6]), merged=np.array([0.9, 0.6, 0.3], np.float32),
                  retrieval=np.array([0.5, 0.4, 0.3], np.float32), launchers=np.array([1, 0, 0]),
                  i2i=np.array([1.0, 0.5, 0.0], np.float32), by_faiss=np.array([False, True, True]),
                  route_term=np.array([0.2, 0.1, 0.0], np.float32), faiss_rank=np.array([-1, 0, 1]),
                  i2i_rank=np.array([0, 1, -1]), faiss_count=2, reached_count=3)


def test_features_of_a_hand_made_request() -> None:
    f = pair_features(PairTables(POP, CATS, NB, SC), np.array([5, 1, 3]), merged())  # oldest first: 3 is last
    assert f.shape == (3, len(PAIR_FEATURES)) and f.dtype == np.float32
    got = {name: f[:, j].tolist() for j, name in enumerate(PAIR_FEATURES)}
    want = {
        "retrieval": [0.5, 0.4, 0.3],
        "route_term": [0.2, 0.1, 0.0],
        "faiss_rank": np.log1p([2, 0, 1]).tolist(),  # 4 missing: one past FAISS's 2
        "faiss_missing": [1, 0, 0],
        "i2i_rank": np.log1p([0, 1, 3]).tolist(),  # 6 missing: one past the 3 reached
        "i2i_missing": [0, 0, 1],
        "pop_all": [2.0, 1.0, 3.0],
        "pop_recent": [1.0, 0.5, 1.5],
        # neighbours of the last item 3: 4 (1.0), 1 (0.1)
        "cooc_last": [1.0, 0.0, 0.0],
        # 3 (x 1): 4 (1.0); 1 (x 0.5): 2 (0.5), 3; 5 (x 0.25): 6 (0.3)
        "cooc_recent": [1.0, 0.25, 0.075],
        # history 5 {2, 3}, 1 {1, 3}, 3 {1}: code 1 in 2 of 3, code 2 in 1, code 3 in 2
        "category_overlap": [(2 / 3 + 1 / 3) / 2, 2 / 3, 0.0],
        "history_length": [np.log1p(3)] * 3,
    }
    for name in PAIR_FEATURES:
        assert got[name] == pytest.approx(want[name], abs=1e-6), name


def test_without_route_or_categories_those_features_are_zero() -> None:
    f = pair_features(PairTables(POP, np.zeros((7, 0), np.int64)), np.array([5, 1, 3]), merged())
    for name in ("cooc_last", "cooc_recent", "category_overlap"):
        assert f[:, PAIR_FEATURES.index(name)].tolist() == [0.0, 0.0, 0.0]
    only = Merged.faiss_only(np.array([2, 6]), np.array([0.4, 0.3], np.float32), np.array([0, 0]))
    f = pair_features(PairTables(POP, CATS, NB, SC), np.array([3]), only)
    assert f[:, PAIR_FEATURES.index("faiss_rank")].tolist() == pytest.approx(np.log1p([0, 1]).tolist())
    assert f[:, PAIR_FEATURES.index("i2i_missing")].tolist() == [1.0, 1.0]


def test_item_popularity_counts_all_and_each_users_recent_rows() -> None:
    # user 0: item 5 twice, then RECENT_PER_USER times item 1; user 1: item 2 then item 5
    items = np.array([5, 5] + [1] * RECENT_PER_USER + [2, 5])
    users = np.array([0] * (RECENT_PER_USER + 2) + [1, 1])
    pop = item_popularity(items, users, num_items=6)
    assert pop.shape == (7, 2) and pop.dtype == np.float32
    assert np.expm1(pop[:, 0]).round().tolist() == [0, RECENT_PER_USER, 1, 0, 0, 3, 0]
    assert np.expm1(pop[:, 1]).round().tolist() == [0, RECENT_PER_USER, 1, 0, 0, 1, 0]


def test_category_codes_give_each_feature_value_its_own_code() -> None:
    feats = ItemFeatures(categorical={"c": np.array([0, 1, 2])}, multi={"g": np.array([[0, 0], [1, 2], [2, 0]])},
                         vocab={"c": ["a", "b"], "g": ["x", "y"]})
    assert category_codes(feats, 2).tolist() == [[0, 0, 0], [1, 4, 5], [2, 5, 0]]
    assert category_codes(ItemFeatures(), 2).shape == (3, 0)


def prior_block(hidden: int = 2) -> dict:
    f = len(PAIR_FEATURES)
    rng = np.random.default_rng(0)
    return {"features": list(PAIR_FEATURES), "mean": rng.normal(size=f).tolist(), "std": (rng.random(f) + 0.5).tolist(),
            "tower_weight": 0.5, "weight": rng.normal(size=f).tolist(), "launcher_bias": [0.0, 0.25],
            "hidden_weight": rng.normal(size=(f, hidden)).tolist() if hidden else [],
            "hidden_bias": rng.normal(size=hidden).tolist(), "out_weight": rng.normal(size=hidden).tolist()}


def test_the_prior_block_round_trips_and_scores_by_its_formula() -> None:
    d = prior_block()
    block = PairPrior.from_dict(json.loads(json.dumps(d)))
    assert block.to_dict() == d
    a = block.arrays()
    feats = np.random.default_rng(1).normal(size=(4, len(PAIR_FEATURES))).astype(np.float32)
    tower, launch = np.array([1.0, -1.0, 0.5, 0.0], np.float32), np.array([0, 1, 1, 0])
    z = (feats - np.array(d["mean"])) / np.array(d["std"])
    hidden = np.maximum(z @ np.array(d["hidden_weight"]) + np.array(d["hidden_bias"]), 0.0) @ np.array(d["out_weight"])
    want = 0.5 * tower + z @ np.array(d["weight"]) + np.array([0.0, 0.25])[launch] + hidden
    assert a.score(tower, feats, launch) == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize(("change", "message"), [
    ({"features": ["retrieval"]}, "features must be"),
    ({"mean": [0.0]}, "mean must be a list of"),
    ({"launcher_bias": []}, "launcher_bias must be a non-empty list"),
    ({"out_weight": [1.0]}, "hidden_weight must be"),
])
def test_a_bad_prior_block_names_its_field(change: dict, message: str) -> None:
    with pytest.raises(BlockError, match=message):
        PairPrior.from_dict({**prior_block(), **change})


def test_large_catalogs_take_the_sorting_path_with_the_same_values(monkeypatch: pytest.MonkeyPatch) -> None:
    import service.pair_features as pf

    tables = PairTables(POP, CATS, NB, SC)
    dense = pair_features(tables, np.array([5, 1, 3]), merged())
    monkeypatch.setattr(pf, "DENSE_MAX", 0)  # as for a catalog (or code space) past DENSE_MAX
    np.testing.assert_allclose(pair_features(tables, np.array([5, 1, 3]), merged()), dense, atol=1e-7)
