"""Cascade-aware rankers: the ranking fold, the retrieval prior, and the served path computing
exactly what training computed from the same inputs (fused score, launcher, retriever vectors)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.cascade import RetrievalPrior, RetrievalPriorConfig
from models.prm import PRM, PointwiseMLP, PRMConfig
from service.artifacts import load_current
from service.pipeline import Recommender
from recsys_cli import main as cli
from training.checkpoints import read_checkpoint
from training.stages.rerank.sampling import ImpressionConfig
from training.stages.rerank.upstream import Pipeline, rank_candidates
from training.stages.rerank import models as rr
from training.data.sources import load
from training.data.splits import LeaveOneOut
from training.publish.onnx.rerank import export_rerank, rerank_parity
from training.stages.prerank.folds import prerank_rows, rerank_window

TINY = "synthetic:users=150,items=90,seed=3"


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def csv(tmp_path: Path, rows: list[str]) -> str:
    f = tmp_path / "log.csv"
    f.write_text("\n".join(rows) + "\n")
    return f"csv:{f}"


def test_holdout_leaves_each_users_last_training_items_out(tmp_path: Path) -> None:
    # u1: 10 items -> leave-one-out training part = 8 (positions 0..7); u2: 4 items -> 2
    rows = [f"u1,i{t},{t}" for t in range(10)] + [f"u2,j{t},{t}" for t in range(4)]
    ds = load(csv(tmp_path, rows))
    full, fold = LeaveOneOut(ds), LeaveOneOut(ds, holdout=3)
    assert full.train_lengths().tolist() == [8, 2]
    assert fold.train_lengths().tolist() == [5, 1]  # u2 keeps one item
    assert fold.full_train_lengths().tolist() == [8, 2]
    assert fold.train_mask.sum() == 6 and full.train_mask.sum() == 10
    assert (fold.full_train_mask() == full.train_mask).all()
    # validation / test targets do not move
    assert fold.targets("test").tolist() == full.targets("test").tolist()
    assert fold.targets("valid").tolist() == full.targets("valid").tolist()
    with pytest.raises(ValueError, match="holdout must be >= 0, got -1"):
        LeaveOneOut(ds, holdout=-1)


def test_ranking_windows_split_the_holdout_between_the_rankers(tmp_path: Path) -> None:
    rows = [f"u1,i{t},{t}" for t in range(10)] + [f"u2,j{t},{t}" for t in range(5)]
    ds = load(csv(tmp_path, rows))
    loo = LeaveOneOut(ds)  # training lengths 8 and 3
    pos = np.arange(ds.num_interactions) - ds.offsets[ds.users]
    # H = 4: the fold retriever trains on [0, n - 4); pre-rank targets [n - 4, n - 2); re-rank steps [n - 2, n)
    rows4 = prerank_rows(loo, 4)
    assert list(zip(ds.users[rows4].tolist(), pos[rows4].tolist())) == [(0, 4), (0, 5), (1, 1), (1, 2)]
    first, end = rerank_window(loo, 4)
    assert first.tolist() == [6, 3] and end.tolist() == [8, 3]  # u2's window is empty
    # H = 0: every training row with a history (in-sample lists)
    rows0 = prerank_rows(loo, 0)
    assert sorted(pos[rows0].tolist()) == sorted(list(range(1, 8)) + [1, 2])


def test_retrieval_prior_starts_at_the_retrieval_order() -> None:
    prior = RetrievalPrior(RetrievalPriorConfig(num_launchers=3))
    r = torch.tensor([[0.3, 2.0, -1.0, 0.9]])
    launcher = torch.tensor([[0, 2, 1, 1]])
    tower = torch.tensor([[5.0, -3.0, 9.0, 0.0]])  # whatever the untrained tower says
    s = prior(tower, r, launcher)
    assert torch.equal(torch.argsort(s, descending=True), torch.argsort(r, descending=True))
    assert prior.serving() == {"tower_weight": 0.0, "weight": 1.0, "launcher_bias": [0.0, 0.0, 0.0]}
    with torch.no_grad():
        prior.tower_weight.fill_(0.5)
        prior.launcher_bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
    torch.testing.assert_close(prior(tower, r, launcher), 0.5 * tower + r + torch.tensor([[0.0, -1.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="num_launchers must be >= 1, got 0"):
        RetrievalPriorConfig(num_launchers=0)


def test_prm_with_two_scores_exports_with_parity(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = PRM(PRMConfig(item_dim=5, pv_dim=3, d_model=8, heads=2, layers=1, ffn_dim=16, max_len=12, num_scores=2,
                          residual=True))
    assert model.config.input_dim == 5 + 3 + 2
    path = export_rerank(model, tmp_path)
    assert rerank_parity(model, path) < 1e-4


@pytest.mark.parametrize("name", ["prm", "mlp"])
def test_residual_rerankers_start_at_the_pre_rank_order(name: str) -> None:
    torch.manual_seed(0)
    cfg = rr.reranker_config(name, 4, 2, 10, rr.RerankerHParams(d_model=8, heads=2), num_scores=2, residual=True)
    model = PRM(cfg) if name == "prm" else PointwiseMLP(cfg)
    model.eval()
    B, L = 3, 10
    pre = torch.randn(B, L)
    scores = torch.stack([pre, torch.randn(B, L)], dim=-1)  # [pre-rank, retrieval]
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[2, 7:] = False
    with torch.no_grad():
        out = model(torch.randn(B, L, 4), torch.randn(B, L, 2), scores, mask)
    torch.testing.assert_close(out[mask], pre[mask])  # the untrained re-ranker IS the pre-rank order
    assert (out[~mask] == -1e9).all()


@pytest.fixture(scope="module")
def fold_version(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The documented recipe on tiny data: fold retriever -> continued retriever -> cascade
    pre-ranker -> re-ranker with both scores -> export."""
    root = tmp_path_factory.mktemp("fold")
    common = ["--data", TINY, "--threads", "1"]
    small = ["--dim", "16", "--blocks", "1", "--maxlen", "20", "--epochs", "3", "--quiet", "--launchers", "2"]
    steps = [
        ["train", "retrieval", *common, *small, "--holdout", "4", "--out", str(root / "up")],
        ["train", "retrieval", *common, *small, "--init-from", str(root / "up"), "--out", str(root / "ret")],
        # the retrieval prior over lists of the encoder alone (the pair prior over lists merged with
        # the route: tests/training/stages/prerank/test_pair_lists.py)
        ["train", "prerank", *common, "--objective", "next-item", "--retrieval", str(root / "ret"), "--upstream",
         str(root / "up"), "--no-pair-features", "--epochs", "2", "--hidden", "16,8", "--heads", "2", "--head-dim", "4", "--embed-dim", "8",
         "--history-len", "10", "--candidates", "30", "--out", str(root / "pre")],
        ["train", "rerank", *common, "--retrieval", str(root / "ret"), "--upstream", str(root / "up"), "--prerank",
         str(root / "pre"), "--epochs", "1", "--d-model", "8", "--list-len", "10", "--candidates", "30",
         "--out", str(root / "re")],
        # without the route: the served pre-rank / re-rank inputs are compared with training's,
        # whose candidate lists come from the encoder alone
        ["export", *common, "--retrieval", str(root / "ret"), "--prerank", str(root / "pre"), "--rerank",
         str(root / "re"), "--out", str(root / "art"), "--no-item2item",
         "--allow-below-baseline"],  # a 3-epoch tiny model; about folds
    ]
    for step in steps:
        assert cli.main(step) == 0, step
    return root


def test_fold_checkpoints_record_their_scheme(fold_version: Path) -> None:
    up = read_checkpoint(fold_version / "up" / "checkpoint.pt").extra
    pre = read_checkpoint(fold_version / "pre" / "prerank.pt").extra
    assert up["holdout"] == 4
    assert pre["retrieval"]["holdout"] == 4 and pre["retrieval"]["upstream"] == str(fold_version / "up")
    assert pre["prior"]["config"] == {"num_launchers": 2}


def test_served_prerank_and_rerank_inputs_match_training(fold_version: Path) -> None:
    """The service computes the pre-rank score (towers + prior, with the retriever's vectors as
    features) and the re-ranker's two scores exactly as the torch pipeline that trained them."""
    ds = load(TINY)
    loo = LeaveOneOut(ds)
    pipe = Pipeline.load(ds, loo, fold_version / "ret", fold_version / "pre")
    assert pipe.cascade and pipe.prior is not None
    version = load_current(fold_version / "art")
    assert version.manifest.to_dict()["prerank"]["serving"]["retrieval_prior"]["launcher_bias"].__len__() == 2
    assert version.manifest.to_dict()["rerank"]["config"]["num_scores"] == 2
    rec = Recommender(version, retrieval_k=30, prerank_n=10, stages=("retrieval", "prerank"))
    full = Recommender(version, retrieval_k=30, prerank_n=10)
    cfg = ImpressionConfig(list_len=10, candidates=30)
    users, ends = loo.eval_users[:5], loo.history_end("test")[:5]
    ranked = rank_candidates(pipe, users, ends, cfg)
    for b, (u, end) in enumerate(zip(users, ends)):
        history = [str(x) for x in ds.item_ids[ds.items[ds.offsets[u]:end]]]
        out = rec.recommend(history, k=30, explain=True)
        assert out.served_by == "prerank"
        got = {it.item_id: it.stages["prerank"] for it in out.items}
        want = {str(ds.item_ids[i]): s for i, s in zip(ranked.items[b], ranked.scores[b]) if i > 0}
        assert set(got) == set(want)
        np.testing.assert_allclose([got[k] for k in want], list(want.values()), rtol=1e-4, atol=1e-4)
        # the re-ranked list is a permutation of the pre-rank top 10, then the pre-rank order
        served = full.recommend(history, k=30)
        assert served.served_by == "rerank"
        assert set(x.item_id for x in served.items[:10]) == set(x.item_id for x in out.items[:10])
        assert [x.item_id for x in served.items[10:]] == [x.item_id for x in out.items[10:]]
