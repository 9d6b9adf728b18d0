"""Helpers shared by the sub-commands."""

from __future__ import annotations

import argparse
import logging

from training.data.sources import SOURCES


def add_data_arg(parser: argparse.ArgumentParser, default: str | None = "synthetic") -> None:
    parser.add_argument(
        "--data",
        default=default,
        required=default is None,
        metavar="SPEC",
        help=f"data source: {SOURCES} (default: {default})",
    )


def quiet_onnx_exporter() -> None:
    """The torch ONNX exporter logs every pass at INFO: keep its loggers to warnings."""
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def add_ranking_fold_args(p: argparse.ArgumentParser, window_help: str) -> None:
    """--upstream / --window: where a ranker's training lists come from (training/stages/prerank/folds.py)."""
    p.add_argument("--upstream", metavar="DIR",
                   help="what makes the training lists (out of sample, training/stages/prerank/folds.py): the "
                        "retriever trained with --holdout H, or the K fold retrievers of `recsys train retrieval "
                        "--folds K` (each user's lists from the one that never trained on them); default: "
                        "--retrieval (in-sample lists)")
    p.add_argument("--window", type=int, default=None, metavar="H", help=window_help)
