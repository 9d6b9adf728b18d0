"""`recsys export`: publish trained checkpoints as one artifact version and make it CURRENT.

Writes OUT/<version>/ (manifest.json, catalog.npz, retrieval.onnx, items.npy, index.faiss,
prerank_user.onnx, prerank_items.npy, prerank_features.json[, rerank.onnx, rerank_items.npy])
through OUT/.tmp-<version>, then replaces OUT/CURRENT; see training/publish/build.py.
With the item-to-item recall route by default (--no-item2item: without), its request settings
those the pre-ranker's lists were made with (chosen on its ranking lists), or, for a pre-ranker
without a pair prior, chosen here on validation users and replayed by the gate cross-fitted over
folds of them (training/publish/route_tuning.py). Then the stage gate replays
validation users through every served cut and switches off (or, with --require-all-stages,
refuses) a stage that makes the served list worse, then
refuses a served cut that does not beat the trivial baselines on the same users
(--allow-below-baseline publishes it anyway, recorded in the manifest).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from recsys_cli.commands import COMMANDS
from recsys_cli.commands.common import add_data_arg, quiet_onnx_exporter
from recsys_cli.errors import UsageError
from service.contract.manifest import Manifest
from service.contract.stage_blocks import RegressionCheck
from training.report import timed

NDCG10 = "NDCG@10"  # the metric the summary shows (a metric name, not a manifest field)


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    from training.publish.gates import DEFAULT_MAX_REGRESSION

    p = sub.add_parser("export", help=COMMANDS["export"])
    add_data_arg(p, default=None)
    p.add_argument("--retrieval", required=True, metavar="DIR", help="retrieval checkpoint folder")
    p.add_argument("--prerank", required=True, metavar="DIR", help="pre-rank checkpoint + export folder")
    p.add_argument("--rerank", metavar="DIR", help="re-rank folder (prm.pt, rerank.onnx, rerank_items.npy)")
    p.add_argument("--out", required=True, metavar="DIR", help="artifacts root (holds <version>/ and CURRENT)")
    p.add_argument("--version", help="version name (default: UTC timestamp + short hash)")
    p.add_argument("--max-regression", type=float, default=DEFAULT_MAX_REGRESSION,
                   help="largest drop in served NDCG@10 (retrieval's for a live version without a serving "
                        "record) allowed against the live version on the same data "
                        f"(default {DEFAULT_MAX_REGRESSION})")
    p.add_argument("--no-regression-check", action="store_true", help="publish even if worse than the live version")
    add_index_args(p)
    add_stage_gate_args(p)
    add_item2item_arg(p)
    p.add_argument("--item2item", action="store_true",
                   help="accepted for compatibility and ignored: the route is published by default")
    p.add_argument("--i2i-window", type=int, default=None, metavar="W", help="following items counted (default "
                   "from training/stages/retrieval/item2item.py)")
    p.add_argument("--i2i-alpha", type=float, default=None, metavar="A", help="popularity exponent of the follower")
    p.add_argument("--i2i-neighbours", type=int, default=None, metavar="R", help="neighbours kept per item")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from training.publish.publisher import Publisher
    from training.publish.versions import PublishError, read_current

    if args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    if not 0.0 <= args.min_recall <= 1.0:
        raise UsageError(f"--min-recall must be in [0, 1], got {args.min_recall}")
    if args.max_regression < 0:
        raise UsageError(f"--max-regression must be >= 0, got {args.max_regression}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out}: not a folder")
    index_spec = _index_spec(args)
    gate = serving_gate(args)
    item2item = _item2item(args)
    torch.set_num_threads(args.threads)
    quiet_onnx_exporter()
    previous = read_current(args.out)
    publisher = Publisher(args.out, args.min_recall, None if args.no_regression_check else args.max_regression,
                          index_spec, gate)
    timings = publisher.timings
    try:
        with timed("export", timings):
            res = publisher.export(args.data, args.retrieval, args.prerank, args.rerank, args.version, item2item)
    except PublishError as exc:
        print(f"recsys export: check failed, CURRENT unchanged ({previous}): {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # a bad --version name (DataError is handled by the CLI)
        raise UsageError(str(exc)) from None
    print(f"wrote {res.path}")
    for name in sorted(p.name for p in res.path.iterdir()):
        print(f"  {name:24s} {(res.path / name).stat().st_size:>12,d} bytes")
    print(summary(res.manifest))
    print(f"CURRENT: {previous} -> {res.manifest.version}")
    print("timings: " + " ".join(f"{k}={v:.2f}s" for k, v in timings.items()))
    return 0


def add_index_args(p: argparse.ArgumentParser) -> None:
    """--index / --nlist / --nprobe / --min-recall, shared by export and reindex (see _index_spec)."""
    from training.publish.build import DEFAULT_MIN_RECALL

    p.add_argument("--index", choices=("auto", "flat", "hnsw", "ivf"), default="auto",
                   help="index kind (default auto: exact up to 50k items, IVF-Flat beyond)")
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default 2 sqrt(N))")
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists probed per query")
    p.add_argument("--min-recall", type=float, default=DEFAULT_MIN_RECALL,
                   help=f"least index recall@100 against exact search (default {DEFAULT_MIN_RECALL})")


def add_stage_gate_args(p: argparse.ArgumentParser) -> None:
    """--stage-tolerance / --require-all-stages / --allow-below-baseline / --gate-users, shared
    by export and reindex."""
    from training.eval.served_eval import GATE_USERS

    p.add_argument("--stage-tolerance", type=float, default=None, metavar="T",
                   help="switch a stage off when its served cut's NDCG@10 (validation users) is more than T "
                        "(absolute) below the previous cut's (default: when it is worse by more than the paired "
                        "standard error of the difference; inf = never)")
    p.add_argument("--require-all-stages", action="store_true",
                   help="refuse to publish (exit 1, CURRENT unchanged) instead of switching a stage off")
    p.add_argument("--allow-below-baseline", action="store_true",
                   help="publish even when the served cut does not beat the best trivial baseline (popularity, "
                        "last-item, the item-to-item route alone) by more than the paired SE; the manifest "
                        "records it (serving.baselines.allowed_below)")
    p.add_argument("--gate-users", type=int, default=GATE_USERS, metavar="N",
                   help=f"validation users the stage gate replays (seeded sample; default {GATE_USERS})")


def add_item2item_arg(p: argparse.ArgumentParser) -> None:
    """--no-item2item, shared by export, reindex and demo."""
    p.add_argument("--no-item2item", action="store_true",
                   help="publish without the item-to-item recall route (by default its table is built from the "
                        "training part and its request settings chosen on the stage gate's validation users)")


def serving_gate(args: argparse.Namespace) -> Any:
    """The ServingGate the flags of add_stage_gate_args ask for (UsageError on a bad value)."""
    from training.eval.served_eval import ServingGate

    try:
        return ServingGate(tolerance=args.stage_tolerance, require_all_stages=args.require_all_stages,
                           allow_below_baseline=args.allow_below_baseline, users=args.gate_users)
    except ValueError as exc:
        raise UsageError(f"--stage-tolerance / --gate-users: {exc}") from None


def _index_spec(args: argparse.Namespace) -> Any:
    from service.index_build import IndexSpec

    if args.index == "auto":
        if args.nlist is not None or args.nprobe is not None:
            raise UsageError("--nlist / --nprobe need --index ivf")
        return None
    params = {k: v for k, v in (("nlist", args.nlist), ("nprobe", args.nprobe)) if v is not None}
    try:
        return IndexSpec(kind=args.index, **params)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def summary(m: Manifest) -> str:
    """A few lines on what a manifest holds."""
    from training.publish.gates import regression_line

    d, idx, ret, dims, pre = m.data, m.index, m.retrieval, m.dims, m.prerank
    lines = [
        f"version {m.version} created {m.created_at}",
        f"data {d.name} fingerprint {d.fingerprint}: {m.item_count} items, {d.num_users} users",
        f"retrieval: M={dims.num_launchers} D={dims.retrieval_dim} maxlen={dims.maxlen}, "
        f"onnx parity {ret.parity_max_abs_diff:.1e}"
        + (f", NDCG@10 {ret.metrics[NDCG10]:.4f}" if NDCG10 in ret.metrics else ""),
        f"index: {idx.kind} over {idx.ntotal} items, {idx.recall_k} {idx.recall:.4f} (min {idx.min_recall})",
        f"prerank: {pre.model} ({pre.objective}), item heads "
        f"{tuple(dims.prerank_item_heads or ())}, onnx parity {pre.parity_max_abs_diff:.1e}",
    ]
    lines.append(item2item_line(m))
    serving = m.serving
    if serving is not None:
        cuts = ", ".join(f"{name} {c[NDCG10]:.4f}" for name, c in serving.cuts.items())
        lines.append(f"served cuts NDCG@10 ({serving.users} {serving.split} users): {cuts}")
        off = serving.switched_off
        lines.append(f"serving: {' -> '.join(serving.stages or [])}"
                     + (f" (SWITCHED OFF: {', '.join(off)}: {serving.reason})" if off else ""))
        bl = serving.baselines
        if bl is not None:
            rows = ", ".join(f"{name} {r.get(NDCG10, float('nan')):.4f}" for name, r in bl.rows.items())
            verdict = "beats it" if bl.beats else ("BELOW IT, published with --allow-below-baseline"
                                                   if bl.allowed_below else "BELOW IT")
            lines.append(f"baselines NDCG@10 ({serving.users} {serving.split} users): {rows}; served - best "
                         f"({bl.best}) = {bl.served_minus_best or 0.0:+.4f}, paired SE {bl.paired_se or 0.0:.4f}: "
                         f"{verdict}")
    lines.append(regression_line(m.checks.regression if m.checks is not None else RegressionCheck()))
    rr = m.rerank
    lines.append("rerank: none" if rr is None else
                 f"rerank: {rr.model} list_len {rr.serving.list_len if rr.serving else None}, onnx parity {rr.parity_max_abs_diff:.1e}")
    return "\n".join(lines)


def item2item_line(m: Manifest) -> str:
    """One line on the item-to-item route: its table and the request settings it serves with."""
    r = m.item2item
    if r is None:
        return "item2item: none"
    settings = " ".join(f"{k}={v}" for k, v in (r.serving or {}).items())
    t = r.tuning or {}
    how = ("as the rankers' training lists, chosen when they were made" if "from" in t else
           f"chosen from {len(t.get('tried', []))} settings on {t.get('users')} {t.get('split')} users"
           if t else "not tuned")
    return f"item2item: R={r.neighbours} window={r.window} alpha={r.alpha}; serving {settings} ({how})"


def _item2item(args: argparse.Namespace) -> Any:
    """--no-item2item and the table's settings -> an Item2ItemConfig, or None (no route)."""
    from training.stages.retrieval.item2item import Item2ItemConfig

    given = {k: v for k, v in (("window", args.i2i_window), ("alpha", args.i2i_alpha),
                               ("neighbours", args.i2i_neighbours)) if v is not None}
    if args.no_item2item:
        if given or args.item2item:
            what = f"--i2i-{next(iter(given))}" if given else "--item2item"
            raise UsageError(f"{what} contradicts --no-item2item")
        return None
    try:
        return Item2ItemConfig(**given)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
