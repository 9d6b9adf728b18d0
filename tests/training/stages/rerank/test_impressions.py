"""Impressions from the pipeline (training/stages/rerank/impressions.py).

Tiny randomly initialised retrieval / pre-rank checkpoints: the tests check the list
construction (shape, pre-rank order, no history item, labels from training rows within the
horizon), not model quality.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.sasrec import MultiLauncherSASRec, SASRecConfig
from training.stages.prerank import train as pr
from training.stages.rerank import impressions as im
from training.stages.rerank.sampling import ImpressionConfig, Steps, click_labels
from training.stages.rerank.upstream import Pipeline
from training.stages.prerank.data import build_next_item_data
from training.stages.retrieval import train as rt
from training.eval.baselines import LastItem
from training.data.sources import load
from training.data.splits import LeaveOneOut

TINY = "synthetic:users=120,items=80,seed=0"


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def make_checkpoints(spec: str, root: Path) -> tuple[Path, Path]:
    """Random-init SASRec and IntTower checkpoints over `spec` (the pre-ranker's feature spec is
    fitted on the training rows as `recsys train prerank` does)."""
    ds = load(spec)
    loo = LeaveOneOut(ds)
    torch.manual_seed(0)
    sasrec = MultiLauncherSASRec(SASRecConfig(num_items=ds.num_items, maxlen=20, dim=16, num_blocks=1))
    rt.save_checkpoint(root / "ret", sasrec, ds, spec, {})
    scorers = {"valid": LastItem(loo, "valid"), "test": LastItem(loo, "test")}
    data = build_next_item_data(ds, loo, scorers, history_len=10, candidates=5, max_train_examples=20)
    tower = pr.build_model("inttower", data.spec, hidden=(16, 8), heads=2, head_dim=4, embed_dim=8)
    pr.save_checkpoint(tower, "inttower", data.spec, root / "pre", ds.fingerprint, objective="next-item")
    return root / "ret", root / "pre"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Pipeline, LeaveOneOut, Path, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    ret, pre = make_checkpoints(TINY, root)
    ds = load(TINY)
    loo = LeaveOneOut(ds)
    return Pipeline.load(ds, loo, ret, pre), loo, ret, pre


def write_seqtxt(path: Path, n_users: int, length: int, n_items: int) -> None:
    """Users walk the catalog without repeating an item: user u sees (u + j) % n_items + 1."""
    lines = [" ".join([f"u{u}", *(f"i{(u + j) % n_items}" for j in range(length))]) for u in range(n_users)]
    path.write_text("\n".join(lines) + "\n")


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="list_len must be in \\[1, 100\\], got 101"):
        ImpressionConfig(list_len=101)
    with pytest.raises(ValueError, match="candidates \\(20\\) must be >= list_len \\(30\\)"):
        ImpressionConfig(candidates=20)
    with pytest.raises(ValueError, match="horizon must be >= 1, got 0"):
        ImpressionConfig(horizon=0)


def test_lists_have_the_shape_and_pre_rank_order(tiny) -> None:
    pipe, loo, _, _ = tiny
    cfg = ImpressionConfig(list_len=10, candidates=30, horizon=3, lists_per_user=4, eval_steps=2)
    imp = im.build_impressions(pipe, loo, cfg)
    ds = pipe.dataset
    P = pipe.prerank.cfg.heads * len(pipe.prerank.cfg.hidden)
    for name in ("train", "valid", "test"):
        d = getattr(imp, name)
        B = len(imp.steps[name])
        assert B > 0
        assert d.item_feats.shape == (B, 10, pipe.item_feats.shape[1])
        assert d.pv.shape == (B, 10, P) and d.init_score.shape == d.labels.shape == d.mask.shape == (B, 10)
        assert d.mask.all()  # 80 items, short histories: always 10 real candidates
        # pre-rank order: the per-list z-score keeps the order, so it is non-increasing
        assert (np.diff(d.init_score, axis=1) <= 1e-6).all()
        # and it is the IntTower score: the sum of the PV (before its z-scoring) orders the same way
        raw_pv = d.pv * np.asarray(imp.pv_stats.std) + np.asarray(imp.pv_stats.mean)
        assert (np.diff(raw_pv.sum(axis=2), axis=1) <= 1e-4).all()
        # no list holds an item of the user's history
        st = imp.steps[name]
        for u, end, row in zip(st.users, st.ends(ds), imp.items[name]):
            assert not set(row.tolist()) & set(ds.items[ds.offsets[u] : end].tolist())
    # training steps, valid and test users are as the module doc says
    n = loo.train_lengths()
    tr, va, te = imp.steps["train"], imp.steps["valid"], imp.steps["test"]
    assert not set(va.users.tolist()) & set(te.users.tolist())
    first_eval = {}
    for st in (va, te):
        assert (st.steps + cfg.horizon <= n[st.users]).all()
        for u, s in zip(st.users, st.steps):
            first_eval[u] = min(first_eval.get(u, s), s)
    for u, t in zip(tr.users, tr.steps):
        assert t >= 1 and t + cfg.horizon <= first_eval.get(u, n[u])
    assert np.bincount(tr.users).max() <= cfg.lists_per_user


def test_clicks_come_from_training_rows_within_the_horizon(tmp_path: Path) -> None:
    # 12 users x 16 distinct items over a 20-item catalog: with C = N = 20 every unseen item is in
    # every list, so each user's validation and test items are always candidates. They must
    # never be clicks; the item at horizon T is a click, the one at T + 1 is not.
    data = tmp_path / "walk.txt"
    write_seqtxt(data, n_users=12, length=16, n_items=20)
    spec = f"seqtxt:{data}"
    ret, pre = make_checkpoints(spec, tmp_path)
    ds = load(spec)
    loo = LeaveOneOut(ds)
    pipe = Pipeline.load(ds, loo, ret, pre)
    T = 3
    cfg = ImpressionConfig(list_len=20, candidates=20, horizon=T, lists_per_user=20, eval_steps=2)
    imp = im.build_impressions(pipe, loo, cfg)
    held_out = {(u, ds.items[r]) for u in range(ds.num_users) for r in (ds.offsets[u + 1] - 2, ds.offsets[u + 1] - 1)}
    n_lists = 0
    for name in ("train", "valid", "test"):
        d, st = getattr(imp, name), imp.steps[name]
        for b, (u, end) in enumerate(zip(st.users, st.ends(ds))):
            row, lab = imp.items[name][b], getattr(imp, name).labels[b]
            assert d.mask[b].sum() == 20 - (end - ds.offsets[u])  # every unseen item is a candidate
            clicked = {int(i) for i in row[lab > 0]}
            assert clicked == {int(ds.items[end + j]) for j in range(T)}  # exactly the next T items
            assert int(ds.items[end + T]) in row.tolist() or end + T >= ds.offsets[u + 1]
            assert not any((u, i) in held_out for i in clicked)
            n_lists += 1
            held_in_list = [i for i in row.tolist() if (u, i) in held_out]
            assert len(held_in_list) == 2  # both held-out items are shown, and never clicked
    assert n_lists == sum(len(s) for s in imp.steps.values())
    # shorter windows cut at the end of the training part, never past it
    st = Steps(np.array([0]), np.array([loo.train_lengths()[0] - 1]))
    lab = click_labels(ds, loo, st, np.array([[ds.items[ds.offsets[0] + 15], ds.items[ds.offsets[0] + 13]]]), T)
    np.testing.assert_array_equal(lab, [[0.0, 1.0]])  # the test item (row 15) is no click; row 13 is
