"""Artifact publishing (training/publish/build.py, `recsys export`) and loading (service/artifacts.py).

Tiny randomly initialised retrieval / pre-rank / re-rank checkpoints over a small synthetic
set: the tests check the contract (files, manifest, CURRENT, atomicity, validation), not model
quality.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models.prm import PRM
from models.sasrec import MultiLauncherSASRec, SASRecConfig
from service.artifacts import ArtifactError, load_current, load_version, smoke_run
from recsys_cli import main as cli
from service.contract.layout import PRERANK_MANIFEST
from service.contract.rerank_inputs import PVStats, RerankServing
from training.checkpoints import load_retrieval
from training.stages.rerank.sampling import ImpressionConfig
from training.stages.rerank.upstream import Pipeline
from training.stages.rerank import models as rr
from training.stages.prerank import train as pr
from training.publish.onnx.prerank import export_prerank
from training.stages.prerank.data import build_next_item_data
from training.stages.retrieval import train as rt
from training.publish.publisher import publish
from training.publish.versions import CURRENT, PublishError, read_current
from training.eval.baselines import LastItem
from training.eval.served_eval import ServingGate
from training.data.dataset import DataError
from training.data.sources import load
from training.data.splits import LeaveOneOut
from training.publish.onnx.rerank import export_rerank
from service.contract.layout import INDEX_FAISS, ITEMS_NPY, MANIFEST, RERANK_ITEMS, RERANK_MANIFEST, RERANK_ONNX

TINY = "synthetic:users=200,items=80,seed=0"
# Random-init checkpoints serve below the trivial baselines. The tests that publish them are about
# the contract, not quality, so they publish with the baseline gate's override (the gate itself:
# tests/training/eval/test_gate_baselines.py); the stage gate still runs as by default.
BELOW_OK = ServingGate(allow_below_baseline=True)
BELOW_OK_FLAG = "--allow-below-baseline"
ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def make_checkpoints(spec: str, root: Path) -> tuple[Path, Path, Path]:
    """Random-init SASRec (M = 2), IntTower (exported as `recsys train prerank` does) and PRM
    (with rerank_items.npy built from those two, as `recsys train rerank` does)."""
    ds = load(spec)
    loo = LeaveOneOut(ds)
    torch.manual_seed(0)
    sasrec = MultiLauncherSASRec(SASRecConfig(num_items=ds.num_items, maxlen=20, dim=16, num_blocks=1,
                                              num_launchers=2))
    rt.save_checkpoint(root / "ret", sasrec, ds, spec, {"metrics": {"NDCG@10": 0.05}})
    scorers = {"valid": LastItem(loo, "valid"), "test": LastItem(loo, "test")}
    data = build_next_item_data(ds, loo, scorers, history_len=10, candidates=5, max_train_examples=20)
    tower = pr.build_model("inttower", data.spec, hidden=(16, 8), heads=2, head_dim=4, embed_dim=8)
    pr.save_checkpoint(tower, "inttower", data.spec, root / "pre", ds.fingerprint, objective="next-item")
    export_prerank(tower, data.spec, data.catalog, root / "pre")
    pipe = Pipeline.load(ds, loo, root / "ret", root / "pre")
    heads = json.loads((root / "pre" / PRERANK_MANIFEST).read_text())["outputs"]["user_heads"]
    pv_dim = heads[1] * heads[2]  # (layers, user heads)
    hp = rr.RerankerHParams(d_model=8, heads=1, layers=1, ffn_dim=16)
    prm = PRM(rr.reranker_config("prm", pipe.item_feats.shape[1], pv_dim, 8, hp)).eval()
    imp_cfg = ImpressionConfig(list_len=8, candidates=20)
    stats = PVStats((0.0,) * pv_dim, (1.0,) * pv_dim)
    rr.save_reranker(root / "re" / "prm.pt", "prm", prm, stats, imp_cfg, ds.fingerprint)
    export_rerank(prm, root / "re")
    np.save(root / "re" / RERANK_ITEMS, pipe.item_feats)
    serving = RerankServing(stats, upstream=str(root / "ret"), list_len=8, config=prm.config.to_dict())
    (root / "re" / RERANK_MANIFEST).write_text(serving.to_json())
    return root / "ret", root / "pre", root / "re"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return make_checkpoints(TINY, tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def published(ckpts: tuple[Path, Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One published version (with a re-ranker, serving all three stages) in a module-wide
    artifacts root. Without the item-to-item route: on TINY (Markov by construction) the route
    lifts the retrieval cut so far above these random rankers that the stage gate switches them
    off (tests/training/publish/test_route_tuning.py publishes with the route)."""
    ret, pre, rer = ckpts
    root = tmp_path_factory.mktemp("artifacts")
    publish(TINY, ret, pre, rer, root, version="v1", item2item=None, gate=BELOW_OK)
    return root


def _listing(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_publish_writes_a_version_that_loads(published: Path) -> None:
    ds = load(TINY)
    assert (published / CURRENT).read_text().strip() == "v1"
    assert _listing(published) == [CURRENT, "v1"]  # no temp folder or temp CURRENT left
    v = load_current(published)
    m = v.manifest.to_dict()
    assert v.version == m["version"] == "v1"
    assert m["data"]["fingerprint"] == ds.fingerprint and m["data"]["spec"] == TINY
    assert m["item_count"] == v.num_items == ds.num_items == 80
    assert m["dims"]["num_launchers"] == 2 and m["dims"]["retrieval_dim"] == 16 and m["dims"]["maxlen"] == 20
    assert m["index"]["kind"] == "flat" and m["index"]["ntotal"] == 80
    assert m["index"]["recall@80"] == m["index"]["recall"] == 1.0  # flat index = exact search (k capped at N)
    assert m["retrieval"]["metrics"] == {"NDCG@10": 0.05}
    assert m["retrieval"]["parity_max_abs_diff"] < 1e-4 and m["prerank"]["parity_max_abs_diff"] < 1e-4
    assert m["rerank"]["parity_max_abs_diff"] < 1e-4 and m["rerank"]["config"]["max_len"] == 8
    # catalog: external ids, training-part popularity, item features for filters
    assert v.item_ids[0] == "<pad>" and v.item_ids.tolist() == ds.item_ids.tolist()
    assert v.id_to_index[ds.item_ids[5]] == 5 and "<pad>" not in v.id_to_index
    loo = LeaveOneOut(ds)
    want = np.bincount(ds.items[loo.train_mask], minlength=81)
    np.testing.assert_array_equal(v.popularity, want)
    assert v.popularity.sum() < ds.num_interactions  # validation / test items not counted
    for name, col in ds.item_features.categorical.items():
        np.testing.assert_array_equal(v.item_features.categorical[name], col)
        assert v.item_features.vocab[name] == ds.item_features.vocab[name]
    # arrays and sessions agree with the manifest; one intra-op thread
    assert v.items.shape == (80, 16) and v.index.ntotal == 80
    assert v.prerank_items.shape[0] == 81 and v.rerank_items is not None and v.rerank_items.shape[0] == 81
    assert v.retrieval.get_session_options().intra_op_num_threads == 1
    shapes = smoke_run(v)
    assert shapes["retrieval"] == (1, 2, 16) and shapes["rerank"] == (1, 8)


def test_served_retrieval_matches_the_checkpoint(published: Path, ckpts: tuple[Path, Path, Path]) -> None:
    v = load_current(published)
    model, _ = load_retrieval(ckpts[0], load(TINY))
    seq = np.array([[0, 0, 3, 7, 9], [1, 2, 3, 4, 5]], dtype=np.int64)
    got = v.retrieval.run(None, {"item_seq": seq})[0]
    with torch.no_grad():
        want = model.encode_user(torch.from_numpy(seq)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)  # training/publish/onnx/retrieval.py PARITY_ATOL
    np.testing.assert_allclose(v.items, model.item_embeddings().detach().numpy())


def test_second_publish_keeps_the_first(published: Path, ckpts: tuple[Path, Path, Path], tmp_path: Path) -> None:
    ret, pre, _ = ckpts
    root = tmp_path / "artifacts"
    shutil.copytree(published, root)
    path = publish(TINY, ret, pre, None, root, max_regression=None, gate=BELOW_OK).path  # default name, no re-ranker; random models: no gate
    assert path.parent == root and re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{6}", path.name), path.name
    assert read_current(root) == path.name
    assert load_version(root / "v1").version == "v1"
    assert load_current(root).rerank is None
    assert _listing(root) == sorted([CURRENT, "v1", path.name])


@pytest.mark.parametrize("case", ["min_recall", "corrupt_onnx", "corrupt_checkpoint", "other_data",
                                  "existing_version"])
def test_failed_publish_leaves_current_and_no_temp(case: str, published: Path, ckpts: tuple[Path, Path, Path],
                                                    tmp_path: Path) -> None:
    ret, pre, rer = ckpts
    root = tmp_path / "artifacts"
    shutil.copytree(published, root)
    before = _listing(root)
    kwargs: dict = {"version": "v2"}
    if case == "min_recall":
        err, msg = ValueError, r"min_recall must be in \[0, 1\], got 1.1"
        kwargs["min_recall"] = 1.1
    elif case == "corrupt_checkpoint":
        bad = tmp_path / "ret"
        shutil.copytree(ret, bad)
        data = (bad / "checkpoint.pt").read_bytes()
        (bad / "checkpoint.pt").write_bytes(data[: len(data) // 2])
        ret, err, msg = bad, PublishError, "checkpoint.pt: unreadable checkpoint"
    elif case == "corrupt_onnx":
        bad = tmp_path / "re"
        shutil.copytree(rer, bad)
        (bad / RERANK_ONNX).write_bytes(b"not an onnx model")
        rer, err, msg = bad, PublishError, RERANK_ONNX
    elif case == "other_data":
        other = "synthetic:users=200,items=90,seed=0"
        err, msg = DataError, "checkpoint was trained on another data set"
        published_spec = other
    elif case == "existing_version":
        kwargs["version"] = "v1"
        err, msg = PublishError, "version v1 already exists"
    spec = published_spec if case == "other_data" else TINY
    with pytest.raises(err, match=msg):
        publish(spec, ret, pre, rer, root, **kwargs, gate=BELOW_OK)
    assert _listing(root) == before
    assert read_current(root) == "v1"


def test_recall_below_the_threshold_is_rejected(ckpts: tuple[Path, Path, Path], tmp_path: Path) -> None:
    from service.index_build import IndexSpec

    ret, pre, _ = ckpts
    ivf = IndexSpec(kind="ivf", nlist=2, nprobe=1)  # probing 1 of 2 lists misses part of the exact top-80
    with pytest.raises(PublishError, match=r"index recall@80 = 0\.\d+ is below --min-recall 0\.9"):
        publish(TINY, ret, pre, None, tmp_path, version="v1", min_recall=0.9, index_spec=ivf, gate=BELOW_OK)
    assert _listing(tmp_path) == []
    publish(TINY, ret, pre, None, tmp_path, version="v1", min_recall=0.0, index_spec=ivf, gate=BELOW_OK)
    index = load_current(tmp_path).manifest.to_dict()["index"]
    assert index["kind"] == "ivf" and index["nlist"] == 2 and index["nprobe"] == 1 and index["recall"] < 0.9


def test_offline_metric_regression_against_the_live_version(published: Path, ckpts: tuple[Path, Path, Path],
                                                             tmp_path: Path) -> None:
    ret, pre, _ = ckpts
    root = tmp_path / "artifacts"
    shutil.copytree(published, root)
    worse = tmp_path / "ret"
    model, _ = load_retrieval(ret, load(TINY))
    rt.save_checkpoint(worse, model, load(TINY), TINY, {"metrics": {"NDCG@10": 0.03}})  # live: 0.05
    # the live version records what it serves (manifest serving): the served NDCG@10 is compared
    live_path = root / "v1" / MANIFEST
    live = json.loads(live_path.read_text())
    assert live["serving"]["stages"] == ["retrieval", "prerank", "rerank"]
    live["serving"]["cuts"]["rerank"]["NDCG@10"] = 0.9
    live_path.write_text(json.dumps(live))
    with pytest.raises(PublishError, match=r"served NDCG@10 \(retrieval\+prerank\) 0\.\d{4} is worse than the live "
                                           r"version v1 \(0\.9000\) by more than 0\.01"):
        publish(TINY, ret, pre, None, root, version="v2", item2item=None, gate=BELOW_OK)  # no route: the random pre-ranker stays on
    # a live version without a serving block (published before the stage gate): retrieval NDCG@10
    del live["serving"]
    live_path.write_text(json.dumps(live))
    with pytest.raises(PublishError, match=r"retrieval NDCG@10 0\.0300 is worse than the live version v1 "
                                           r"\(0\.0500\) by more than 0\.01"):
        publish(TINY, worse, pre, None, root, version="v2", gate=BELOW_OK)
    assert _listing(root) == [CURRENT, "v1"] and read_current(root) == "v1"
    publish(TINY, worse, pre, None, root, version="v2", max_regression=0.05, gate=BELOW_OK)
    m = load_current(root).manifest.to_dict()
    assert m["checks"]["regression"] == {"metric": "NDCG@10", "max_regression": 0.05, "live_version": "v1",
                                         "compared": "retrieval NDCG@10", "result": "passed", "live": 0.05, "new": 0.03}
    v1 = load_version(root / "v1").manifest.to_dict()["checks"]["regression"]
    assert v1["result"] == "skipped: no live version"


def test_rerank_from_other_upstream_models_is_rejected(ckpts: tuple[Path, Path, Path], tmp_path: Path) -> None:
    ret, pre, rer = ckpts
    bad = tmp_path / "re"
    shutil.copytree(rer, bad)
    feats = np.load(bad / RERANK_ITEMS)
    np.save(bad / RERANK_ITEMS, feats + 0.5)
    with pytest.raises(PublishError, match="the re-ranker was trained on other retrieval / pre-rank checkpoints"):
        publish(TINY, ret, pre, bad, tmp_path / "a", version="v1", gate=BELOW_OK)
    assert _listing(tmp_path / "a") == []


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("missing_items", "items.npy (files.items) is missing"),
        ("item_count", "items.npy has shape (80, 16), expected (81, 16) from the manifest"),
        ("items_rows", "items.npy has shape (79, 16), expected (80, 16) from the manifest"),
        ("missing_key", "missing keys ['index']"),
        ("folder_name", "version 'v1' does not match the folder 'v9'"),
        ("index_rows", "index.faiss holds 79 vectors of D=16, expected item_count=80 of D=16"),
        ("bad_json", "manifest.json: not valid JSON"),
        ("serving_order", "manifest.json: serving.stages must be a non-empty prefix of ['retrieval', 'prerank', "
                          "'rerank'], got ['retrieval', 'rerank']"),
        ("serving_empty", "serving.stages must be a non-empty prefix"),
        ("serving_rerank", "manifest.json: serving.stages names rerank but the version has no re-ranker"),
    ],
)
def test_load_version_rejects_a_broken_folder(damage: str, message: str, published: Path, tmp_path: Path) -> None:
    import faiss

    folder = tmp_path / ("v9" if damage == "folder_name" else "v1")
    shutil.copytree(published / "v1", folder)
    mpath = folder / MANIFEST
    m = json.loads(mpath.read_text())
    if damage == "missing_items":
        (folder / ITEMS_NPY).unlink()
    elif damage == "item_count":
        m["item_count"] = 81
    elif damage == "items_rows":
        np.save(folder / ITEMS_NPY, np.load(folder / ITEMS_NPY)[:79])
    elif damage == "missing_key":
        del m["index"]
    elif damage == "serving_order":
        m["serving"]["stages"] = ["retrieval", "rerank"]
    elif damage == "serving_empty":
        m["serving"]["stages"] = []
    elif damage == "serving_rerank":
        m["rerank"] = None
    elif damage == "index_rows":
        index = faiss.IndexFlatIP(16)
        index.add(np.load(folder / ITEMS_NPY)[:79])
        faiss.write_index(index, str(folder / INDEX_FAISS))
    if damage == "bad_json":
        mpath.write_text("{")
    else:
        mpath.write_text(json.dumps(m))
    with pytest.raises(ArtifactError) as exc:
        load_version(folder)
    assert message in str(exc.value)


def test_load_current_without_current(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="no CURRENT file"):
        load_current(tmp_path)


def test_service_artifacts_does_not_import_torch() -> None:
    code = "import service.artifacts, sys; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_exports_and_prints_the_summary(ckpts: tuple[Path, Path, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    ret, pre, rer = ckpts
    code, out, _ = _cli(["export", "--data", TINY, "--retrieval", str(ret), "--prerank", str(pre), "--rerank", str(rer),
                         "--out", str(tmp_path), "--version", "cli1", BELOW_OK_FLAG], capsys)
    assert code == 0
    assert f"wrote {tmp_path / 'cli1'}" in out and "recall@80 1.0000" in out and "CURRENT: None -> cli1" in out
    assert read_current(tmp_path) == "cli1"


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--retrieval", "no/such/dir: no retrieval checkpoint.pt there"),
        ("--prerank", "no/such/dir: no pre-rank prerank.pt there"),
        ("--rerank", "no/such/dir: no re-rank prm.pt there"),
    ],
)
def test_cli_bad_path_exits_2_with_one_line(flag: str, message: str, ckpts: tuple[Path, Path, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    ret, pre, rer = ckpts
    paths = {"--retrieval": str(ret), "--prerank": str(pre), "--rerank": str(rer), flag: "no/such/dir"}
    argv = ["export", "--data", TINY, *(x for kv in paths.items() for x in kv), "--out", str(tmp_path / "a")]
    code, _, err = _cli(argv, capsys)
    assert code == 2
    assert err.strip().count("\n") == 0 and message in err, err
    assert not (tmp_path / "a" / CURRENT).exists()


def test_cli_failed_check_exits_1_and_keeps_current(published: Path, ckpts: tuple[Path, Path, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    ret, pre, rer = ckpts
    root = tmp_path / "artifacts"
    shutil.copytree(published, root)
    code, _, err = _cli(["export", "--data", TINY, "--retrieval", str(ret), "--prerank", str(pre),
                         "--out", str(root), "--version", "v1"], capsys)
    assert code == 1
    assert "check failed, CURRENT unchanged (v1): version v1 already exists" in err
    assert read_current(root) == "v1"
