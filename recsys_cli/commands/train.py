"""`recsys train <stage>`: one sub-command per model stage.

Each stage module exposes `register(sub)` and adds its own parser under `recsys train`.
"""

from __future__ import annotations

import argparse
import importlib

from recsys_cli.commands import COMMANDS

# stage modules under recsys_cli/commands/, in the order `recsys train --help` lists them
STAGES = ["train_retrieval", "train_prerank", "train_rerank"]


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("train", help=COMMANDS["train"])
    stages = p.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name in STAGES:
        importlib.import_module(f"recsys_cli.commands.{name}").register(stages)
