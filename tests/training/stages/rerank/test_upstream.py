"""The offline scorer of retrieval + pre-rank (training/stages/rerank/upstream.py): loaded and
checked once, scoring as the two stages' own scorers do."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.training.stages.rerank.test_impressions import TINY, make_checkpoints, one_thread  # noqa: F401
from training.checkpoints import load_prerank, load_retrieval
from training.data.dataset import DataError
from training.data.features import item_columns, recent_histories, user_columns
from training.data.sources import load
from training.data.splits import LeaveOneOut
from training.eval.metrics import mask_seen
from training.stages.prerank import train as pr
from training.stages.rerank.sampling import ImpressionConfig
from training.stages.rerank.upstream import Pipeline, prerank_item_heads, rank_candidates
from training.stages.retrieval import train as rt


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Pipeline, LeaveOneOut, Path, Path]:
    ret, pre = make_checkpoints(TINY, tmp_path_factory.mktemp("ckpt"))
    ds = load(TINY)
    loo = LeaveOneOut(ds)
    return Pipeline.load(ds, loo, ret, pre), loo, ret, pre


def test_rank_candidates_matches_the_stage_scorers(tiny) -> None:
    pipe, loo, _, _ = tiny
    cfg = ImpressionConfig(list_len=5, candidates=20)
    ds = pipe.dataset
    users = loo.eval_users[:6]
    ends = loo.history_end("test")[:6]
    ranked = rank_candidates(pipe, users, ends, cfg)
    hist = loo.histories("test", np.arange(6))
    s = rt.model_scorer(pipe.retrieval)(hist).copy()
    mask_seen(s, hist)
    want = torch.topk(torch.from_numpy(s), 20, dim=1).indices.numpy()
    assert [set(r) for r in ranked.items] == [set(r) for r in want]  # same retrieval top-C
    # pre-rank scores equal pr.score_lists on the same user rows
    user = pipe.spec.user.encode({**user_columns(ds, users, recent_histories(ds, ends, pipe.spec.history_len)),
                                  "user_log_count": np.log1p(ends - ds.offsets[users])})
    raw = item_columns(ds, np.arange(ds.num_items + 1))
    raw["item_log_count"] = np.log1p(np.bincount(ds.items[loo.train_mask], minlength=ds.num_items + 1)).astype(np.float32)
    ref = pr.score_lists(pipe.prerank, user, ranked.items, pipe.spec.item.encode(raw))
    np.testing.assert_allclose(ranked.scores, ref, rtol=1e-5, atol=1e-5)


def test_from_models_equals_load_and_holds_the_catalog_heads(tiny) -> None:
    pipe, loo, ret, pre = tiny
    ds = pipe.dataset
    retrieval, _ = load_retrieval(ret, ds)
    tower, spec, ckpt = load_prerank(pre, ds)
    again = Pipeline.from_models(ds, loo, retrieval, tower, spec, ckpt)
    torch.testing.assert_close(again.item_heads, pipe.item_heads, rtol=0, atol=0)
    np.testing.assert_array_equal(again.item_feats, pipe.item_feats)
    table = retrieval.item_embedding.weight.detach().numpy()
    cnt = np.log1p(np.bincount(ds.items[loo.train_mask], minlength=ds.num_items + 1)).astype(np.float32)
    some = prerank_item_heads(tower, spec, ds, table, cnt, items=np.array([3, 7]))
    torch.testing.assert_close(some, pipe.item_heads[[3, 7]])
    assert pipe.item_feats.shape[0] == ds.num_items + 1 and not pipe.item_feats[0].any()  # row 0 = padding


def test_load_refuses_checkpoints_of_another_data_set(tiny) -> None:
    _, _, ret, pre = tiny
    other = load("synthetic:users=120,items=90,seed=0")
    with pytest.raises(DataError, match=r"checkpoint.pt: the retrieval checkpoint was trained on another data set"):
        Pipeline.load(other, LeaveOneOut(other), ret, pre)
