"""`recsys evaluate`: full-ranking leave-one-out evaluation of a baseline."""

from __future__ import annotations

import argparse

from training.baselines import BASELINES
from training.commands.common import add_data_arg, timed
from training.data.sources import load
from training.data.splits import LeaveOneOut
from training.report import result, table, write_json


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("evaluate", help="evaluate a baseline with leave-one-out full ranking")
    add_data_arg(p)
    p.add_argument("--model", choices=sorted(BASELINES), default="popularity")
    p.add_argument("--split", choices=("valid", "test"), default="test")
    p.add_argument("--keep-seen", action="store_true", help="do not remove already-seen items")
    p.add_argument("--json", metavar="FILE", help="also write the metrics as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # torch is imported here, not at module level, so `recsys serve` runs in an image without it
    from training.metrics import KS, evaluate_retrieval

    timings: dict[str, float] = {}
    with timed("load", timings):
        ds = load(args.data)
    print(ds.describe())
    with timed("split", timings):
        split = LeaveOneOut(ds)
    with timed("evaluate", timings):
        scorer = BASELINES[args.model](split, args.split)
        metrics = evaluate_retrieval(scorer, split, args.split, KS, remove_seen=not args.keep_seen)
    print(table({args.model: metrics}))
    if args.json:
        write_json(
            args.json,
            result(
                args.model,
                args.data,
                metrics,
                split=args.split,
                fingerprint=ds.fingerprint,
                users_evaluated=int(split.eval_users.size),
                seconds=timings,
            ),
        )
    return 0
