"""`recsys reindex`: publish a new version for the current catalog (new items included) and flip CURRENT.

Recomputes item embeddings (cold start for items without a trained row), pre-rank item heads
and re-rank item features from the live version's checkpoints, re-exports retrieval.onnx,
builds the index, runs the gate and keeps the newest --keep versions; see training/publish/reindex.py.
Step lines (`[step] 1.23s`) go to stderr, the summary to stdout. Exit 0 published, 1 a check
failed (CURRENT unchanged, the reason on stderr), 2 a usage or data error.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from recsys_cli.commands import COMMANDS
from recsys_cli.commands.common import quiet_onnx_exporter
from recsys_cli.errors import UsageError
from training.data.sources import SOURCES
from training.report import timed


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    from recsys_cli.commands.export import add_index_args, add_item2item_arg, add_stage_gate_args
    from training.publish.gates import DEFAULT_MAX_REGRESSION
    from training.publish.versions import DEFAULT_KEEP

    p = sub.add_parser("reindex", help=COMMANDS["reindex"])
    p.add_argument("--artifacts", required=True, metavar="DIR", help="artifacts root (holds <version>/ and CURRENT)")
    p.add_argument("--data", metavar="SPEC", help=f"data source: {SOURCES} (default: the live version's)")
    p.add_argument("--catalog", metavar="FILE", type=Path,
                   help='JSON Lines of {"item_id": ..., "features": {...}} (new or changed items)')
    p.add_argument("--events", metavar="SPEC",
                   help="new interactions since training (a data spec, e.g. csv:<file> or seqtxt:<file>, external "
                        "ids): the item-to-item route's table is rebuilt from the training part plus these")
    p.add_argument("--redis-url", default=os.environ.get("RECSYS_REDIS_URL") or None, metavar="URL",
                   help="pending updates and version announcements (default: $RECSYS_REDIS_URL; "
                        "without it the pending updates are ARTIFACTS/catalog_pending.jsonl)")
    for stage in ("retrieval", "prerank", "rerank"):
        p.add_argument(f"--{stage}", type=Path, metavar="DIR", help=f"{stage} folder (default: the live version's)")
    add_index_args(p)
    add_stage_gate_args(p)
    add_item2item_arg(p)
    p.add_argument("--max-regression", type=float, default=DEFAULT_MAX_REGRESSION,
                   help="largest drop in served NDCG@10 (catalog NDCG@10 for a live version without a serving "
                        "record) allowed against the live version "
                        f"(default {DEFAULT_MAX_REGRESSION})")
    p.add_argument("--keep", type=int, default=DEFAULT_KEEP,
                   help=f"versions kept (default {DEFAULT_KEEP}; CURRENT and the previous one always)")
    p.add_argument("--version", help="version name (default: UTC timestamp + short hash)")
    p.set_defaults(func=run)
    p.description = (__doc__ or "").split("\n\n")[1]


def run(args: argparse.Namespace) -> int:
    from recsys_cli.commands.export import _index_spec, serving_gate, summary
    from training.publish.versions import PublishError, read_current
    from training.publish.reindex import ReindexConfig, reindex

    quiet_onnx_exporter()
    try:
        cfg = ReindexConfig(
            artifacts=Path(args.artifacts), data=args.data, catalog=args.catalog, events=args.events,
            item2item=not args.no_item2item, redis_url=args.redis_url,
            retrieval=args.retrieval, prerank=args.prerank, rerank=args.rerank, index_spec=_index_spec(args),
            min_recall=args.min_recall, max_regression=args.max_regression, keep=args.keep, version=args.version,
            gate=serving_gate(args))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    previous = read_current(cfg.artifacts)
    timings: dict[str, float] = {}
    try:
        with timed("reindex", timings):
            res = reindex(cfg, timings)
    except PublishError as exc:
        print(f"recsys reindex: check failed, CURRENT unchanged ({previous}): {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # a bad --version name or a missing source (DataError is handled by the CLI)
        raise UsageError(str(exc)) from None
    m = res.published.manifest
    c = m.catalog
    assert c is not None and m.checks is not None  # a reindex writes both
    print(f"wrote {res.published.path}")
    print(summary(m))
    print(f"catalog: {m.item_count} items ({c.trained_items} trained, {c.cold_start_items} cold start), "
          f"{c.added} added, {c.changed} changed, base {c.base}")
    print(f"CURRENT: {res.previous} -> {m.version}")
    print(f"pruned: {', '.join(res.pruned) or 'none'}; pending updates cleared: {res.cleared}; "
          f"announced: {'no Redis' if res.notified is None else f'{res.notified} subscriber(s)'}")
    print("timings: " + " ".join(f"{k}={v:.2f}s" for k, v in timings.items()))
    return 0
