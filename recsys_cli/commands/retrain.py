"""`recsys retrain`: retrain every stage on the base data plus the service's event log, by default
continuing from the live version's checkpoints, and publish through the same gate as `recsys export`
(issue 25, "Retrain from the log").

    recsys retrain --artifacts DIR --data SPEC --log log:<folder>|log:redis://... [--work DIR] [--holdout H] [--from-scratch]

1. The data: `--data` (default: the live version's data spec, which must then not be an earlier
   retrain's snapshot) followed by every event of `--log` (training/data/sources.py with_log: new
   users and items get ids like any other, the log's rows after the base data's), written once as
   Parquet tables under WORK/data/<run>/ (the spec the new version records, so `recsys evaluate`
   and the next gate read back exactly the data it was trained on; step 4 keeps it while a version names it).
2. The stages, each the CLI command a user would run, in the ranking-data scheme `recsys demo` uses by
   default (`tail`, training/stages/prerank/folds.py), into WORK/checkpoints/<run>/ (a folder per run:
   the live version's checkpoints, which its manifest names as its sources, are never overwritten,
   even by a run the gate refuses): the served retriever trained without each user's last --holdout
   training items (`train retrieval --holdout`, H from the data by default, tail_holdout as `recsys demo`), then the next-item
   pre-ranker and the re-ranker on its own lists of those items (it is their `--upstream`; the two
   commands are recsys_cli/commands/common.py ranker_steps, as the demo runs them).
   Warm start (the default): the retriever, the pre-ranker and the re-ranker each start from the live
   version's (`--warm-from`: its manifest's prerank / rerank `source`, and for the retriever the live
   version's ranking-fold retriever: its served one when that was trained with a holdout (tail), or
   the fold retriever its pre-ranker recorded as upstream (the older holdout + continued scheme)).
   Item ids are internal to a data set, so every table indexed by one is copied row by row through
   the external id: the retriever's item embedding, each pre-rank field's embedding (items, users,
   feature values); rows of new items are initialised as a fresh model initialises them, items gone
   from the data are dropped (training/warm_start.py). A stage whose checkpoint does not fit
   (another encoder, launcher count, dims or feature set; missing; written before the ids were
   recorded) trains anew, after one line saying why; a live version without a ranking-fold
   retriever (its rankers learned in-sample, or on K folds) has its retriever trained anew. The
   retriever warm-starts from a ranking-fold retriever only, never from one trained on every
   training item: as the log only appends to each user's sequence, the events of the new ranking
   fold (each user's last H training events) were never training events of that chain, so the
   rankers' lists stay out of sample. `--from-scratch`: every stage anew.
3. `recsys export` into --artifacts: the stage gate, the baseline gate (a version below the trivial
   baselines is refused, exit 1, CURRENT unchanged) and the regression check against the live
   version; a serving process picks the new CURRENT up on its next poll or POST /v1/admin/reload.

The regression check across a retrain (new data, so a new fingerprint) replays the live version and
the new one through their served cuts on the new data's validation users (training/publish/gates.py
live_on_new_data) and refuses the new one when it is worse by more than the paired SE; the manifest's
checks.regression records live, new, users and paired SE.
4. Prune WORK (after a publish and after a gate's refusal, never after a failed step): the runs a version
   still kept in --artifacts names (its data.spec and each stage's source: the live version and the
   rollback targets; training/publish/versions.py decides which versions are kept) and the newest
   --keep-runs stay, every other run's WORK/data/<run> and WORK/checkpoints/<run> is deleted. Only
   run_name() folders are touched; a version whose manifest does not load prunes nothing. One WORK
   belongs to one artifacts root (versions of another root that name it are not seen).

Exit 0 published, 1 a gate refused it, 2 a usage or data error.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from recsys_cli.commands import COMMANDS
from recsys_cli.commands.common import DEMO_DROPOUT, DEMO_LR, ranker_steps
from recsys_cli.commands.export import add_item2item_arg
from recsys_cli.errors import UsageError
from training.data.sources import load
from training.data.splits import LeaveOneOut
from training.data.tables import Format
from training.stages.prerank.folds import tail_holdout

SNAPSHOT_FORMAT: Format = "parquet"
RUN_RE = re.compile(r"\d{8}T\d{6}-[0-9a-f]{8}")  # run_name(): only such folders of WORK are ever pruned
RUN_FOLDERS = ("data", "checkpoints")  # WORK/<folder>/<run>/
# runs kept beyond those the kept versions name: the latest attempts (a refused run's checkpoints, to look
# at why) without keeping every week's snapshot and checkpoints for ever
DEFAULT_KEEP_RUNS = 3


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    from training.data.sources import SOURCES
    from training.publish.gates import DEFAULT_MAX_REGRESSION

    p = sub.add_parser("retrain", help=COMMANDS["retrain"])
    p.add_argument("--artifacts", required=True, metavar="DIR", help="artifacts root (holds <version>/ and CURRENT)")
    p.add_argument("--data", metavar="SPEC", help=f"base data: {SOURCES} (default: the live version's)")
    p.add_argument("--log", metavar="SPEC", help="the service's event log: log:<folder> (RECSYS_LOG_DIR) or "
                                                 "log:redis://host:port[/db][?key=<stream>] (default: none, base only)")
    p.add_argument("--work", default="runs/retrain", metavar="DIR",
                   help="the data snapshots and checkpoints the versions record, one WORK/data/<run> and "
                        "WORK/checkpoints/<run> per run (default runs/retrain)")
    p.add_argument("--epochs", type=int, default=None, metavar="E",
                   help="epoch cap of every stage (default: the trainers' own, with early stopping)")
    p.add_argument("--minutes", type=float, default=None, help="retrieval time ceiling")
    p.add_argument("--holdout", type=int, default=None,
                   help="the ranking fold (`tail` ranking data, as `recsys demo`): the served retriever never "
                        "trains on each user's last H training items, the rankers learn on them (default: from "
                        "the data, training/stages/prerank/folds.py tail_holdout, as `recsys demo`)")
    p.add_argument("--max-regression", type=float, default=DEFAULT_MAX_REGRESSION,
                   help=f"passed to `recsys export` (default {DEFAULT_MAX_REGRESSION})")
    p.add_argument("--allow-below-baseline", action="store_true",
                   help="passed to `recsys export`: publish even below the trivial baselines")
    p.add_argument("--version", help="version name (default: UTC timestamp + short hash)")
    p.add_argument("--keep-runs", type=int, default=DEFAULT_KEEP_RUNS, metavar="N",
                   help="after the export (published or refused): delete WORK's run folders except the runs a "
                        "version kept in --artifacts names and the newest N (default %(default)s)")
    p.add_argument("--from-scratch", action="store_true",
                   help="train every stage anew (default: each starts from the live version's checkpoints)")
    add_item2item_arg(p)
    p.set_defaults(func=run)
    p.description = (__doc__ or "").split("\n\n")[0]


@dataclass(frozen=True)
class LiveCheckpoints:
    """The live version's checkpoint folders a warm start reads (None: the version has none)."""

    version: str
    upstream: str | None  # its ranking-fold retriever: the pre-ranker's recorded upstream, when trained with a holdout
    prerank: str | None
    rerank: str | None

    def describe(self) -> str:
        def part(stage: str, folder: str | None) -> str:
            return f"{stage} <- {folder}" if folder else f"{stage} anew (the live version records none)"

        return ", ".join((part("retriever", self.upstream), part("pre-ranker", self.prerank),
                          part("re-ranker", self.rerank)))


def live_checkpoints(root: Path) -> LiveCheckpoints | str:
    """The live version's checkpoint folders (manifest `prerank.source` / `rerank.source`, and the
    ranking-fold retriever the pre-ranker's checkpoint records as its upstream: the served retriever
    itself under `tail`, a separate one under the older holdout scheme; none for in-sample or K-fold
    lists), or why there are none."""
    from service.contract.layout import MANIFEST, ContractError
    from service.contract.manifest import Manifest
    from training.checkpoints import checkpoint_path, read_checkpoint
    from training.publish.versions import read_current
    from training.stages.prerank.folds import is_fold_set

    live = read_current(root)
    if live is None:
        return f"{root} has no live version"
    try:
        m = Manifest.load(root / live / MANIFEST)
    except (OSError, ContractError) as exc:
        return f"the live version's manifest is unreadable ({str(exc).splitlines()[0]})"
    upstream = None
    if m.prerank.source:
        try:
            recorded = read_checkpoint(checkpoint_path(m.prerank.source, "prerank")).extra.get("retrieval") or {}
        except (OSError, ValueError):  # the stage's own --warm-from says why in one line
            recorded = {}
        up = recorded.get("upstream")
        # a K-fold set is not one fold retriever; the served retriever is one only with a holdout (tail)
        if isinstance(up, str) and not is_fold_set(up) and (up != m.retrieval.source or trained_with_holdout(up)):
            upstream = up
    return LiveCheckpoints(live, upstream, m.prerank.source, m.rerank.source if m.rerank is not None else None)


def trained_with_holdout(folder: str) -> bool:
    """Whether the retriever checkpoint in `folder` never trained on each user's last training items."""
    from training.checkpoints import checkpoint_path, read_checkpoint

    try:
        return bool(read_checkpoint(checkpoint_path(folder, "retrieval")).extra.get("holdout"))
    except (OSError, ValueError):  # its --warm-from says why in one line
        return False


def snapshot(base_spec: str, log_spec: str | None, folder: Path) -> str:
    """Write base + log as tables in `folder`; returns the spec that reads them."""
    from training.data.convert import write_tables
    from training.data.sources import read, with_log

    if log_spec is not None and not log_spec.startswith("log:"):
        raise UsageError(f"--log must be a log: spec (log:<folder> or log:redis://...), got {log_spec!r}")
    raw = read(base_spec)
    if log_spec is not None:
        raw = with_log(raw, read(log_spec))
    _files, spec = write_tables(raw, folder, SNAPSHOT_FORMAT)
    return spec


def run_name(base_spec: str, log_spec: str | None) -> str:
    """<UTC stamp>-<8 hex>: one run's data snapshot and checkpoint folders."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    digest = hashlib.sha256(f"{base_spec}\0{log_spec}\0{time.time_ns()}".encode()).hexdigest()[:8]
    return f"{stamp}-{digest}"


def run_of(path: str | None, work: Path) -> str | None:
    """The run whose folder holds `path` (a manifest's data spec or stage source), None for a path outside WORK."""
    if not path:
        return None
    where = Path(path.partition(":")[2].split(",")[0] if ":" in path else path).resolve()
    for folder in RUN_FOLDERS:
        top = (work / folder).resolve()
        if where.is_relative_to(top) and where != top:
            return where.relative_to(top).parts[0]
    return None


def referenced_runs(root: Path, work: Path) -> set[str] | str:
    """The runs a version kept in `root` names (data.spec, each stage's source), or why they cannot be
    known (a version whose manifest does not load: then nothing is pruned)."""
    from service.contract.layout import MANIFEST, ContractError
    from service.contract.manifest import Manifest
    from training.publish.versions import list_versions

    runs: set[str] = set()
    for name, _ in list_versions(root):
        try:
            m = Manifest.load(root / name / MANIFEST)
        except (OSError, ContractError) as exc:
            return f"version {name}'s manifest does not load ({str(exc).splitlines()[0]})"
        paths = (m.data.spec, m.retrieval.source, m.prerank.source, m.rerank.source if m.rerank else None)
        runs |= {r for r in (run_of(p, work) for p in paths) if r is not None}
    return runs


def prune_runs(root: Path, work: Path, keep: int) -> list[str]:
    """Delete WORK/data/<run> and WORK/checkpoints/<run> of every run (a run_name() folder) that no
    version kept in `root` names and that is not among the newest `keep`; returns the runs deleted."""
    refs = referenced_runs(root, work)
    if isinstance(refs, str):
        print(f"retrain: no run pruned: {refs}", file=sys.stderr)
        return []
    runs = sorted({p.name for f in RUN_FOLDERS if (work / f).is_dir() for p in (work / f).iterdir()
                   if p.is_dir() and RUN_RE.fullmatch(p.name)})  # oldest first: names start with a UTC stamp
    doomed = [r for r in runs[: max(0, len(runs) - keep)] if r not in refs]
    for r in doomed:
        for f in RUN_FOLDERS:
            shutil.rmtree(work / f / r, ignore_errors=True)
    return doomed


def run(args: argparse.Namespace) -> int:
    from recsys_cli.main import main as cli
    from service.contract.layout import MANIFEST
    from service.contract.manifest import Manifest
    from training.publish.versions import read_current

    if args.epochs is not None and args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
    if args.minutes is not None and not args.minutes > 0:
        raise UsageError(f"--minutes must be > 0, got {args.minutes}")
    if args.holdout is not None and args.holdout < 1:
        raise UsageError(f"--holdout must be >= 1, got {args.holdout}")
    if args.keep_runs < 0:
        raise UsageError(f"--keep-runs must be >= 0, got {args.keep_runs}")
    root, work = Path(args.artifacts), Path(args.work)
    base = args.data
    if base is None:
        live = read_current(root)
        if live is None:
            raise UsageError(f"--data is needed: {root} has no live version")
        base = Manifest.load(root / live / MANIFEST).data.spec
        if not base or Path(base.partition(":")[2].split(",")[0]).is_relative_to(work / "data"):
            raise UsageError(f"--data is needed: the live version's data ({base!r}) is a retrain's snapshot "
                             "(base + log); give the base data")
    warm: LiveCheckpoints | str | None = None if args.from_scratch else live_checkpoints(root)
    name = run_name(base, args.log)
    spec = snapshot(base, args.log, work / "data" / name)
    print(f"data: {base} + {args.log or 'no log'} -> {spec}", flush=True)
    if warm is None:
        print("retrain: every stage trains anew (--from-scratch)", flush=True)
    elif isinstance(warm, str):
        print(f"retrain: every stage trains anew: {warm}", flush=True)
    else:
        print(f"retrain: warm start from the live version {warm.version}: {warm.describe()}", flush=True)
    from training.stages.retrieval.budget import encoder_maxlen  # imports torch: not at CLI start-up

    split = LeaveOneOut(load(spec))
    holdout = args.holdout if args.holdout is not None else tail_holdout(split)
    ret, pre, rer = (work / "checkpoints" / name / stage for stage in ("retrieval", "prerank", "rerank"))
    src = warm if isinstance(warm, LiveCheckpoints) else LiveCheckpoints("", None, None, None)  # anew: none
    epochs = [] if args.epochs is None else ["--epochs", str(args.epochs)]
    minutes = [] if args.minutes is None else ["--max-minutes", str(args.minutes)]
    steps = [
        # `tail` (recsys demo's default): the served retriever is its own ranking fold and the rankers' --upstream
        ["train", "retrieval", "--data", spec, "--dropout", str(DEMO_DROPOUT), "--lr", str(DEMO_LR), "--quiet",
         "--maxlen", str(encoder_maxlen(split)),
         *epochs, *minutes, "--holdout", str(holdout),
         *(["--warm-from", src.upstream] if src.upstream else []), "--out", str(ret)],
        *ranker_steps(spec, ret, ret, pre, rer, epochs, pair_features=not args.no_item2item,
                      warm_prerank=src.prerank, warm_rerank=src.rerank),
        ["export", "--data", spec, "--retrieval", str(ret), "--prerank", str(pre), "--rerank", str(rer),
         "--out", str(root), "--max-regression", str(args.max_regression),
         *(["--allow-below-baseline"] if args.allow_below_baseline else []),
         *(["--no-item2item"] if args.no_item2item else []), *(["--version", args.version] if args.version else [])],
    ]
    for step in steps:
        print(f"\n$ recsys {' '.join(step)}", flush=True)
        code = int(cli(step))
        if code and not (step[0] == "export" and code == 1):
            return code  # a failed step (not a gate's refusal): the run's folders are left as they are
    # published (0) or refused by a gate (1): WORK back to the runs a kept version names + the newest
    pruned = prune_runs(root, work, args.keep_runs)
    print(f"retrain: pruned {len(pruned)} run(s) of {work}" + (f": {', '.join(pruned)}" if pruned else ""),
          flush=True)
    return code
