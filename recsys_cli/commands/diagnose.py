"""`recsys diagnose`: how sequential is the data, and how does the model use it."""

from __future__ import annotations

import argparse

from recsys_cli.commands import COMMANDS
from recsys_cli.commands.common import add_data_arg
from training.data.sources import load
from training.data.splits import LeaveOneOut
from training.report import table, timed, write_json

COLUMNS = ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10", "NDCG@50")


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("diagnose", help=COMMANDS["diagnose"])
    add_data_arg(p, default=None)
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="retrieval checkpoint folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the history shuffle")
    p.add_argument("--json", metavar="FILE", help="also write the diagnostics as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # torch is imported here, not at module level, so `recsys serve` runs in an image without it
    from training.eval.diagnostics import diagnose
    from training.checkpoints import load_retrieval

    timings: dict[str, float] = {}
    with timed("load", timings):
        ds = load(args.data)
    model, _ = load_retrieval(args.checkpoint, ds, args.data)  # DataError (exit 2) for another data set
    with timed("diagnose", timings):
        rows = diagnose(model, LeaveOneOut(ds), seed=args.seed)
    print(table(rows, COLUMNS))
    if args.json:
        write_json(args.json, {"data": args.data, "checkpoint": str(args.checkpoint), "rows": rows})
    return 0
