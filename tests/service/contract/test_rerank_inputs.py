"""The re-ranker's inputs (service/contract/rerank_inputs.py): one formula for training and serving."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from service.contract.rerank_inputs import PVStats, RerankServing, list_zscore, rerank_item_features

# rerank_manifest.json as `recsys train rerank` wrote it before the typed block (fig_before run)
WRITTEN = {
    "model": "PRM", "onnx": "rerank.onnx", "item_features": "rerank_items.npy",
    "item_feats": "rerank_items.npy[item] (N + 1, F): [retrieval embedding ; mean pre-rank item head ; log1p count], "
                  "z-scored over the catalog; row 0 = padding",
    "pv": "(pre-rank per (layer, user head) max over item heads of the dot product - pv_mean) / pv_std",
    "pv_mean": [0.050554368644952774, 0.13507303595542908], "pv_std": [0.03780806064605713, 0.0915030762553215],
    "init_score": "pre-rank score z-scored within the list (real entries); (1, n, 2) with the fused retrieval "
                  "score z-scored the same way as [..., 1]",
    "num_scores": 2, "upstream": "/work/fig_before/upstream", "holdout": 6, "list_len": 30,
    "config": {"item_dim": 81, "pv_dim": 2, "d_model": 64, "heads": 2, "layers": 2, "ffn_dim": 128, "dropout": 0.1,
               "max_len": 30, "use_position": True, "num_scores": 2, "residual": True},
}


def test_the_serving_block_writes_exactly_the_json_training_wrote() -> None:
    text = json.dumps(WRITTEN, indent=2) + "\n"
    block = RerankServing.from_dict(json.loads(text))
    assert block.to_json() == text
    assert block.pv.mean == tuple(WRITTEN["pv_mean"]) and block.num_scores == 2 and block.holdout == 6
    one = RerankServing(PVStats((0.0,), (1.0,)), list_len=8)
    assert one.to_dict()["init_score"] == "pre-rank score z-scored within the list (real entries)"


def test_an_older_block_loads_with_the_defaults_of_its_time() -> None:
    old = {"model": "PRM", "list_len": 8, "pv_mean": [0.0], "pv_std": [1.0], "config": {"max_len": 8}}
    block = RerankServing.from_dict(old)
    assert (block.num_scores, block.upstream, block.holdout, block.list_len) == (1, None, 0, 8)


@pytest.mark.parametrize(("block", "message"), [
    ({"pv_std": [1.0]}, "rerank serving block.pv_mean must be a list of numbers, got None"),
    ({"pv_mean": [0.0, 1.0], "pv_std": [1.0]}, "rerank serving block is invalid: pv mean and std differ in length: 2 != 1"),
    ({"pv_mean": [0.0], "pv_std": [0.0]}, "rerank serving block is invalid: pv std must be > 0, got 0.0"),
    ({"pv_mean": [0.0], "pv_std": [1.0], "num_scores": 3}, "rerank serving block is invalid: num_scores must be 1 or 2, got 3"),
])
def test_bad_blocks_are_refused_naming_the_field(block: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        RerankServing.from_dict(block)
    assert str(err.value) == message


def test_pv_statistics_fit_on_real_entries_and_normalize_in_float32() -> None:
    pv = np.array([[[1.0, 5.0], [3.0, 5.0], [100.0, 100.0]]], np.float32)  # (B, L, P), the last entry padding
    stats = PVStats.fit(pv, np.array([[True, True, False]]))
    assert stats.mean == (2.0, 5.0) and stats.std == (1.0, 1.0)  # a constant column is centred, not scaled
    z = stats.normalize(pv[:, :2])
    assert z.dtype == np.float32
    np.testing.assert_array_equal(z, [[[-1.0, 0.0], [1.0, 0.0]]])


def test_list_zscore() -> None:
    z = list_zscore(np.array([[1.0, 2.0, 3.0, 100.0], [5.0, 5.0, 0.0, 0.0]]),
                    np.array([[True, True, True, False], [True, True, False, False]]))
    np.testing.assert_allclose(z, [[-np.sqrt(1.5), 0.0, np.sqrt(1.5), 0.0], [0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(list_zscore(np.array([1.0, 3.0])), [-1.0, 1.0])


def test_item_features_are_z_scored_over_the_catalog_or_a_reference() -> None:
    rng = np.random.default_rng(0)
    table, heads, cnt = rng.normal(size=(6, 3)), rng.normal(size=(6, 2, 4)), rng.random(6)
    feats = rerank_item_features(table, heads, cnt)
    assert feats.shape == (6, 3 + 4 + 1) and feats.dtype == np.float32 and not feats[0].any()  # row 0: padding
    np.testing.assert_allclose(feats[1:].mean(axis=0), 0.0, atol=1e-6)
    np.testing.assert_allclose(feats[1:].std(axis=0), 1.0, atol=1e-5)
    np.testing.assert_allclose(feats[1:, 3:7], ((heads.mean(axis=1) - heads[1:].mean(axis=1).mean(axis=0))
                                                / heads[1:].mean(axis=1).std(axis=0))[1:], rtol=1e-5)
    grown = rerank_item_features(np.vstack([table, table[1:2]]), np.vstack([heads, heads[1:2]]),
                                 np.append(cnt, cnt[1]), reference=(table, heads, cnt))
    np.testing.assert_array_equal(grown[:6], feats)  # a grown catalog keeps the trained items' features
    np.testing.assert_array_equal(grown[6], feats[1])


def test_the_contract_imports_no_torch_and_no_training() -> None:
    code = ("import sys, service.contract.rerank_inputs; "
            "print(any(m == 'torch' or m.startswith('training') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
