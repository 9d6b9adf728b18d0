"""The rankers' lists merged with the item-to-item route, their pair features and the learned pair
prior (training/stages/prerank/lists.py, models/cascade.py PairPrior): the prior starts at the
merged-retrieval order, the training lists' route never counts their targets, and training and
the published service compute the same lists, pair features, pre-rank and re-rank scores for the
same request (one definition: service/pair_features.py, service/item2item.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from models.cascade import PairPrior
from models.prm import PRM
from models.sasrec import MultiLauncherSASRec, SASRecConfig
from service.artifacts import load_current
from service.contract.layout import RERANK_ITEMS, RERANK_MANIFEST
from service.contract.manifest import STAGES
from service.contract.pair_features import PAIR_FEATURES
from service.contract.rerank_inputs import PVStats, RerankServing
from service.item2item import DEFAULT_SERVING
from service.pipeline import Recommender
from training.data.sources import load
from training.data.splits import LeaveOneOut
from training.eval.served_eval import ServingGate
from training.publish.onnx.prerank import export_prerank
from training.publish.onnx.rerank import export_rerank
from training.publish.publisher import publish
from training.stages.prerank import train as pr
from training.stages.prerank.data import Retrievers, build_next_item_data, retrieval_prior
from training.stages.prerank.lists import list_routes, make_lists
from training.stages.rerank import models as rr
from training.stages.rerank.impressions import list_data
from training.stages.rerank.sampling import ImpressionConfig
from training.stages.rerank.train import score_lists as rerank_scores
from training.stages.rerank.upstream import Pipeline, rank_candidates
from training.stages.retrieval import train as rt

TINY = "synthetic:users=200,items=80,seed=0"
CANDIDATES, LIST_LEN = 20, 8
# ONNX Runtime vs eager PyTorch float32 (user vectors, heads): ~1e-6 per number, summed over the
# prior's 12 features and the tower's heads
ATOL = 1e-3


@pytest.fixture(scope="module")
def tiny() -> tuple:
    torch.set_num_threads(1)
    ds = load(TINY)
    loo = LeaveOneOut(ds)
    torch.manual_seed(0)
    sasrec = MultiLauncherSASRec(SASRecConfig(num_items=ds.num_items, maxlen=20, dim=16, num_blocks=1, num_launchers=2))
    data = build_next_item_data(ds, loo, None, history_len=10, candidates=CANDIDATES, max_train_examples=60,
                                retrievers=Retrievers(sasrec, sasrec))
    return ds, loo, sasrec, data


def test_the_pair_prior_starts_at_the_merged_retrieval_order(tiny: tuple) -> None:
    ds, loo, sasrec, data = tiny
    assert data.train_lists is not None and data.valid.features is not None
    assert data.valid.features.shape[-1] == len(PAIR_FEATURES)
    # every kept training row's target is in its list (the listwise softmax needs it)
    assert (data.train_lists.items == data.train_targets[:, None]).any(axis=1).all()
    prior = retrieval_prior(data)
    assert isinstance(prior, PairPrior)
    tower = pr.build_model("inttower", data.spec, hidden=(16, 8), heads=2, head_dim=4, embed_dim=8)
    s = pr.score_lists(tower, data.valid.user, data.valid.candidates, data.catalog, prior=prior, lists=data.valid)
    real = data.valid.candidates > 0
    # the same order as the merged score the lists come in (ties aside: compare the scores' ranks)
    merged = np.where(real, data.valid.retrieval_scores, -np.inf)
    np.testing.assert_allclose(np.where(real, s - s[:, :1], 0), np.where(real, merged - merged[:, :1], 0), atol=1e-4)


def test_the_training_route_never_counts_the_lists_targets() -> None:
    ds = load(TINY)
    fold = LeaveOneOut(ds, holdout=3)
    routes = list_routes(ds, fold.train_mask)
    seen = np.bincount(ds.items[fold.train_mask], minlength=ds.num_items + 1)
    # popularity columns are the upstream's rows only: the held-out targets are not in them
    assert np.expm1(routes.tables.items[:, 0]).round().astype(int).tolist() == seen.tolist()
    assert routes.tables.items[:, 0].sum() < list_routes(ds, LeaveOneOut(ds).train_mask).tables.items[:, 0].sum()


def test_ranking_fold_lists_read_the_upstreams_own_tables() -> None:
    """A ranking fold's training lists (tail: holdout H) read popularity counted over the rows the
    upstream trained on, every user's last H training rows left out (ranking_tables_mask): so the
    target's count holds none of the held-out rows, its own included."""
    from service.contract.pair_features import feature_index
    from training.stages.prerank.data import ranking_tables_mask

    ds = load(TINY)
    loo = LeaveOneOut(ds)
    h = 3
    assert (ranking_tables_mask(ds, h, loo) == LeaveOneOut(ds, holdout=h).train_mask).all()
    assert (ranking_tables_mask(ds, 0, loo) == loo.train_mask).all()
    torch.manual_seed(0)
    sasrec = MultiLauncherSASRec(SASRecConfig(num_items=ds.num_items, maxlen=20, dim=16, num_blocks=1, num_launchers=1))
    data = build_next_item_data(ds, loo, None, history_len=10, candidates=CANDIDATES,
                                retrievers=Retrievers(sasrec, sasrec, holdout=h))
    tl = data.train_lists
    assert tl is not None
    counted = np.bincount(ds.items[LeaveOneOut(ds, holdout=h).train_mask], minlength=ds.num_items + 1)
    at = (tl.items == data.train_targets[:, None]).argmax(axis=1)
    pop = tl.features[np.arange(at.size), at, feature_index("pop_all")]
    np.testing.assert_allclose(pop, np.log1p(counted[data.train_targets]), rtol=1e-5)


def test_a_ranking_fold_chooses_the_routes_settings_on_its_lists_not_the_validation_users(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The publish gate judges the cuts on the validation users, so with a ranking fold (holdout H)
    the route's settings are chosen on the fold's lists (upstream, its own tables, the training
    targets); in-sample lists (H = 0) still choose on the validation users."""
    from training.stages.prerank import data as prd
    from training.stages.prerank.folds import prerank_rows
    from training.stages.prerank.lists import tune_route_settings

    ds = load(TINY)
    loo = LeaveOneOut(ds)
    torch.manual_seed(0)
    sasrec = MultiLauncherSASRec(SASRecConfig(num_items=ds.num_items, maxlen=20, dim=16, num_blocks=1, num_launchers=1))
    calls: list[tuple] = []

    def spy(model, routes, ds_, starts, ends, targets, candidates=200):  # type: ignore[no-untyped-def]
        calls.append((routes, np.asarray(starts), np.asarray(ends), np.asarray(targets)))
        return tune_route_settings(model, routes, ds_, starts, ends, targets, candidates)

    monkeypatch.setattr(prd, "tune_route_settings", spy)
    h = 3
    data = build_next_item_data(ds, loo, None, history_len=10, candidates=CANDIDATES,
                                retrievers=Retrievers(sasrec, sasrec, holdout=h))
    (routes, starts, ends, targets), = calls
    rows = prerank_rows(loo, h)
    np.testing.assert_array_equal(ends, rows)  # each list's history ends at its training target
    np.testing.assert_array_equal(targets, ds.items[rows])
    np.testing.assert_array_equal(starts, ds.offsets[ds.users[rows]])
    assert not np.isin(rows, loo.history_end("valid")).any()  # no validation target among them
    assert routes.counted_end is not None  # the upstream's own tables: every user's last H rows left out
    kept = LeaveOneOut(ds, holdout=h).train_mask
    np.testing.assert_array_equal(routes.counted_end, ds.offsets[:-1] + np.bincount(ds.users[kept], minlength=ds.num_users))
    assert data.route_serving is not None and data.train_lists is not None
    calls.clear()
    build_next_item_data(ds, loo, None, history_len=10, candidates=CANDIDATES, retrievers=Retrievers(sasrec, sasrec))
    (_, _, ends, targets), = calls
    np.testing.assert_array_equal(targets, loo.targets("valid"))
    np.testing.assert_array_equal(ends, loo.history_end("valid"))


def test_the_prior_refit_lifts_held_out_lists_and_never_ends_below_its_start() -> None:
    """refit_prior on lists of an untrained retriever merged with the route (the route is the
    signal, the random retrieval score noise): cross-fitted over the lists' users, the refit moves
    the held-out lists off the merged order by more than 2 paired SEs, the prior fit on all lists
    lifts validation too, and its validation NDCG@10 is what evaluate_next_item measures with it;
    with steps that diverge (lr 1000) nothing beats the start beyond noise and it is kept, unchanged."""
    ds = load("synthetic:users=800,items=80,seed=0")  # enough validation lists for the gain to pass its SE
    loo = LeaveOneOut(ds)
    torch.manual_seed(1)
    sasrec = MultiLauncherSASRec(SASRecConfig(num_items=ds.num_items, maxlen=20, dim=16, num_blocks=1, num_launchers=1))
    data = build_next_item_data(ds, loo, None, history_len=10, candidates=CANDIDATES, max_train_examples=800,
                                retrievers=Retrievers(sasrec, sasrec))
    tower = pr.build_model("inttower", data.spec, hidden=(16, 8), heads=2, head_dim=4, embed_dim=8)
    cfg = pr.TrainConfig(prior_steps=100)
    prior = retrieval_prior(data)
    assert isinstance(prior, PairPrior)
    got = pr.refit_prior(tower, prior, data, cfg)
    assert got["step"] > 0 and got["gain"] > pr.PRIOR_KEEP_SE * got["se"] > 0
    assert got["check"] == pytest.approx(got["check_start"] + got["gain"])  # the best step count kept
    assert got["valid_NDCG@10"] > got["start"]
    assert pr.evaluate_next_item(tower, data, "valid", prior)["NDCG@10"] == pytest.approx(got["valid_NDCG@10"], abs=1e-6)
    fresh = retrieval_prior(data)
    assert isinstance(fresh, PairPrior)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    kept = pr.refit_prior(tower, fresh, data, pr.TrainConfig(prior_steps=20, prior_lr=1e3))
    if kept["step"] == 0:  # no step beat the start beyond its paired SE: the start itself is kept
        assert kept["valid_NDCG@10"] == pytest.approx(kept["start"]) and not kept["gain"] > pr.PRIOR_KEEP_SE * kept["se"]
        assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    else:
        assert kept["gain"] > pr.PRIOR_KEEP_SE * kept["se"]


def test_the_refit_keeps_its_best_step_count_beyond_one_paired_se() -> None:
    """refit_steps on per-list scores built by hand: each point of the path is the start plus its
    mean plus the same +-0.1 pattern, so every paired SE is 0.1 * std(pattern) / 10 ~ 0.01."""
    start = np.linspace(0.0, 1.0, 100)
    wiggle = 0.1 * np.where(np.arange(100) % 2 == 0, 1.0, -1.0)
    se = float(wiggle.std(ddof=1) / 10)

    def path(*means: float) -> np.ndarray:
        return np.stack([start + m + wiggle for m in means])

    # the best point, not an earlier one within one SE of it
    i, gain, got_se = pr.refit_steps(path(0.02, 0.045, 0.05, 0.049), start)
    assert (i, gain, got_se) == (2, pytest.approx(0.05), pytest.approx(se))
    # 1.5 SEs: kept (a 2-SE margin turned such refits down)
    assert pr.refit_steps(path(0.001, 0.015), start)[0] == 1
    # not above one SE over the start, or below it: the start is kept
    assert pr.refit_steps(path(0.005, 0.008), start)[0] == -1
    assert pr.refit_steps(path(-0.03, -0.01), start)[0] == -1


@pytest.mark.parametrize("cut", [1, 2, 5, 9])
def test_a_list_reads_tables_without_its_own_future(cut: int) -> None:
    """In-sample lists: inside without_future the route, the co-occurrence features and the
    popularity columns are those of tables rebuilt without the user's rows from the list's target
    on (R > N, so no row is cut to its top R), and everything is restored after."""
    from service.item2item import Merged
    from service.pair_features import pair_features
    from training.stages.prerank.lists import without_future
    from training.stages.retrieval.item2item import Item2ItemConfig

    ds = load(TINY)
    cfg = Item2ItemConfig(neighbours=ds.num_items + 5, window=4)
    mask = LeaveOneOut(ds).train_mask
    u = int(np.argmax(np.diff(ds.offsets)))  # the longest user: futures of several rows
    start = int(ds.offsets[u])
    served = {"recent": 3, "decay": 0.7, "candidates": 30, "beta": 2.0}
    full = list_routes(ds, mask, cfg, served)
    stop = int(full.counted_end[u])  # type: ignore[index]
    assert stop - start > cut + 3
    cut_mask = mask.copy()
    cut_mask[start + cut:stop] = False
    rebuilt = list_routes(ds, cut_mask, cfg, served)
    hist = ds.items[start:start + cut].astype(np.int64)
    cands = np.arange(1, ds.num_items + 1)
    m = Merged.faiss_only(cands, np.zeros(cands.size, np.float32), np.zeros(cands.size, np.int64))
    before = [a.copy() for a in (full.tables.items, full.tables.neighbours, full.tables.scores)]
    assert full.route is not None and rebuilt.route is not None
    with without_future(full, ds.items[start:stop], cut):
        got_route = full.route.score(hist, np.unique(hist))
        got_feats = pair_features(full.tables, hist, m)
    want_route = rebuilt.route.score(hist, np.unique(hist))
    np.testing.assert_array_equal(got_route[0], want_route[0])
    np.testing.assert_allclose(got_route[1], want_route[1], rtol=1e-5)
    want_feats = pair_features(rebuilt.tables, hist, m)
    cols = [PAIR_FEATURES.index(c) for c in ("pop_all", "pop_recent", "cooc_last", "cooc_recent")]
    np.testing.assert_allclose(got_feats[:, cols], want_feats[:, cols], rtol=1e-5, atol=1e-6)
    # the leak it removes is real: the full table reaches the target through its own transition
    assert not np.allclose(pair_features(full.tables, hist, m)[:, cols], want_feats[:, cols])
    for a, b in zip(before, (full.tables.items, full.tables.neighbours, full.tables.scores)):
        np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def published(tiny: tuple, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, PRM]:
    """Checkpoints with a pair prior (weights randomised, so every feature counts) and a PRM that
    reads the pair features, published with the route."""
    ds, loo, sasrec, data = tiny
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    root = tmp_path_factory.mktemp("pair")
    rt.save_checkpoint(root / "ret", sasrec, ds, TINY, {"metrics": {"NDCG@10": 0.05}})
    tower = pr.build_model("inttower", data.spec, hidden=(16, 8), heads=2, head_dim=4, embed_dim=8)
    prior = retrieval_prior(data)
    assert isinstance(prior, PairPrior)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in prior.parameters():
            p.normal_(0.0, 0.5)
    assert data.route_serving is not None  # the route's settings the lists were made with
    pr.save_checkpoint(tower, "inttower", data.spec, root / "pre", ds.fingerprint, prior, objective="next-item",
                       retrieval={"route_serving": data.route_serving})  # as recsys train prerank records them
    export_prerank(tower, data.spec, data.catalog, root / "pre", prior, route=data.route_serving)
    pipe = Pipeline.load(ds, loo, root / "ret", root / "pre")
    pv_dim = 2 * 2  # IntTower: 2 layers x 2 user heads
    hp = rr.RerankerHParams(d_model=8, heads=1, layers=1, ffn_dim=16)
    prm = PRM(rr.reranker_config("prm", pipe.item_feats.shape[1] + len(PAIR_FEATURES), pv_dim, LIST_LEN, hp)).eval()
    stats = PVStats((0.0,) * pv_dim, (1.0,) * pv_dim)
    rr.save_reranker(root / "re" / "prm.pt", "prm", prm, stats, ImpressionConfig(list_len=LIST_LEN), ds.fingerprint)
    export_rerank(prm, root / "re")
    np.save(root / "re" / RERANK_ITEMS, pipe.item_feats)
    serving = RerankServing(stats, list_len=LIST_LEN, config=prm.config.to_dict(), pair_features=True)
    (root / "re" / RERANK_MANIFEST).write_text(serving.to_json())
    publish(TINY, root / "ret", root / "pre", root / "re", root / "art", version="v1",
            gate=ServingGate(allow_below_baseline=True))
    return root / "ret", root / "pre", root / "art", prm


def test_training_and_serving_compute_the_same_lists_and_scores(tiny: tuple,
                                                                published: tuple[Path, Path, Path, PRM]) -> None:
    ds, loo, _, _ = tiny
    ret, pre, art, prm = published
    version = load_current(art)
    assert version.pair_tables is not None and version.manifest.files.pair_items
    assert version.item2item is not None
    # publish serves the route's settings the lists were made with (not tuned again)
    route = version.item2item
    assert {k: getattr(route, k) for k in DEFAULT_SERVING} == tiny[3].route_serving
    assert version.manifest.item2item is not None and "from" in (version.manifest.item2item.tuning or {})
    users = loo.eval_users[:12]
    ends = loo.history_end("test")[:12]
    pipe = Pipeline.load(ds, loo, ret, pre)
    ranked = rank_candidates(pipe, users, ends, ImpressionConfig(list_len=LIST_LEN, candidates=CANDIDATES))
    lists = list_data(pipe, ranked, np.zeros((users.size, LIST_LEN), np.float32), PVStats((0.0,) * 4, (1.0,) * 4),
                      LIST_LEN)
    assert lists.item_feats.shape[-1] == pipe.item_feats.shape[1] + len(PAIR_FEATURES)
    pre_rec = Recommender(version, retrieval_k=CANDIDATES, stages=STAGES[:2])
    full_rec = Recommender(version, retrieval_k=CANDIDATES, prerank_n=LIST_LEN, stages=STAGES)
    for b, (u, end) in enumerate(zip(users.tolist(), ends.tolist())):
        hist = [str(x) for x in ds.item_ids[ds.items[ds.offsets[u]:end]].tolist()]
        # the lists: make_lists (training) vs the service's retrieval stage, as sets of items
        ml = make_lists(pipe.retrieval, pipe.routes, ds, ds.offsets[u:u + 1], np.array([end]), CANDIDATES)  # type: ignore[arg-type]
        trained = {str(ds.item_ids[i]): float(s) for i, s in zip(ranked.items[b], ranked.scores[b]) if i > 0}
        assert {str(ds.item_ids[i]) for i in ml.items[0] if i > 0} == set(trained)
        assert pre_rec.candidates(hist).size == len(trained)  # FAISS's 20 + the route's, as trained
        # k = CANDIDATES keeps FAISS at the trained 20 (it fetches max(retrieval_k, k)): the top 20 pre-ranked
        served = pre_rec.recommend(hist, k=CANDIDATES)
        assert served.served_by == "prerank"
        assert [it.item_id for it in served.items] == list(trained)[:CANDIDATES]
        assert {it.item_id: it.stages["prerank"] for it in served.items} == pytest.approx(
            {i: trained[i] for i in list(trained)[:CANDIDATES]}, abs=ATOL)
        # the re-ranker: PRM over the top LIST_LEN with the pair features as item features
        top = full_rec.recommend(hist, k=LIST_LEN)
        assert top.served_by == "rerank"
        eager = rerank_scores(prm, lists)[b]
        want = {str(ds.item_ids[i]): float(s) for i, s in zip(ranked.items[b, :LIST_LEN], eager)}
        assert {it.item_id: it.stages["rerank"] for it in top.items} == pytest.approx(want, abs=ATOL)
