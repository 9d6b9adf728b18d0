"""Helpers shared by the sub-commands."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from training.data.sources import SOURCES

# The retriever's settings the demo and retrain train with (one home: both pass these)
DEMO_DROPOUT = 0.2
DEMO_LR = 2e-3


def add_data_arg(parser: argparse.ArgumentParser, default: str | None = "synthetic") -> None:
    parser.add_argument(
        "--data",
        default=default,
        required=default is None,
        metavar="SPEC",
        help=f"data source: {SOURCES} (default: {default})",
    )


def add_plot_arg(parser: argparse.ArgumentParser, default: str, what: str) -> None:
    """--plot [PNG]: also draw `what` as a PNG (training/plots.py, matplotlib)."""
    parser.add_argument("--plot", nargs="?", const="", default=None, metavar="PNG",
                        help=f"also draw {what} as a PNG (needs matplotlib) at PNG (default: {default})")


def plot_path(args: argparse.Namespace, default: str | Path) -> Path | None:
    """Where --plot writes (None without --plot); matplotlib is imported here, so a missing one
    stops the command before it trains, not after."""
    if args.plot is None:
        return None
    from training.plots import require

    require()
    return Path(args.plot or default)


def _not_torchvision(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("torchvision is not installed")


def quiet_onnx_exporter() -> None:
    """The torch ONNX exporter logs every pass at INFO: keep its loggers to warnings. It also
    warns "torchvision is not installed. Skipping torchvision::..." once per torchvision op it
    would register (four lines per export): we export no torchvision op, so those are dropped."""
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    if _not_torchvision not in registration.filters:
        registration.addFilter(_not_torchvision)


def add_ranking_fold_args(p: argparse.ArgumentParser, window_help: str) -> None:
    """--upstream / --window: where a ranker's training lists come from (training/stages/prerank/folds.py)."""
    p.add_argument("--upstream", metavar="DIR",
                   help="what makes the training lists (out of sample, training/stages/prerank/folds.py): the "
                        "retriever trained with --holdout H, or the K fold retrievers of `recsys train retrieval "
                        "--folds K` (each user's lists from the one that never trained on them); default: "
                        "--retrieval (in-sample lists)")
    p.add_argument("--window", type=int, default=None, metavar="H", help=window_help)


def ranker_steps(data: str, retrieval: Path, upstream: Path | None, prerank: Path, rerank: Path,
                 flags: Sequence[str] = (), *, pair_features: bool = True, warm_prerank: str | None = None,
                 warm_rerank: str | None = None) -> list[list[str]]:
    """The rankers' two training commands of a ranking-data scheme (training/stages/prerank/folds.py),
    as `recsys demo` and `recsys retrain` run them: the next-item IntTower pre-ranker, then the PRM
    re-ranker, both on the lists of `upstream` (None: the served retriever's own, in-sample; `tail`:
    the served retriever itself, trained with its holdout) and each with `flags` (epochs, seed).
    pair_features=False when the version is published without the item-to-item route (the pair
    features read it); warm_*: `recsys retrain`'s --warm-from, the live version's checkpoints."""
    up = [] if upstream is None else ["--upstream", str(upstream)]

    def warm(folder: str | None) -> list[str]:
        return ["--warm-from", folder] if folder else []

    return [
        ["train", "prerank", "--data", data, "--model", "inttower", "--objective", "next-item",
         "--retrieval", str(retrieval), *up, *warm(warm_prerank), "--out", str(prerank), *flags,
         *([] if pair_features else ["--no-pair-features"])],
        ["train", "rerank", "--data", data, "--retrieval", str(retrieval), *up, "--prerank", str(prerank),
         *warm(warm_rerank), "--out", str(rerank), *flags],
    ]
