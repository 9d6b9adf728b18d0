"""The served-path evaluation (training/eval/served_eval.py, `recsys evaluate --artifacts`) and the stage
gate at publish (training/publish/build.py serving_gate, manifest `serving`).

Tiny random-init checkpoints (tests/training/publish/test_build.py builds them) over a small
synthetic set. For the gate, a pre-ranker trained for a few seconds (`recsys train prerank`:
its order must carry signal, else reversing it costs nothing) and a deliberately broken
re-ranker, a pointwise MLP whose output is minus the pre-rank score (it reverses the pre-rank
order of its list), which must be switched off.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from models.prm import PointwiseMLP, PointwiseMLPConfig
from service.artifacts import load_current, load_version
from service.core.config import Settings
from service.main import create_app
from service.pipeline import STAGES, Recommender
from tests.training.publish.test_build import BELOW_OK, BELOW_OK_FLAG, TINY, make_checkpoints, one_thread  # noqa: F401
from recsys_cli import main as cli
from service.contract.layout import PRERANK_MANIFEST
from service.contract.rerank_inputs import PVStats
from training.checkpoints import load_reranker
from training.stages.rerank.end_to_end import end_to_end
from training.stages.rerank.sampling import ImpressionConfig
from training.stages.rerank.upstream import Pipeline
from training.stages.rerank import models as rr
from training.eval import served_eval as se
from training.publish.publisher import publish
from training.publish.versions import CURRENT, PublishError, read_current
from training.data.dataset import DataError
from training.data.sources import load
from training.data.splits import LeaveOneOut
from training.eval.diversity import embedding_diversity
from training.publish.onnx.rerank import export_rerank
from training.eval.metrics import evaluate_retrieval
from training.publish.gates import catalog_metrics
from training.stages.retrieval.train import model_scorer
from service.contract.layout import RERANK_ITEMS, RERANK_MANIFEST

REVERSE_LEN = 30  # = the service's prerank_n: the broken re-ranker reverses the whole pre-rank top 30


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return make_checkpoints(TINY, tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def published(ckpts: tuple[Path, Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("artifacts")
    # without the item-to-item route: these tests compare with the eager reference, which has no
    # route, and need random rankers the gate keeps (on TINY the route lifts the retrieval cut far
    # above them; tests/training/publish/test_route_tuning.py covers the route)
    publish(TINY, *ckpts, root, version="v1", item2item=None, gate=BELOW_OK)
    return root


@pytest.fixture(scope="module")
def trained_pre(ckpts: tuple[Path, Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A next-item IntTower over the random retrieval's candidates, trained ~5 s: valid NDCG@10
    about twice the random retrieval order's."""
    out = tmp_path_factory.mktemp("trained") / "pre"
    assert cli.main(["train", "prerank", "--data", TINY, "--model", "inttower", "--objective", "next-item",
                     "--retrieval", str(ckpts[0]), "--no-pair-features",  # served without the route below
                     "--out", str(out), "--epochs", "15", "--lr", "0.01",
                     "--embed-dim", "8", "--hidden", "16,8", "--heads", "2", "--head-dim", "4",
                     "--history-len", "10", "--plot", str(out / "curves.png")]) == 0
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"  # --plot PNG: the path given
    return out


def reversing_reranker(ckpts: tuple[Path, Path, Path], pre: Path, out: Path) -> Path:
    """A re-rank folder as `recsys train rerank` writes it (over retrieval ckpts[0] and the
    pre-ranker `pre`), whose model scores each entry with minus its (list z-scored) pre-rank
    score: the pre-rank order, reversed."""
    ret, _, rer = ckpts
    ds = load(TINY)
    pipe = Pipeline.load(ds, LeaveOneOut(ds), ret, pre)
    heads = json.loads((pre / PRERANK_MANIFEST).read_text())["outputs"]["user_heads"]
    pv_dim = heads[1] * heads[2]  # (layers, user heads), as make_checkpoints
    good = {**json.loads((rer / RERANK_MANIFEST).read_text()), "pv_mean": [0.0] * pv_dim,
            "pv_std": [1.0] * pv_dim}
    mlp = PointwiseMLP(PointwiseMLPConfig(item_dim=pipe.item_feats.shape[1], pv_dim=pv_dim, hidden=(2,),
                                          dropout=0.0, max_len=REVERSE_LEN)).eval()
    first, last = mlp.net[0], mlp.net[-1]
    with torch.no_grad():  # relu(s) - relu(-s) = s, the score column is the last input
        first.weight.zero_()
        first.bias.zero_()
        first.weight[0, -1], first.weight[1, -1] = 1.0, -1.0
        last.weight.copy_(torch.tensor([[-1.0, 1.0]]))
        last.bias.zero_()
    stats = PVStats(tuple(good["pv_mean"]), tuple(good["pv_std"]))
    rr.save_reranker(out / "prm.pt", "mlp", mlp, stats,
                     ImpressionConfig(list_len=REVERSE_LEN, candidates=200, retrieval_score=False), ds.fingerprint)
    export_rerank(mlp, out)
    np.save(out / RERANK_ITEMS, pipe.item_feats)
    (out / RERANK_MANIFEST).write_text(json.dumps({**good, "model": "MLP", "list_len": REVERSE_LEN,
                                                          "config": mlp.config.to_dict()}))
    return out


@pytest.fixture(scope="module")
def broken(ckpts: tuple[Path, Path, Path], trained_pre: Path, published: Path,
           tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """published (v1 live) + v2: the trained pre-ranker and the reversing re-ranker, published
    with the default gate. Returns (artifacts root, re-rank folder)."""
    root = tmp_path_factory.mktemp("broken") / "artifacts"
    shutil.copytree(published, root)
    rev = reversing_reranker(ckpts, trained_pre, tmp_path_factory.mktemp("rev"))
    publish(TINY, ckpts[0], trained_pre, rev, root, version="v2", item2item=None, gate=BELOW_OK)  # the re-ranker is the subject
    return root, rev


def test_cut_table_on_a_tiny_version(published: Path) -> None:
    ds = load(TINY)
    loo = LeaveOneOut(ds)
    v = load_current(published)
    ev = se.evaluate_served(v, ds, loo, "test", progress=False)
    assert list(ev.cuts) == list(STAGES) and ev.users == loo.eval_users.size == 199
    for m in ev.cuts.values():
        assert m["users"] == 199 and m["failed"] == 0 and m["p50_ms"] > 0
        assert 0.0 <= m["HR@10"] <= m["HR@20"] <= m["HR@50"] <= 1.0
        assert m["NDCG@10"] <= m["HR@10"] and 0.0 < m["Coverage@10"] <= 1.0
    # retrieval alone (without the item-to-item route) over a flat index is exact search: it
    # equals the full ranking of retrieval.onnx over items.npy with the history removed
    # (training/publish/reindex.py, numpy)
    exact = catalog_metrics(v.path, loo, np.arange(loo.eval_users.size))
    faiss = se.evaluate_served(v, ds, loo, "test", cuts=[STAGES[:1]], progress=False, item2item=False)
    assert faiss.cuts["retrieval"]["HR@10"] == pytest.approx(exact["HR@10"], abs=1e-12)
    assert faiss.cuts["retrieval"]["NDCG@10"] == pytest.approx(exact["NDCG@10"], abs=1e-12)
    # diversity and the candidate set: 80 items, retrieval_k 200: every unseen item is a candidate
    r = ev.cuts["retrieval"]
    assert 0.0 < r["Diversity@10"] <= 2.0 and r["CandidateRecall"] == r["CandidateRecall_faiss"] == 1.0
    assert faiss.cuts["retrieval"]["Diversity@10"] == pytest.approx(
        embedding_diversity(faiss_top10(v, ds, loo), np.vstack([np.zeros((1, v.items.shape[1])), v.items])))
    # the tiny PRM reorders only the pre-rank top 8 (its max_len): the top-10 / top-50 sets stay
    assert v.manifest.to_dict()["rerank"]["config"]["max_len"] == 8
    for key in ("HR@10", "HR@20", "HR@50", "Coverage@10"):
        assert ev.cuts["rerank"][key] == ev.cuts["prerank"][key], key
    assert ev.cuts["rerank"]["NDCG@10"] != ev.cuts["prerank"]["NDCG@10"]
    # a seeded subset: the same users for the same seed
    users = se.select_users(loo, 50, seed=3)
    assert users.size == 50 and np.array_equal(users, se.select_users(loo, 50, seed=3))
    assert np.array_equal(se.select_users(loo, 500), np.arange(199))


def test_served_evaluation_agrees_with_the_torch_end_to_end_table(published: Path,
                                                                  ckpts: tuple[Path, Path, Path]) -> None:
    ds = load(TINY)
    loo = LeaveOneOut(ds)
    ret, pre, rer = ckpts
    ev = se.evaluate_served(load_current(published), ds, loo, "test", progress=False)
    pipe = Pipeline.load(ds, loo, ret, pre)
    model, ckpt = load_reranker(rer / "prm.pt", ds)
    cfg = dataclasses.replace(ImpressionConfig(**ckpt.extra["impressions"]), candidates=se.RETRIEVAL_K,
                              retrieval_score=model.config.num_scores == 2)
    e2e = end_to_end(pipe, loo, {"prm": model}, PVStats(**ckpt.extra["pv_stats"]), cfg, ks=(10, 20))
    e2e["retrieval"] = evaluate_retrieval(model_scorer(pipe.retrieval), loo, "test", ks=(10, 20), progress=False)
    # Retrieval: both exact full ranking, so equal up to float ties (one user at most).
    for key in ("HR@10", "NDCG@10", "HR@20"):
        assert abs(ev.cuts["retrieval"][key] - e2e["retrieval"][key]) <= 1 / 199 + 1e-9, key
    # Pre-rank / re-rank: the service knows only the request history (user_log_count = log1p of
    # its length, user id unknown), the torch side the user's training row: within noise, here
    # 0.03 (about 1.5 standard errors of HR@10 / NDCG@10 over 199 users).
    for cut, name in (("prerank", "prerank"), ("rerank", "rerank_prm")):
        for key in ("HR@10", "NDCG@10", "HR@20"):
            assert abs(ev.cuts[cut][key] - e2e[name][key]) <= 0.03, (cut, key, ev.cuts[cut][key], e2e[name][key])


def test_data_of_another_data_set_is_refused(published: Path) -> None:
    other = load("synthetic:users=100,items=80,seed=0")
    with pytest.raises(DataError, match=r"version v1 was built on data with fingerprint [0-9a-f]+ "
                                        r"\(synthetic:users=200,items=80,seed=0\)"):
        se.evaluate_served(load_current(published), other, progress=False)


def test_publish_records_the_served_cuts_in_the_manifest(published: Path) -> None:
    m = load_current(published).manifest.to_dict()
    s = m["serving"]
    assert s["split"] == "valid" and s["users"] == 199 and s["rule"] == "paired-se" and s["tolerance"] is None
    assert s["settings"] == {"retrieval_k": 200, "prerank_n": 30}
    assert list(s["cuts"]) == list(STAGES) and s["switched_off"] == [] and s["reason"] is None
    # the gate's numbers are the served evaluation of the validation users
    ds = load(TINY)
    ev = se.evaluate_served(load_current(published), ds, split="valid", progress=False)
    for cut in STAGES:
        assert s["cuts"][cut]["NDCG@10"] == pytest.approx(ev.cuts[cut]["NDCG@10"], abs=1e-12)
    assert s["deltas"]["rerank"]["NDCG@10"] == pytest.approx(
        s["cuts"]["rerank"]["NDCG@10"] - s["cuts"]["prerank"]["NDCG@10"], abs=1e-12)
    # nothing fell off: no stage is worse than the cut before it by more than its paired SE
    for cut in STAGES[1:]:
        assert s["deltas"][cut]["NDCG@10"] >= -s["deltas"][cut]["paired_se"] > -0.1, cut
    assert s["stages"] == list(STAGES) and Recommender(load_current(published)).stages == STAGES


def test_a_reversing_reranker_is_switched_off(broken: tuple[Path, Path], published: Path) -> None:
    root = broken[0]
    assert read_current(root) == "v2"
    v = load_current(root)
    s = v.manifest.to_dict()["serving"]
    ret, pre, rev = (s["cuts"][c]["NDCG@10"] for c in STAGES)
    assert pre > ret + 0.01  # the trained pre-ranker beats the random retrieval order: kept
    se_rev = s["deltas"]["rerank"]["paired_se"]
    assert 0 < se_rev and rev - pre < -se_rev  # reversing its top 30 costs more than its paired SE: switched off
    assert s["stages"] == ["retrieval", "prerank"] and s["switched_off"] == ["rerank"]
    assert s["reason"] == (f"rerank NDCG@10 {rev:.4f} is worse than prerank {pre:.4f} by more than its paired SE: "
                           f"rerank - prerank = {rev - pre:+.4f}, paired SE {se_rev:.4f} (199 valid users)")
    # the check against v1 compared what each serves: v2's pre-rank cut, v1's re-rank cut
    v1 = load_version(published / "v1").manifest.to_dict()["serving"]["cuts"]["rerank"]["NDCG@10"]
    assert v.manifest.to_dict()["checks"]["regression"] == {
        "metric": "NDCG@10", "max_regression": 0.01, "live_version": "v1",
        "compared": "served NDCG@10 (retrieval+prerank)", "result": "passed", "live": v1, "new": pre}
    # the re-ranker does reverse the pre-rank order
    ds = load(TINY)
    history = [str(x) for x in ds.item_ids[ds.sequence(0)[:5]].tolist()]
    top = [i.item_id for i in Recommender(v, stages=("retrieval", "prerank")).recommend(history, k=REVERSE_LEN).items]
    full = Recommender(v, stages=STAGES).recommend(history, k=REVERSE_LEN)
    assert [i.item_id for i in full.items] == top[::-1] and full.served_by == "rerank"
    # what the service runs: the manifest's stages, so the pre-rank order
    res = Recommender(v).recommend(history, k=5)
    assert res.served_by == "prerank" and [i.item_id for i in res.items] == top[:5]
    with TestClient(create_app(Settings(artifacts=root))) as c:  # type: ignore[call-arg]
        body = c.get("/v1/version").json()
        assert c.post("/v1/recommend", json={"history": history, "k": 5}).json()["served_by"] == "prerank"
    assert body["model_version"] == "v2" and body["stages"] == ["retrieval", "prerank"] and body["rerank"]
    assert body["serving"]["switched_off"] == ["rerank"] and "cuts" not in body["serving"]
    assert body["cuts"]["rerank"]["NDCG@10"] == pytest.approx(rev) and body["cuts"]["prerank"]["NDCG@10"] == pytest.approx(pre)


def test_require_all_stages_refuses_the_broken_reranker(broken: tuple[Path, Path], ckpts: tuple[Path, Path, Path],
                                                         trained_pre: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "artifacts"
    shutil.copytree(broken[0], root)
    rev = broken[1]
    with pytest.raises(PublishError, match=r"--require-all-stages: the stage gate switched off rerank: rerank NDCG@10 "):
        publish(TINY, ckpts[0], trained_pre, rev, root, version="v3",
                        gate=se.ServingGate(require_all_stages=True, allow_below_baseline=True))
    assert read_current(root) == "v2" and sorted(p.name for p in root.iterdir()) == [CURRENT, "v1", "v2"]
    code = cli.main(["export", "--data", TINY, "--retrieval", str(ckpts[0]), "--prerank", str(trained_pre),
                     "--rerank", str(rev), "--out", str(root), "--version", "v3", "--require-all-stages", BELOW_OK_FLAG])
    err = capsys.readouterr().err
    assert code == 1 and "check failed, CURRENT unchanged (v2): --require-all-stages: the stage gate switched off rerank" in err
    assert read_current(root) == "v2" and not (root / "v3").exists()
    # without the flag the CLI publishes and says so loudly
    code = cli.main(["export", "--data", TINY, "--retrieval", str(ckpts[0]), "--prerank", str(trained_pre),
                     "--rerank", str(rev), "--out", str(root), "--version", "v3", BELOW_OK_FLAG])
    out = capsys.readouterr()
    assert code == 0 and read_current(root) == "v3"
    assert "STAGE GATE: rerank SWITCHED OFF for version v3; it serves retrieval -> prerank." in out.err
    assert "serving: retrieval -> prerank (SWITCHED OFF: rerank: rerank NDCG@10" in out.out
    # an infinite tolerance keeps every stage; then the check against the live version compares
    # what each serves: v4's re-rank cut with v3's pre-rank cut, and refuses
    v3 = load_current(root).manifest.to_dict()["serving"]["cuts"]
    argv = ["export", "--data", TINY, "--retrieval", str(ckpts[0]), "--prerank", str(trained_pre), "--rerank", str(rev),
            "--out", str(root), "--version", "v4", "--stage-tolerance", "inf", BELOW_OK_FLAG]
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 1 and (f"served NDCG@10 (retrieval+prerank+rerank) {v3['rerank']['NDCG@10']:.4f} is worse than "
                          f"the live version v3 ({v3['prerank']['NDCG@10']:.4f}) by more than 0.01") in err
    assert cli.main([*argv, "--no-regression-check"]) == 0
    s = load_current(root).manifest.to_dict()["serving"]
    assert s["stages"] == list(STAGES) and s["tolerance"] is None and s["rule"] == "off" and s["switched_off"] == []
    assert Recommender(load_current(root)).recommend(["x"] + [str(i) for i in load(TINY).item_ids[1:4]]).served_by == "rerank"


def _eval(cuts: dict[str, float], failed: dict[str, int] | None = None) -> se.ServedEval:
    failed = failed or {}
    return se.ServedEval("valid", 4, {k: {"NDCG@10": v, "failed": failed.get(k, 0)} for k, v in cuts.items()},
                         {k: np.full(4, v) for k, v in cuts.items()})


def test_choose_stages_keeps_a_prefix() -> None:
    # a pre-ranker that hurts takes the re-ranker down with it, however good the re-ranker is
    c = se.choose_stages(_eval({"retrieval": 0.20, "prerank": 0.15, "rerank": 0.30}), 0.01)
    assert c.stages == ["retrieval"] and c.switched_off == ["prerank", "rerank"]
    assert c.reason == ("prerank NDCG@10 0.1500 < retrieval 0.2000 - tolerance 0.01 (paired SE 0.0000, "
                        "4 valid users); rerank needs prerank")
    # within the tolerance: kept; the next cut is compared with the last one served
    c = se.choose_stages(_eval({"retrieval": 0.20, "prerank": 0.195, "rerank": 0.18}), 0.01)
    assert c.stages == ["retrieval", "prerank"] and c.switched_off == ["rerank"]
    assert se.choose_stages(_eval({"retrieval": 0.2, "prerank": 0.1}), float("inf")).stages == ["retrieval", "prerank"]
    assert se.choose_stages(_eval({"retrieval": 0.2, "prerank": 0.25}), 0.0).stages == ["retrieval", "prerank"]
    # a stage that raised on some requests served the previous order there: off
    c = se.choose_stages(_eval({"retrieval": 0.2, "prerank": 0.25, "rerank": 0.25}, {"rerank": 2}), 0.01)
    assert c.switched_off == ["rerank"] and c.reason == "rerank failed on 2 of 4 requests (served the previous order)"
    with pytest.raises(ValueError, match=r"stage tolerance must be >= 0 \(inf: no stage gate\) or None \(the paired-SE rule\), got -0.1"):
        se.ServingGate(tolerance=-0.1)


def test_cli_evaluate_artifacts_table_and_json(published: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["evaluate", "--artifacts", str(published), "--data", TINY, "--users", "60",
                     "--json", str(tmp_path / "e.json"), "--plot", str(tmp_path / "cuts.png")])
    out = capsys.readouterr().out
    assert code == 0
    assert f"wrote {tmp_path / 'cuts.png'}" in out and (tmp_path / "cuts.png").read_bytes()[:4] == b"\x89PNG"
    r = json.loads((tmp_path / "e.json").read_text())
    assert r["version"] == "v1" and r["data"] == TINY and r["split"] == "test" and r["users"] == 60
    assert list(r["cuts"]) == list(STAGES) and r["served_stages"] == list(STAGES)
    ds = load(TINY)
    loo = LeaveOneOut(ds)
    want = se.evaluate_served(load_current(published), ds, loo, "test", se.select_users(loo, 60), progress=False)
    for cut in STAGES:
        for key in ("HR@10", "NDCG@10", "NDCG@50", "Coverage@10"):
            assert r["cuts"][cut][key] == pytest.approx(want.cuts[cut][key], abs=1e-12)
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if "HR@10" in line)
    assert lines[head].split()[1 : 1 + len(se.COLUMNS)] == list(se.COLUMNS)
    assert [line.split()[0] for line in lines[head + 2 : head + 5]] == ["retrieval", "+", "+"]
    assert f"{r['cuts']['rerank']['NDCG@10']:.4f}" in lines[head + 4] and "*" in lines[head + 4]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--artifacts", "no/such/dir"], "--artifacts no/such/dir: no such folder"),
        (["--artifacts", "{root}", "--version", "v9"], "--version v9: no such version in {root}"),
        (["--artifacts", "{root}", "--data", "synthetic:users=100,items=80"],
         "version v1 was built on data with fingerprint"),
        (["--artifacts", "{root}", "--model", "popularity"], "--model / --keep-seen evaluate a baseline"),
        (["--version", "v1"], "--version needs --artifacts"),
        (["--artifacts", "{empty}"], "no CURRENT file"),
    ],
)
def test_cli_evaluate_errors_are_one_line(argv: list[str], message: str, published: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    argv = [a.format(root=published, empty=tmp_path) for a in argv]
    code = cli.main(["evaluate", *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().count("\n") == 0, err
    assert message.format(root=published) in err


def faiss_top10(v, ds, loo: LeaveOneOut) -> np.ndarray:  # type: ignore[no-untyped-def]
    """(U, 10) the exact top-10 of retrieval.onnx over items.npy, seen items removed."""
    rec = Recommender(v, stages=STAGES[:1], item2item=False)
    out = np.zeros((loo.eval_users.size, 10), np.int64)
    ends = loo.history_end("test")
    for u, (s, e) in enumerate(zip(ds.offsets[loo.eval_users], ends)):
        got = rec.recommend([str(x) for x in ds.item_ids[ds.items[s:e]]], k=10, explain=False).items
        out[u] = [v.id_to_index[it.item_id] for it in got]
    return out
