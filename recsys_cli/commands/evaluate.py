"""`recsys evaluate`: full-ranking leave-one-out evaluation of a baseline (`--model`), or of what a
published version serves (`--artifacts`).

--artifacts DIR replays leave-one-out users through the service's own pipeline
(training/eval/served_eval.py) once per served cut: retrieval alone, + pre-rank, + re-rank. One row
per cut on stdout (* = the cuts the version serves by default), then one per trivial baseline
on the same users (training/eval/gate_baselines.py: popularity, last-item, the item-to-item route
alone) and the served cut against the best of them; --json FILE writes {"version", "data",
"split", "cuts": {"retrieval": {...}, "prerank": {...}, "rerank": {...}}, "baselines": {...},
"verdict": {...}}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from recsys_cli.commands import COMMANDS
from recsys_cli.commands.common import add_plot_arg, plot_path
from recsys_cli.errors import UsageError
from training.eval.baselines import BASELINES
from training.data.dataset import DataError
from training.data.sources import SOURCES, load
from training.data.splits import LeaveOneOut
from training.report import result, table, timed, write_json


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("evaluate", help=COMMANDS["evaluate"])
    p.add_argument("--data", metavar="SPEC",
                   help=f"data source: {SOURCES} (default: synthetic for a baseline; the version's own data "
                        "with --artifacts)")
    p.add_argument("--model", choices=sorted(BASELINES), default=None, help="baseline (default popularity)")
    p.add_argument("--artifacts", metavar="DIR",
                   help="evaluate a published version through the served pipeline instead of a baseline")
    p.add_argument("--version", help="with --artifacts: the version (default: CURRENT)")
    p.add_argument("--users", type=int, metavar="N",
                   help="with --artifacts: a seeded sample of N leave-one-out users (default all)")
    p.add_argument("--seed", type=int, default=0, help="with --users: the sample's seed")
    p.add_argument("--split", choices=("valid", "test"), default="test",
                   help="leave-one-out split to score (valid: second-to-last item)")
    p.add_argument("--keep-seen", action="store_true", help="do not remove already-seen items (baselines)")
    p.add_argument("--json", metavar="FILE", help="also write the metrics as JSON")
    add_plot_arg(p, "served_cuts_VERSION.png with --artifacts, else evaluate_MODEL.png",
                 "the served cuts beside the baselines (--artifacts), or HR@K and NDCG@K (a baseline)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.artifacts is not None:
        return run_served(args)
    for flag in ("version", "users"):
        if getattr(args, flag) is not None:
            raise UsageError(f"--{flag} needs --artifacts")
    # torch is imported here, not at module level, so `recsys serve` runs in an image without it
    from training.eval.metrics import KS, evaluate_retrieval

    args.data = args.data or "synthetic"
    model = args.model or "popularity"
    png = plot_path(args, f"evaluate_{model}.png")
    timings: dict[str, float] = {}
    with timed("load", timings):
        ds = load(args.data)
    print(ds.describe())
    with timed("split", timings):
        split = LeaveOneOut(ds)
    with timed("evaluate", timings):
        scorer = BASELINES[model](split, args.split)
        metrics = evaluate_retrieval(scorer, split, args.split, KS, remove_seen=not args.keep_seen)
    print(table({model: metrics}))
    if png is not None:
        from training.plots import at_k_figure, save

        print(f"wrote {save(at_k_figure({model: metrics}, f'{model} on {args.data} ({args.split})'), png)}")
    if args.json:
        write_json(
            args.json,
            result(
                model,
                args.data,
                metrics,
                split=args.split,
                fingerprint=ds.fingerprint,
                users_evaluated=int(split.eval_users.size),
                seconds=timings,
            ),
        )
    return 0


def run_served(args: argparse.Namespace) -> int:
    """--artifacts: the served-cut table of one published version."""
    from service.artifacts import ArtifactError, current_version, load_version
    from service.contract.layout import MANIFEST, ContractError
    from service.contract.manifest import Manifest
    from service.pipeline import served_stages
    from training.eval import gate_baselines as gb
    from training.eval import served_eval as se
    from training.publish.gates import regression_line

    if args.model is not None or args.keep_seen:
        raise UsageError("--model / --keep-seen evaluate a baseline; drop them with --artifacts")
    if args.users is not None and args.users < 1:
        raise UsageError(f"--users must be >= 1, got {args.users}")
    plot_path(args, "")  # matplotlib present before the replay, when --plot asks for it
    root = Path(args.artifacts)
    if not root.is_dir():
        raise UsageError(f"--artifacts {root}: no such folder")
    try:
        name = args.version or current_version(root)
        if not (root / name).is_dir():
            raise UsageError(f"--version {name}: no such version in {root}")
        try:
            data = Manifest.load(root / name / MANIFEST).data
        except ContractError as exc:
            raise ArtifactError(str(exc)) from None
        spec = args.data or str(data.spec)
        ds = load(spec)
        if data.fingerprint not in (None, ds.fingerprint):  # before loading the version: one line
            raise DataError(f"version {name} was built on data with fingerprint {data.fingerprint} "
                            f"({data.spec}), {ds.name} has {ds.fingerprint}")
        timings: dict[str, float] = {}
        with timed("load", timings):
            version = load_version(root / name)
    except ArtifactError as exc:
        raise UsageError(str(exc)) from None
    se.check_data(version, ds)  # DataError (exit 2) for another data set
    print(ds.describe())
    loo = LeaveOneOut(ds)
    users = se.select_users(loo, args.users, args.seed)
    with timed("evaluate", timings):
        ev = se.evaluate_served(version, ds, loo, args.split, users, progress=sys.stderr.isatty())
    with timed("baselines", timings):
        bl = gb.evaluate_baselines(version, ds, loo, args.split, users)
    stages = served_stages(version)
    verdict = gb.baseline_verdict(ev, bl, stages[-1])
    print(f"version {version.version}: {ev.users} {args.split} users, served by default: {' -> '.join(stages)} (*); "
          "baselines on the same users")
    print(se.cut_table(ev.cuts, served=stages, baselines=bl.rows))
    print(verdict.line(ev.users, args.split))
    checks = version.manifest.checks
    if checks is not None:  # the publish gate's record against the version live before it
        print(regression_line(checks.regression))
    print(se.candidate_line(ev.cuts))
    png = plot_path(args, f"served_cuts_{version.version}.png")
    if png is not None:
        from training.plots import save, served_figure

        title = f"version {version.version}: {ev.users} {args.split} users"
        print(f"wrote {save(served_figure(ev.cuts, bl.rows, stages, title), png)}")
    if args.json:
        write_json(args.json, {"version": version.version, "data": spec, "split": args.split,
                               "fingerprint": ds.fingerprint, "users": ev.users, "seed": args.seed,
                               "served_stages": list(stages),
                               "settings": {"retrieval_k": se.RETRIEVAL_K, "prerank_n": se.PRERANK_N},
                               "cuts": ev.cuts, "baselines": bl.rows,
                               "verdict": {"best": verdict.best, "served_minus_best": verdict.diff,
                                           "paired_se": verdict.paired_se, "beats": verdict.beats},
                               "regression": checks.regression.to_dict() if checks is not None else None,
                               "seconds": timings})
    return 0
