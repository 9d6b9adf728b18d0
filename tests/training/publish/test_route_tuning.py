"""The item-to-item route's request settings chosen per version at publish
(training/publish/route_tuning.py): the coordinate search on known surfaces, the grid's checks,
and a published version whose route must win over an untrained encoder."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from recsys_cli import main as cli
from service.artifacts import load_version
from service.contract.layout import ITEM2ITEM
from service.pipeline import Recommender
from tests.training.publish.test_build import TINY, make_checkpoints, one_thread  # noqa: F401
from training.data.sources import load
from training.data.splits import LeaveOneOut
from training.eval.served_eval import ServingGate, evaluate_served, select_users
from training.publish import route_tuning as rt
from training.publish.publisher import publish

SMALL_GRID = {"beta": (0.0, 1.0, 4.0), "candidates": (20, 50), "recent": (1, 8), "decay": (0.6, 1.0)}
START = {"beta": 1.0, "candidates": 50, "recent": 8, "decay": 1.0}


def test_search_finds_a_known_best_and_measures_each_setting_once() -> None:
    target = {"beta": 4.0, "candidates": 20, "recent": 3, "decay": 0.6}
    calls: list[tuple[float, ...]] = []

    def measure(s: rt.Setting) -> float:  # separable, peaked at target: coordinate search reaches it
        calls.append(tuple(s[k] for k in rt.ORDER))
        return 1.0 - sum(abs(np.log(s[k] + 1) - np.log(target[k] + 1)) for k in rt.ORDER)

    best, tried = rt.coordinate_search(measure)
    assert best == target
    assert len(calls) == len(set(calls)) == len(tried) < 7 * 2 * 3 * 2  # fewer than the full product
    assert max(t["NDCG@10"] for t in tried) == pytest.approx(1.0)


def test_ties_go_to_the_cheaper_setting() -> None:
    best, tried = rt.coordinate_search(lambda s: 0.25, SMALL_GRID, START)
    # everything ties: beta 0, 20 candidates, 1 recent item and no decay (1.0) win
    assert best == {"beta": 0.0, "candidates": 20, "recent": 1, "decay": 1.0}
    assert tried[0] == {**START, "NDCG@10": 0.25}  # the start is measured first
    # a real gain beats cheapness: beta 4 wins by 0.01 whatever the rest
    best, _ = rt.coordinate_search(lambda s: 0.25 + 0.01 * (s["beta"] == 4.0), SMALL_GRID, START)
    assert best == {"beta": 4.0, "candidates": 20, "recent": 1, "decay": 1.0}


def test_bad_grid_is_refused_naming_the_value() -> None:
    with pytest.raises(ValueError, match=r"must set exactly \['beta', 'candidates', 'decay', 'recent'\], got"):
        rt.coordinate_search(lambda s: 0.0, {"beta": (0.0,)}, START)
    with pytest.raises(ValueError, match="recent has no values"):
        rt.coordinate_search(lambda s: 0.0, {**SMALL_GRID, "recent": ()}, START)
    with pytest.raises(ValueError, match=r"start candidates=50 is not among its grid values \[20\]"):
        rt.coordinate_search(lambda s: 0.0, {**SMALL_GRID, "candidates": (20,)}, START)


# 60 validation users keep the publish short; every stage kept and a tiny version published even
# below a baseline: the route's tuning is the subject here, not the gates (test_gate_baselines.py)
GATE = ServingGate(users=60, tolerance=math.inf, allow_below_baseline=True)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return make_checkpoints(TINY, tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def published(ckpts: tuple[Path, Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("artifacts")
    publish(TINY, *ckpts, root, version="v1", gate=GATE, max_regression=None)  # the route by default
    return root / "v1"


def test_publish_chooses_the_route_over_an_untrained_encoder(published: Path) -> None:
    # TINY is Markov by construction and the encoder is random: the route alone is far better,
    # so a positive beta must win, and by much
    v = load_version(published)
    route, m = v.item2item, v.manifest.item2item
    assert route is not None and m is not None and m.serving is not None and m.tuning is not None
    tried = m.tuning["tried"]
    best = max(t["NDCG@10"] for t in tried)
    off = max(t["NDCG@10"] for t in tried if t["beta"] == 0.0)
    assert m.serving["beta"] > 0 and best > off + 0.1
    chosen = next(t for t in tried if all(t[k] == m.serving[k] for k in rt.ORDER))
    assert chosen["NDCG@10"] == best
    # the record: which users, which seed, the grid; the loaded route serves the chosen settings
    assert m.tuning["users"] == GATE.users and m.tuning["seed"] == GATE.seed and m.tuning["split"] == "valid"
    assert m.tuning["grid"]["beta"] == list(rt.GRID["beta"]) and m.tuning["chosen"] == m.serving
    assert (route.beta, route.recent, route.decay, route.candidates) == (
        m.serving["beta"], m.serving["recent"], m.serving["decay"], m.serving["candidates"])
    # the stage gate ran after the tuning, on the same users, each fold's users with the settings
    # chosen on the other folds' users (test_gate_replays_each_fold_with_settings_chosen_without_it)
    assert v.manifest.serving is not None and v.manifest.serving.settings is not None
    assert v.manifest.serving.users == GATE.users and v.manifest.serving.settings["route_folds"] == rt.GATE_FOLDS


def test_gate_replays_each_fold_with_settings_chosen_without_it(published: Path) -> None:
    v = load_version(published)
    m = v.manifest
    assert m.item2item is not None and m.item2item.tuning is not None and m.serving is not None
    record = m.item2item.tuning["cross_fit"]
    assert (record["folds"], record["users"], record["seed"]) == (rt.GATE_FOLDS, GATE.users, GATE.seed)
    ds = load(TINY)
    loo = LeaveOneOut(ds)
    users = select_users(loo, GATE.users, GATE.seed)
    fold = rt.assign_folds(users.size, rt.GATE_FOLDS, GATE.seed)
    assert np.bincount(fold).tolist() == [GATE.users // rt.GATE_FOLDS] * rt.GATE_FOLDS
    # (on this fixture the folds disagree, so the check below tells the folds' settings from the served ones)
    assert len({tuple(sorted(c.items())) for c in record["chosen"]}) > 1
    # fold 0's settings are what the search chooses on the other folds' users alone
    assert record["chosen"][0] == rt.tune_route(rt.UserGains(v, ds, loo, users[fold != 0]), GATE.seed).serving
    # and the gate's retrieval cut is each fold replayed with its own settings, users weighted
    per_fold = [rt.served_retrieval_ndcg(v, ds, loo, users[fold == k])(record["chosen"][k])
                for k in range(rt.GATE_FOLDS)]
    want = float(np.average(per_fold, weights=np.bincount(fold)))
    assert m.serving.cuts["retrieval"]["NDCG@10"] == pytest.approx(want)
    # while the version serves the settings chosen on all of them
    assert m.item2item.tuning["chosen"] == m.item2item.serving
    # read back from the manifest (the check against a live version on other data replays with it)
    again = rt.CrossFit.recorded(m)
    assert again is not None and again.settings == record["chosen"] and (again.fold == fold).all()
    assert rt.CrossFit.recorded(m.with_(item2item=None)) is None


def test_replayed_routes_must_match_the_users(published: Path) -> None:
    v = load_version(published)
    ds = load(TINY)
    loo = LeaveOneOut(ds)
    assert v.item2item is not None
    cross = rt.CrossFit(np.zeros(5, np.int64), [dict(rt.START)], 0, 0.0)
    with pytest.raises(ValueError, match="routes.fold has 5 users, 6 are replayed"):
        evaluate_served(v, ds, loo, "valid", np.arange(6), progress=False, routes=cross.route_folds(v.item2item))


def test_measure_replays_the_served_retrieval_cut(published: Path) -> None:
    # NDCG@10 of one setting, recomputed by hand from the Recommender's lists
    v = load_version(published)
    ds = load(TINY)
    loo = LeaveOneOut(ds)
    users = select_users(loo, 30, 1)
    setting = {"beta": 2.0, "candidates": 20, "recent": 3, "decay": 0.6}
    got = rt.served_retrieval_ndcg(v, ds, loo, users)(setting)
    assert v.item2item is not None
    rec = Recommender(replace(v, item2item=replace(v.item2item, **setting)), stages=("retrieval",))
    gains = []
    for u in users:
        user = loo.eval_users[u]
        history = [str(x) for x in ds.item_ids[ds.items[ds.offsets[user]:loo.history_end("valid")[u]]]]
        top = [it.item_id for it in rec.recommend(history, k=10).items]
        target = str(ds.item_ids[loo.targets("valid")[u]])
        gains.append(1 / np.log2(top.index(target) + 2) if target in top else 0.0)
    assert got == pytest.approx(float(np.mean(gains)))


def test_no_item2item_publishes_no_route(ckpts: tuple[Path, Path, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "a"
    base = ["export", "--data", TINY, "--retrieval", str(ckpts[0]), "--prerank", str(ckpts[1]), "--out", str(out),
            "--gate-users", "20", "--stage-tolerance", "inf", "--allow-below-baseline"]
    assert cli.main([*base, "--no-item2item", "--i2i-window", "3"]) == 2
    assert "--i2i-window contradicts --no-item2item" in capsys.readouterr().err
    assert cli.main([*base, "--no-item2item", "--version", "plain"]) == 0
    assert "item2item: none" in capsys.readouterr().out
    v = load_version(out / "plain")
    assert v.item2item is None and v.manifest.item2item is None and not (out / "plain" / ITEM2ITEM).exists()
    # reindex keeps it off when asked, and refuses --events then (they only feed the route's table)
    assert cli.main(["reindex", "--artifacts", str(out), "--no-item2item", "--events", "seqtxt:x"]) == 2
    assert "--events seqtxt:x only feeds the item-to-item route's table" in capsys.readouterr().err
    assert cli.main(["reindex", "--artifacts", str(out), "--no-item2item", "--version", "plain2",
                     "--gate-users", "20", "--max-regression", "1", "--allow-below-baseline"]) == 0
    assert load_version(out / "plain2").item2item is None
    # and by default a reindex of a version without the route publishes it, tuned
    assert cli.main(["reindex", "--artifacts", str(out), "--version", "routed", "--gate-users", "20",
                     "--max-regression", "1", "--stage-tolerance", "inf", "--allow-below-baseline"]) == 0
    assert "item2item: R=100 window=8 alpha=0.25; serving" in capsys.readouterr().out
    m = load_version(out / "routed").manifest.item2item
    assert m is not None and m.tuning is not None and m.tuning["users"] == 20
    # 20 gate users: 5 folds of 4 for the gate; with fewer than 2 per fold the gate replays the
    # version's own settings and says nothing of folds
    assert m.tuning["cross_fit"]["folds"] == rt.GATE_FOLDS and m.tuning["cross_fit"]["users"] == 20
    assert cli.main(["reindex", "--artifacts", str(out), "--version", "few", "--gate-users", "9",
                     "--max-regression", "1", "--stage-tolerance", "inf", "--allow-below-baseline"]) == 0
    few = load_version(out / "few").manifest
    assert few.item2item is not None and few.item2item.tuning is not None and few.serving is not None
    assert "cross_fit" not in few.item2item.tuning and "route_folds" not in (few.serving.settings or {})
