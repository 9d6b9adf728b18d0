"""K-fold ranking data (training/stages/prerank/folds.py, upstreams.py): every user in exactly one
fold, every training position in exactly one ranker's data, and no user's lists from a retriever
that trained on that user."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from recsys_cli import main as cli
from training.checkpoints import CheckpointError, load_retrieval, read_checkpoint
from training.data.sources import load
from training.data.splits import LeaveOneOut
from training.stages.prerank.data import Retrievers, build_next_item_data
from training.stages.prerank.folds import (
    FOLD_MAP,
    FoldMap,
    assign_folds,
    fold_dir,
    kfold_rerank_window,
    prerank_rows,
)
from training.stages.prerank.upstreams import AlignedRetriever, by_fold, load_upstreams, procrustes
from training.stages.rerank.run import open_upstream
from training.stages.rerank.sampling import ImpressionConfig, sample_steps
from training.stages.rerank.upstream import rank_candidates
from training.stages.retrieval.train import fused_top, training_pairs

TINY = "synthetic:users=120,items=80,seed=5"


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def csv(tmp_path: Path, lengths: list[int]) -> str:
    rows = [f"u{u},i{(u * 7 + t) % 40},{t}" for u, n in enumerate(lengths) for t in range(n)]
    f = tmp_path / "log.csv"
    f.write_text("\n".join(rows) + "\n")
    return f"csv:{f}"


def test_fold_assignment_puts_every_user_in_exactly_one_fold() -> None:
    fold = assign_folds(10, 3, seed=1)
    assert fold.shape == (10,) and set(fold.tolist()) == {0, 1, 2}
    assert sorted(np.bincount(fold).tolist()) == [3, 3, 4]  # sizes differ by at most one
    assert (assign_folds(10, 3, seed=1) == fold).all()  # seeded
    assert not (assign_folds(10, 3, seed=2) == fold).all()
    with pytest.raises(ValueError, match="folds >= 2, got 1"):
        assign_folds(10, 1)
    with pytest.raises(ValueError, match=r"folds \(11\) must be <= the number of users \(10\)"):
        assign_folds(10, 11)


def test_kfold_rankers_share_every_training_position(tmp_path: Path) -> None:
    """Pre-rank targets [1, n - R) and re-rank steps [n - R, n): each training position with a
    history is in exactly one of them, for long and short users alike."""
    ds = load(csv(tmp_path, [12, 9, 5, 4, 3, 2] * 6))
    loo = LeaveOneOut(ds)
    n = loo.full_train_lengths()
    pos = np.arange(ds.num_interactions) - ds.offsets[ds.users]
    rows = prerank_rows(loo, 0, kfold=True)
    pre = [(int(u), int(p)) for u, p in zip(ds.users[rows], pos[rows])]
    first, end = kfold_rerank_window(loo)
    rerank = [(u, t) for u in range(ds.num_users) for t in range(int(first[u]), int(end[u]))]
    assert not set(pre) & set(rerank)
    assert sorted(pre + rerank) == [(u, p) for u in range(ds.num_users) for p in range(1, int(n[u]))]
    assert first[:6].tolist() == [5, 2, 2, 2, 1, 2] and end[:6].tolist() == [10, 7, 3, 2, 1, 2]
    # the re-ranker's impression steps are exactly its window's (split by user into train / valid / test)
    steps = sample_steps(loo, ImpressionConfig(folds=3, valid_frac=0.5, seed=0))
    got = sorted((int(u), int(t)) for st in steps.values() for u, t in zip(st.users, st.steps))
    assert got == sorted(rerank)
    with pytest.raises(ValueError, match="folds must be >= 0 and exclude a holdout"):
        ImpressionConfig(folds=3, holdout=2)


def test_a_fold_split_trains_on_no_interaction_of_its_users(tmp_path: Path) -> None:
    ds = load(csv(tmp_path, [12, 9, 5, 4, 3, 2]))
    fmap = FoldMap.assign(ds, 3, seed=0)
    full = LeaveOneOut(ds)
    seen = np.zeros(ds.num_users, dtype=int)
    for k in range(3):
        split = fmap.split(ds, k)
        mine = fmap.fold_of_user == k
        assert not split.train_mask[mine[ds.users]].any()
        assert (split.train_mask[~mine[ds.users]] == full.train_mask[~mine[ds.users]]).all()
        seqs, full_seqs = split.train_sequences(20), full.train_sequences(20)  # left-padded to the longest
        seqs = np.pad(seqs, ((0, 0), (full_seqs.shape[1] - seqs.shape[1], 0)))
        assert (seqs[mine] == 0).all() and (seqs[~mine] == full_seqs[~mine]).all()
        inputs, _ = training_pairs(split, maxlen=20)  # what the retriever's loss sees
        assert inputs.shape[0] == int(((full_seqs[~mine] != 0).sum(axis=1) >= 2).sum())
        assert (split.targets("valid") == full.targets("valid")).all()  # evaluation targets unchanged
        seen += mine
    assert (seen == 1).all()


def test_procrustes_recovers_a_rotation_and_keeps_scores() -> None:
    rng = np.random.default_rng(0)
    target = rng.normal(size=(50, 8)).astype(np.float32)
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    source = target @ q.T.astype(np.float32)  # another basis of the same table
    R = procrustes(source, target)
    np.testing.assert_allclose(source @ R, target, atol=1e-4)
    np.testing.assert_allclose(R @ R.T, np.eye(8), atol=1e-5)


@dataclass
class Rows:
    a: np.ndarray
    b: np.ndarray


def test_by_fold_reassembles_rows_in_their_order() -> None:
    fold = np.array([2, 0, 1, 0, 2, 2])
    calls: list[int] = []

    def make(k: int, sel: np.ndarray) -> Rows:
        calls.append(k)
        return Rows(sel * 10 + k, np.stack([sel, np.full(sel.size, k)], axis=1))

    out = by_fold(fold, 4, make)
    assert calls == [0, 1, 2]  # fold 3 has no rows: not called
    assert out.a.tolist() == [2, 10, 21, 30, 42, 52]
    assert out.b[:, 1].tolist() == fold.tolist() and out.b[:, 0].tolist() == list(range(6))


@pytest.fixture(scope="module")
def fold_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`recsys train retrieval --folds 3`, a served retriever, a pre-ranker on the fold lists."""
    root = tmp_path_factory.mktemp("kfold")
    common = ["--data", TINY, "--threads", "1"]
    small = ["--dim", "16", "--blocks", "1", "--maxlen", "20", "--epochs", "2", "--quiet"]
    steps = [
        ["train", "retrieval", *common, *small, "--folds", "3", "--seed", "4", "--out", str(root / "up")],
        ["train", "retrieval", *common, *small, "--init-from", str(root / "up" / "fold-0"), "--out", str(root / "ret")],
        ["train", "prerank", *common, "--objective", "next-item", "--retrieval", str(root / "ret"), "--upstream",
         str(root / "up"), "--epochs", "1", "--hidden", "16,8", "--heads", "2", "--head-dim", "4", "--embed-dim", "8",
         "--history-len", "10", "--candidates", "30", "--out", str(root / "pre")],
    ]
    for step in steps:
        assert cli.main(step) == 0, step
    return root


def test_no_users_lists_come_from_a_retriever_that_trained_on_them(fold_set: Path) -> None:
    ds = load(TINY)
    fmap = json.loads((fold_set / "up" / FOLD_MAP).read_text())
    assert fmap["folds"] == 3 and set(fmap["users"]) == set(ds.user_ids.tolist())
    for k in range(3):  # what each checkpoint says it never trained on is its fold in the map
        extra = read_checkpoint(fold_dir(fold_set / "up", k) / "checkpoint.pt").extra
        assert extra["fold"] == k and extra["ranking_data"] == "kfold"
        assert set(extra["held_out_users"]) == {u for u, f in fmap["users"].items() if f == k}
    served, _ = load_retrieval(fold_set / "ret", ds)
    ups = load_upstreams(fold_set / "up", ds, TINY, served)
    assert ups.ranking == "kfold" and ups.folds == 3 and len(ups.residual) == 3
    for u, uid in enumerate(ds.user_ids):  # the model that makes u's lists held u out
        assert str(uid) in ups.held_out[int(ups.fold_of_user[u])]
    # the pre-ranker's training lists: each row's from its user's fold retriever (aligned = same lists)
    loo = LeaveOneOut(ds)
    rets = Retrievers(served, served, fold_set=ups, pair=False)
    rows = rets.rows(loo)
    assert (rows == prerank_rows(loo, 0, kfold=True)).all()
    top = rets.training_lists(ds, rows[:40], 30)
    for j, r in enumerate(rows[:40]):
        model = ups.models[int(ups.fold_of_user[ds.users[r]])]
        assert isinstance(model, AlignedRetriever)
        hist = ds.items[ds.offsets[ds.users[r]]:r][None, :]
        own = fused_top(model.inner, hist, 30)
        assert (top.items[j] == own.items[0]).all()  # the rotation keeps the fold's own scores and list
        np.testing.assert_allclose(top.scores[j], own.scores[0], rtol=1e-4, atol=1e-4)
    data = build_next_item_data(ds, loo, None, 10, 30, retrievers=Retrievers(served, served, fold_set=ups, pair=False))
    assert data.train_targets.size == rows.size
    pre = read_checkpoint(fold_set / "pre" / "prerank.pt").extra["retrieval"]
    assert pre["ranking_data"] == "kfold" and pre["folds"] == 3 and pre["train_examples"] == rows.size


def test_rerank_lists_come_from_each_users_fold(fold_set: Path) -> None:
    up = open_upstream(TINY, fold_set / "ret", fold_set / "pre", fold_set / "up")
    assert up.folds is not None and len(up.folds.pipes) == 3
    cfg = up.impression_config(ImpressionConfig(list_len=10, candidates=30))
    assert cfg.folds == 3 and cfg.holdout == 0
    users = np.arange(12)
    ends = up.ds.offsets[users] + 2
    ranked = up.folds.rank(users, ends, cfg)
    for j, u in enumerate(users):
        pipe = up.folds.pipes[int(up.folds.fold_of_user[u])]
        own = rank_candidates(pipe, users[j:j + 1], ends[j:j + 1], cfg)
        assert (ranked.items[j] == own.items[0]).all()


def test_a_fold_map_that_disagrees_with_a_checkpoint_is_refused(fold_set: Path, tmp_path: Path) -> None:
    import shutil

    ds = load(TINY)
    bad = tmp_path / "up"
    shutil.copytree(fold_set / "up", bad)
    raw = json.loads((bad / FOLD_MAP).read_text())
    uid = next(iter(raw["users"]))
    raw["users"][uid] = (raw["users"][uid] + 1) % 3  # move one user to a fold whose retriever trained on them
    (bad / FOLD_MAP).write_text(json.dumps(raw))
    served, _ = load_retrieval(fold_set / "ret", ds)
    with pytest.raises(CheckpointError, match="not fold"):
        load_upstreams(bad, ds, TINY, served)


def test_the_tail_holdout_follows_the_users_and_their_lengths() -> None:
    """tail_holdout: at least TAIL_HOLDOUT; enough positions for about TAIL_LISTS lists when few
    users have long histories; never more than TAIL_SHARE of the median user's training length."""
    from training.stages.prerank.folds import TAIL_HOLDOUT, TAIL_LISTS, TAIL_SHARE, tail_holdout

    many_short = LeaveOneOut(load("synthetic:users=2000,items=100,seed=0"))
    assert tail_holdout(many_short) == TAIL_HOLDOUT
    few_long = LeaveOneOut(load("synthetic:users=100,items=200,mean_len=100,min_len=80,seed=0"))
    n = few_long.full_train_lengths()
    want = min(math.ceil(TAIL_LISTS / 100), math.floor(TAIL_SHARE * float(np.median(n))))
    assert want > TAIL_HOLDOUT and tail_holdout(few_long) == want
