"""service/contract/features.py: the one encoder of raw fields, run by training and by the service."""

from __future__ import annotations

import numpy as np
import pytest

from service.contract.features import OOV, PAD, TowerEncoder, UserFeatures, encode_codes, fit_width

# raw item 1 -> code 2, raw 2 -> 3, raw 3 -> OOV (never seen in training), raw 4 -> 4
TABLE = [1, 2, 3, 1, 4]
SPEC = {
    "history_len": 3,
    "user": {
        "sparse": {"last_item": TABLE, "user_id": [1, 2]},
        "multi": {"history": {"table": TABLE, "width": 3}},
        "dense": {"user_log_count": [1.0, 0.5], "age": [30.0, 10.0],
                  "retrieval_user:0": [0.5, 2.0], "retrieval_user:3": [-1.0, 4.0]},
    },
    "item": {"sparse": {}, "multi": {}, "dense": {}},
}


def test_codes_padding_and_out_of_vocabulary() -> None:
    table = np.array(TABLE)
    raw = np.array([0, 1, 2, 3, 4, 99, -5])
    assert encode_codes(table, raw, zero_is_padding=True).tolist() == [PAD, 2, 3, OOV, 4, OOV, OOV]
    assert encode_codes(table, raw, zero_is_padding=False).tolist() == [OOV, 2, 3, OOV, 4, OOV, OOV]
    assert fit_width(np.array([[1, 2, 3, 4]]), 2).tolist() == [[3, 4]]  # the latest kept
    assert fit_width(np.array([[1]]), 3).tolist() == [[1, 0, 0]]


def test_tower_encoder_golden_values() -> None:
    enc = TowerEncoder.from_dict(SPEC["user"])
    raw = {"last_item": np.array([2, 0]), "user_id": np.array([1, 7]), "history": np.array([[0, 1, 2], [4, 4, 3]]),
           "user_log_count": np.array([2.0, 1.0]), "age": np.array([50.0, 30.0]),
           "retrieval_user:0": np.array([0.5, 4.5], np.float32), "retrieval_user:3": np.array([3.0, -1.0])}
    sparse, dense, multi = enc.encode(raw)
    assert sparse.tolist() == [[3, 2], [OOV, OOV]]
    assert multi.tolist() == [[PAD, 2, 3], [4, 4, OOV]]
    np.testing.assert_array_equal(dense, np.array([[2.0, 2.0, 0.0, 1.0], [0.0, 0.0, 2.0, 0.0]], np.float32))
    assert dense.dtype == np.float32
    with pytest.raises(KeyError, match="feature 'age' is declared but missing"):
        enc.encode({k: v for k, v in raw.items() if k != "age"})


def test_user_features_of_a_request() -> None:
    """What a request gives: history and the retriever's vectors; user_id and profile unknown."""
    uf = UserFeatures(SPEC)
    vectors = np.array([[0.5, 9.0], [9.0, 3.0]], np.float32)  # (M, D) = (2, 2), flattened: 0.5, 9, 9, 3
    feeds = uf.feeds(np.array([4, 1, 2, 3]), vectors)
    assert feeds["user_sparse"].tolist() == [[OOV, OOV]]  # last item raw 3 is out of vocabulary; user_id unknown
    assert feeds["user_multi"].tolist() == [[2, 3, OOV]]  # the last 3, left-padded, latest last
    want = [(np.log1p(4) - 1.0) / 0.5, 0.0, 0.0, 1.0]  # age at its mean; (0.5 - 0.5) / 2; (3 + 1) / 4
    np.testing.assert_allclose(feeds["user_dense"], [want], rtol=1e-6)
    short = uf.feeds(np.array([2]), vectors)
    assert short["user_sparse"].tolist() == [[3, OOV]] and short["user_multi"].tolist() == [[PAD, PAD, 3]]
    with pytest.raises(ValueError, match="reads 2 retrieval_user numbers"):
        uf.feeds(np.array([2]), None)


def test_training_encodes_with_the_same_encoder() -> None:
    from training.data.features import FeatureSpec

    spec = FeatureSpec.from_dict(SPEC)
    hist = np.array([1, 2, 3])
    vectors = np.array([[0.25, 1.0], [2.0, -3.0]], np.float32)
    raw = {"last_item": hist[-1:], "user_id": np.zeros(1, np.int64), "history": hist[None],
           "user_log_count": np.log1p([hist.size]), "age": np.array([30.0]),
           "retrieval_user:0": vectors.reshape(-1)[:1], "retrieval_user:3": vectors.reshape(-1)[3:]}
    got = UserFeatures(SPEC).feeds(hist, vectors)
    want = spec.user.encode(raw)
    np.testing.assert_array_equal(got["user_sparse"], want.sparse)
    np.testing.assert_array_equal(got["user_multi"], want.multi)
    np.testing.assert_array_equal(got["user_dense"], want.dense)  # bit for bit: one encoder

