"""Pre-ranking training: CIR by hand, tiny seeded runs that must beat baselines, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from recsys_cli import main as cli
from training.stages.prerank import train as pr
from training.stages.prerank.data import build_ctr_data, build_next_item_data
from training.eval.baselines import LastItem
from training.checkpoints import load_prerank
from training.data.sources import load
from training.data.splits import CTRSplit, LeaveOneOut
from training.eval.metrics import auc

TINY = "synthetic:users=500,items=200,seed=0"


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def test_cir_uses_the_diagonal_as_target() -> None:
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    v = torch.tensor([[0.0, 2.0], [3.0, 0.0]])  # normalised: row 0 -> e2, row 1 -> e1
    # logits = [[0, 1], [1, 0]] / tau; targets are columns 0 and 1 (the diagonal)
    expected = math.log(1 + math.e)  # -log(e^0 / (e^0 + e^1)) for both rows
    assert pr.cir_loss(u, v, temperature=1.0).item() == pytest.approx(expected, rel=1e-6)
    # swapping the items puts each positive on the diagonal: the loss drops to log(1 + e^-1)
    assert pr.cir_loss(u, v.flip(0), temperature=1.0).item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)
    # temperature scales the logits
    assert pr.cir_loss(u, v, temperature=0.5).item() == pytest.approx(math.log(1 + math.exp(2)), rel=1e-6)


def test_cir_masks_in_batch_copies_of_the_positive_item() -> None:
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    v = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    ids = torch.tensor([7, 7, 9])  # rows 0 and 1 hold the same item: not each other's negative
    logits = torch.tensor([[1.0, -math.inf, 0.0], [-math.inf, 0.0, 1.0], [0.0, 0.0, 0.0]])
    logits[2] = torch.tensor([1, 1, 1]) / math.sqrt(2)
    logits[2, 1] = 1 / math.sqrt(2)
    expected = torch.nn.functional.cross_entropy(logits, torch.arange(3)).item()
    assert pr.cir_loss(u, v, 1.0, ids).item() == pytest.approx(expected, rel=1e-6)
    assert pr.cir_loss(u[:1], v[:1], 1.0).item() == 0.0  # one pair has no in-batch negative


def test_train_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        pr.TrainConfig(temperature=0)
    with pytest.raises(ValueError, match="cir_weight must be >= 0, got -1"):
        pr.TrainConfig(cir_weight=-1)
    with pytest.raises(ValueError, match="unknown pre-ranking model 'foo'"):
        pr.build_model("foo", None)  # type: ignore[arg-type]


def test_tiny_ctr_run_inttower_beats_item_mean_baseline() -> None:
    ds = load(TINY)
    split = CTRSplit(ds)
    data = build_ctr_data(ds, split, history_len=20)
    baseline = auc(data.test.labels, split.aggregates()["item_mean_label"][ds.items[split.test_idx]])
    torch.manual_seed(0)
    model = pr.build_model("inttower", data.spec, hidden=(64, 32), heads=4, head_dim=8)
    fit = pr.train_ctr(model, data, pr.TrainConfig(epochs=3, patience=0, cir_weight=0.1, seed=0))
    m = pr.evaluate_ctr(model, data.test)
    assert m["AUC"] > 0.65 and m["AUC"] > baseline, (m, baseline)
    assert m["LogLoss"] < math.log(2)  # better than a coin
    assert fit["best_valid_AUC"] == max(h["valid_AUC"] for h in fit["history"])


def test_tiny_next_item_run_beats_random_order() -> None:
    ds = load(TINY)
    loo = LeaveOneOut(ds)
    scorers = {"valid": LastItem(loo, "valid"), "test": LastItem(loo, "test")}
    data = build_next_item_data(ds, loo, scorers, history_len=20, candidates=50)
    assert data.test.candidates.shape == (loo.eval_users.size, 50)
    # candidates never contain the user's history (seen items are removed before top-C)
    hist = loo.histories("test", maxlen=20)
    assert not (data.test.candidates[:, :, None] == hist[:, None, :]).any()
    # the next-item user side is what a request carries (no user id / profile): a few more epochs
    torch.manual_seed(0)
    model = pr.build_model("inttower", data.spec, hidden=(64, 32), heads=4, head_dim=8)
    pr.train_next_item(model, data, pr.TrainConfig(epochs=8, patience=8, lr=3e-3, cir_weight=0.1, seed=0))
    m = pr.evaluate_next_item(model, data, "test")
    rng = np.random.default_rng(0)
    rand = pr.list_quality(rng.random(data.test.candidates.shape), data.test)
    assert m["NDCG@10"] > rand["NDCG@10"] + 0.04, (m["NDCG@10"], rand["NDCG@10"])


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_ctr_writes_json_and_artifacts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code, stdout, _ = _cli(["train", "prerank", "--data", TINY, "--model", "inttower", "--objective", "ctr",
                            "--out", str(out), "--json", str(tmp_path / "m.json"), "--epochs", "1",
                            "--hidden", "32,16", "--heads", "2", "--head-dim", "4", "--history-len", "10"], capsys)
    assert code == 0 and "AUC" in stdout
    payload = json.loads((tmp_path / "m.json").read_text())
    assert payload["model"] == "inttower" and payload["data"] == TINY and payload["objective"] == "ctr"
    assert set(payload["metrics"]) == {"AUC", "LogLoss"}
    assert 0.5 < payload["metrics"]["AUC"] <= 1.0
    for name in ("prerank.pt", "prerank_features.json", "prerank_user.onnx", "prerank_items.npy", "prerank_manifest.json"):
        assert (out / name).is_file(), name
    items = np.load(out / "prerank_items.npy")
    assert items.dtype == np.float32 and items.shape == (201, 2, 4)  # (N + 1, H, d)
    model, spec, ckpt = load_prerank(out, load(TINY))
    assert ckpt.extra["objective"] == "ctr" and ckpt.name == "inttower" and model.cfg.heads == 2


def test_cli_next_item_json_has_list_metrics(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, _ = _cli(["train", "prerank", "--data", "synthetic:users=150,items=100", "--model", "two-tower",
                            "--objective", "next-item", "--out", str(tmp_path / "r"), "--json", str(tmp_path / "n.json"),
                            "--epochs", "1", "--hidden", "16", "--candidates", "30", "--history-len", "8"], capsys)
    assert code == 0 and "retrieval order (last-item)" in stdout
    payload = json.loads((tmp_path / "n.json").read_text())
    assert {"NDCG@10", "MAP@10", "P@10", "Recall@30"} <= set(payload["metrics"])
    assert payload["retrieval"]["model"] == "last-item" and "NDCG@10" in payload["retrieval"]["metrics"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--heads", "0"], "heads must be >= 1, got 0"),
        (["--hidden", "32,x"], "--hidden must be comma-separated integers, got '32,x'"),
        (["--temperature", "0"], "temperature must be > 0, got 0.0"),
        (["--data", "nope:x"], "unknown data source 'nope:x'"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    argv = ["train", "prerank", "--data", "synthetic:users=60,items=40", "--out", str(tmp_path), "--epochs", "1", *extra]
    code, _, err = _cli(argv, capsys)
    lines = [ln for ln in err.splitlines() if "error" in ln]
    assert code == 2
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    assert lines[0].startswith("recsys train: error: ") and message in lines[0], err


def test_cli_ctr_without_ratings_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "seq.txt"
    f.write_text("u1 a b c d\nu2 b c d e\n")
    code, _, err = _cli(["train", "prerank", "--data", f"seqtxt:{f}", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and err.strip().splitlines()[-1] == (
        "recsys train: error: seq.txt: the CTR split needs ratings, and this data set has none")
