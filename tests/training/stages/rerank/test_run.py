"""`recsys train rerank` (training/stages/rerank/run.py): the CLI is argparse -> configs -> the
library call, which writes the checkpoints, the serving block, the item features and rerank.onnx."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recsys_cli import main as cli
from service.contract.rerank_inputs import RerankServing
from tests.training.stages.rerank.test_impressions import TINY, make_checkpoints, one_thread  # noqa: F401
from training.checkpoints import load_reranker
from training.data.sources import load


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[None, None, Path, Path]:
    ret, pre = make_checkpoints(TINY, tmp_path_factory.mktemp("ckpt"))
    return None, None, ret, pre


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_writes_json_checkpoints_and_onnx(tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, _, ret, pre = tiny
    code, stdout, _ = _cli(["train", "rerank", "--data", TINY, "--retrieval", str(ret), "--prerank", str(pre),
                            "--out", str(tmp_path / "out"), "--json", str(tmp_path / "r.json"), "--list-len", "8",
                            "--candidates", "20", "--epochs", "1", "--d-model", "8", "--layers", "1",
                            "--lists-per-user", "2", "--plot"], capsys)
    assert code == 0
    r = json.loads((tmp_path / "r.json").read_text())
    # --plot: each re-ranker's curves, beside the checkpoints
    assert f"wrote {tmp_path / 'out' / 'training.png'}" in stdout
    assert (tmp_path / "out" / "training.png").read_bytes()[:4] == b"\x89PNG"
    for key in ("before", "prm", "prm_base", "mlp"):
        assert {"NDCG@5", "NDCG@10", "MAP@10", "P@5"} <= set(r[key]), key
        assert 0.0 < r[key]["NDCG@10"] <= 1.0
    assert {"retrieval", "prerank", "rerank_prm", "rerank_prm_base", "rerank_mlp"} <= set(r["end_to_end"])
    # at K = 1 only the order matters, and retrieval -> pre-rank keeps the item set of the top C
    e2e = r["end_to_end"]
    assert e2e["prerank"]["HR@20"] == e2e["rerank_prm"]["HR@20"]  # 20 = C: the re-ranker only reorders
    assert r["artifacts"]["parity_max_abs_diff"] < 1e-4
    for f in ("prm.pt", "prm_base.pt", "mlp.pt", "rerank.onnx", "rerank_items.npy", "rerank_manifest.json"):
        assert (tmp_path / "out" / f).is_file(), f
    ds = load(TINY)
    model, ckpt = load_reranker(tmp_path / "out" / "prm_base.pt", ds)
    assert model.config.pv_dim == 0 and ckpt.extra["impressions"]["list_len"] == 8 and ckpt.name == "prm_base"
    # the serving block is the typed one, byte for byte, and names the served re-ranker's config
    text = (tmp_path / "out" / "rerank_manifest.json").read_text()
    serving = RerankServing.from_dict(json.loads(text))
    assert serving.to_json() == text
    prm, prm_ckpt = load_reranker(tmp_path / "out" / "prm.pt", ds)
    assert serving.config == prm.config.to_dict() and serving.pv.mean == tuple(prm_ckpt.extra["pv_stats"]["mean"])
    assert serving.num_scores == 2 and serving.upstream == str(ret) and serving.list_len == 8
    assert "PRM-BASE" in stdout and "end to end" in stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--retrieval", "no/such/dir"], "--retrieval no/such/dir: no checkpoint.pt there"),
        (["--list-len", "101"], "list_len must be in [1, 100], got 101"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             extra: list[str], message: str) -> None:
    _, _, ret, pre = tiny
    argv = ["train", "rerank", "--data", TINY, "--retrieval", str(ret), "--prerank", str(pre),
            "--out", str(tmp_path), *extra]
    code, _, err = _cli(argv, capsys)
    assert code == 2
    assert err.strip().count("\n") == 0 and message in err, err


def test_cli_rejects_checkpoints_of_another_data_set(tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, _, ret, pre = tiny
    code, _, err = _cli(["train", "rerank", "--data", "synthetic:users=120,items=90,seed=0", "--retrieval", str(ret),
                         "--prerank", str(pre), "--out", str(tmp_path)], capsys)
    assert code == 2 and "the retrieval checkpoint was trained on another data set" in err
    assert "recsys train retrieval --data synthetic:users=120,items=90,seed=0" in err  # how to fix it
