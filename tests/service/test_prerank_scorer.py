"""Serving-side pre-ranking: NumPy scorer by hand, and parity of
onnxruntime(user part) + NumPy(precomputed item heads) with the eager PyTorch model."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from service.prerank import score_candidates, top_n
from training.stages.prerank import train as pr
from training.publish.onnx.prerank import export_prerank
from training.stages.prerank.data import build_ctr_data
from training.data.sources import load
from training.data.splits import CTRSplit

ROOT = Path(__file__).resolve().parents[2]


def test_score_candidates_hand_case() -> None:
    user = np.array([[[1.0, 0.0], [0.0, 2.0]], [[1.0, 1.0], [0.0, 0.0]]], dtype=np.float32)  # (L=2, H=2, d=2)
    items = np.zeros((4, 2, 2), dtype=np.float32)  # (N + 1, G=2, d)
    items[1] = [[3.0, 1.0], [-1.0, 4.0]]
    items[3] = [[0.0, -1.0], [-2.0, 0.0]]
    # item 1: layer 1 -> max(3,-1) + max(2,8) = 11; layer 2 -> max(4,3) + max(0,0) = 4
    # item 3: layer 1 -> max(0,-2) + max(-2,0) = 0; layer 2 -> max(-1,-2) + 0 = -1
    s = score_candidates(user, items, np.array([1, 3, 1]))
    assert s.dtype == np.float32 and s.tolist() == [15.0, -1.0, 15.0]
    best, scores = top_n(s, np.array([1, 3, 1]), 2)
    assert best.tolist() == [1, 1] and scores.tolist() == [15.0, 15.0]


def test_score_candidates_rejects_bad_input() -> None:
    user = np.zeros((1, 2, 4), dtype=np.float32)
    items = np.zeros((5, 2, 4), dtype=np.float32)
    with pytest.raises(ValueError, match=r"candidate indices must be in \[0, 5\), got 1..5"):
        score_candidates(user, items, np.array([1, 5]))
    with pytest.raises(ValueError, match="head dims differ: user 4 vs item 3"):
        score_candidates(user, np.zeros((5, 2, 3), dtype=np.float32), np.array([1]))
    with pytest.raises(ValueError, match="expected user_heads"):
        score_candidates(user[0], items, np.array([1]))


def test_service_module_does_not_import_torch() -> None:
    tree = ast.parse((ROOT / "service" / "prerank.py").read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "torch" not in names and "numpy" in names


@pytest.mark.parametrize("name", ["inttower", "two-tower"])
def test_onnx_user_part_plus_numpy_items_matches_eager_torch(name: str, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    ds = load("synthetic:users=150,items=120,seed=1")
    data = build_ctr_data(ds, CTRSplit(ds), history_len=10)
    torch.manual_seed(0)
    model = pr.build_model(name, data.spec, hidden=(32, 16), heads=3, head_dim=8).eval()
    paths = export_prerank(model, data.spec, data.catalog, tmp_path)
    items = np.load(paths["items"])
    sess = ort.InferenceSession(paths["user_onnx"], providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["user_sparse", "user_dense", "user_multi"]
    assert [o.name for o in sess.get_outputs()] == ["user_heads"]

    rows = np.arange(0, len(data.test), max(1, len(data.test) // 7))[:7]  # 7 users, a batch size never exported
    user = data.test.user.take(rows)
    (heads,) = sess.run(None, {"user_sparse": user.sparse, "user_dense": user.dense, "user_multi": user.multi})
    assert heads.dtype == np.float32 and heads.shape[0] == rows.size
    rng = np.random.default_rng(0)
    cands = rng.integers(1, ds.num_items + 1, size=(rows.size, 40))
    served = np.stack([score_candidates(heads[b], items, cands[b]) for b in range(rows.size)])

    with torch.no_grad():
        rep = np.repeat(np.arange(rows.size), 40)
        eager = model(pr.to_fields(user, rep), pr.to_fields(data.catalog, cands.ravel())).view(rows.size, 40).numpy()
    # float32 end to end; ORT and torch pick different GEMM kernels and summation orders, so
    # results agree to a few float32 ulps of the accumulated magnitude (sums of ~100 products),
    # ~1e-6 relative; 1e-4 relative / 1e-5 absolute leaves margin without hiding a real
    # mismatch (a wrong head, layer or max axis moves scores by far more).
    np.testing.assert_allclose(served, eager, rtol=1e-4, atol=1e-5)
    assert np.std(eager) > 1e-3  # the comparison is not between near-constant scores


def test_export_leaves_the_model_in_eval_mode(tmp_path: Path) -> None:
    ds = load("synthetic:users=60,items=40,seed=2")
    data = build_ctr_data(ds, CTRSplit(ds), history_len=5)
    model = pr.build_model("inttower", data.spec, hidden=(8,), heads=2, head_dim=4).eval()
    export_prerank(model, data.spec, data.catalog, tmp_path)
    assert not any(m.training for m in model.modules())  # dropout off: exported == served


def test_head_interactions_are_the_per_head_maxima_summed_by_the_score() -> None:
    from service.prerank import head_interactions

    rng = np.random.default_rng(0)
    user = rng.normal(size=(3, 4, 5)).astype(np.float32)  # (L, H, d)
    items = rng.normal(size=(7, 2, 5)).astype(np.float32)  # (N + 1, G, d)
    cand = np.array([2, 6, 1])
    pv = head_interactions(user, items, cand)
    want = np.einsum("cgd,lhd->clhg", items[cand], user).max(axis=3).reshape(3, -1)
    np.testing.assert_allclose(pv, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(score_candidates(user, items, cand), pv.sum(axis=1), rtol=1e-6)
