"""training/plots.py and the `--plot` flags: the figures draw the numbers they are given, and the
commands write real PNGs (a tiny retrieval run here; `recsys train prerank/rerank --plot` and
`recsys evaluate --artifacts ... --plot` ride on the CLI tests that already train or publish:
tests/training/eval/test_served_eval.py, tests/training/stages/rerank/test_run.py)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib import colors
from matplotlib.image import imread

from recsys_cli import main as cli
from training import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = "synthetic:users=200,items=80,seed=0"


def assert_png(path: Path, min_size: tuple[int, int] = (300, 200)) -> np.ndarray:
    """A real, non-blank PNG of at least min_size (width, height) pixels."""
    assert path.read_bytes()[:8] == PNG_MAGIC, f"{path} is not a PNG"
    pixels = imread(path)
    height, width = pixels.shape[:2]
    assert width >= min_size[0] and height >= min_size[1], pixels.shape
    assert float(pixels[..., :3].std()) > 0.01, "a blank image"
    return pixels


def test_history_figure_draws_each_runs_loss_and_validation_metrics() -> None:
    runs = {
        "prm": [{"epoch": 1, "loss": 0.9, "valid_ndcg10": 0.20, "seconds": 1.0},
                {"epoch": 2, "loss": 0.7, "valid_ndcg10": float("nan"), "seconds": 1.0},
                {"epoch": 3, "loss": 0.6, "valid_ndcg10": 0.25, "seconds": 1.0}],
        # an epoch-0 score of the weights as given (no loss), and a non-numeric field: skipped
        "inttower": [{"epoch": 0, "valid_NDCG@10": 0.10, "prior": {"w": 1.0}},
                     {"epoch": 1, "loss": 2.0, "valid_NDCG@10": 0.12, "prior": {"w": 1.0}}],
    }
    fig = plots.history_figure(runs, "t")
    loss, ndcg_a, ndcg_b = fig.axes
    assert [ax.get_title() for ax in fig.axes] == ["training loss", "validation NDCG@10", "validation NDCG@10"]
    lines = {line.get_label(): line for line in loss.get_lines()}
    assert list(lines["prm"].get_xdata()) == [1, 2, 3] and list(lines["prm"].get_ydata()) == [0.9, 0.7, 0.6]
    assert list(lines["inttower"].get_xdata()) == [1] and list(lines["inttower"].get_ydata()) == [2.0]
    # panels in key order: valid_NDCG@10 (inttower, from epoch 0) then valid_ndcg10 (prm, the NaN left out)
    (it,) = ndcg_a.get_lines()
    assert it.get_label() == "inttower" and list(it.get_xdata()) == [0, 1] and list(it.get_ydata()) == [0.10, 0.12]
    (prm,) = ndcg_b.get_lines()
    assert list(prm.get_xdata()) == [1, 3] and list(prm.get_ydata()) == [0.20, 0.25]


def test_served_figure_bars_are_the_cuts_then_the_baselines() -> None:
    cuts = {"retrieval": {"NDCG@10": 0.30, "HR@10": 0.40}, "prerank": {"NDCG@10": 0.32, "HR@10": 0.41},
            "rerank": {"NDCG@10": 0.31, "HR@10": 0.42}}
    baselines = {"popularity": {"NDCG@10": 0.10, "HR@10": 0.20}, "last-item": {"NDCG@10": 0.25, "HR@10": 0.35}}
    fig = plots.served_figure(cuts, baselines, ["retrieval", "prerank"], "t")
    ndcg, hr = fig.axes
    assert [ndcg.get_title(), hr.get_title()] == ["NDCG@10", "HR@10"]
    labels = [t.get_text() for t in ndcg.get_yticklabels()][::-1]  # top row first
    assert labels == ["retrieval", "+ prerank *", "+ rerank", "baseline popularity", "baseline last-item"]
    for ax, metric in ((ndcg, "NDCG@10"), (hr, "HR@10")):
        widths = [bar.get_width() for bar in ax.patches][::-1]
        assert widths == pytest.approx([cuts[c][metric] for c in cuts] + [baselines[b][metric] for b in baselines])
    fills = [colors.to_hex(bar.get_facecolor()) for bar in ndcg.patches][::-1]
    assert fills == [plots.CUT_COLOR, plots.SERVED_COLOR, plots.CUT_COLOR, plots.BASELINE_COLOR, plots.BASELINE_COLOR]


def test_train_retrieval_plot_writes_the_training_curves(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ret"
    assert cli.main(["train", "retrieval", "--data", TINY, "--out", str(out), "--epochs", "3", "--maxlen", "20",
                     "--dim", "16", "--blocks", "1", "--patience", "5", "--quiet", "--threads", "1",
                     "--json", str(tmp_path / "r.json"), "--plot"]) == 0
    png = out / "training.png"  # the default: beside the checkpoint
    assert f"wrote {png}" in capsys.readouterr().out
    assert_png(png)
    history = json.loads((tmp_path / "r.json").read_text())["training"]["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3] and all(math.isfinite(h["loss"]) for h in history)


def test_evaluate_baseline_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "sub" / "pop.png"
    assert cli.main(["evaluate", "--data", TINY, "--model", "popularity", "--plot", str(png),
                     "--json", str(tmp_path / "e.json")]) == 0
    assert f"wrote {png}" in capsys.readouterr().out
    assert_png(png)
    metrics = json.loads((tmp_path / "e.json").read_text())["metrics"]
    fig = plots.at_k_figure({"popularity": metrics}, "t")
    (hr,) = fig.axes[0].get_lines()
    ks = [int(k) for k in hr.get_xdata()]
    assert ks == sorted(ks) and len(ks) >= 5 and list(hr.get_ydata()) == [metrics[f"HR@{k}"] for k in ks]


def test_plot_without_matplotlib_stops_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails as when absent
    code = cli.main(["train", "retrieval", "--data", TINY, "--out", str(tmp_path / "ret"), "--epochs", "1",
                     "--quiet", "--plot"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == ("recsys train: error: no module 'matplotlib': this command needs the "
                                         "training install (pip install 'recsys[train]')")
    assert not (tmp_path / "ret").exists()  # nothing trained, nothing written
