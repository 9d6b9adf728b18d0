"""`recsys demo`: the main job on the embedded synthetic data.

For now: load the synthetic data set, evaluate the baselines, print the table. Later stages
(train -> export -> index -> serve) are added as they land.
"""

from __future__ import annotations

import argparse

from training.baselines import BASELINES
from training.commands.common import add_data_arg, timed
from training.data.sources import load
from training.data.splits import LeaveOneOut
from training.metrics import evaluate_retrieval
from training.report import table


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("demo", help="run the whole job on the embedded synthetic data")
    add_data_arg(p, default="synthetic")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    timings: dict[str, float] = {}
    with timed("load", timings):
        ds = load(args.data)
    print(ds.describe())
    split = LeaveOneOut(ds)
    rows = {}
    with timed("evaluate baselines", timings):
        for name, cls in BASELINES.items():
            rows[name] = evaluate_retrieval(cls(split, "test"), split, "test")
    print(table(rows))
    return 0
