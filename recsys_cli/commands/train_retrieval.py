"""`recsys train retrieval`: train a retrieval encoder (multi-launcher SASRec, HSTU or MIND) and report
test metrics."""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from models.hstu import HSTUConfig
from models.mind import MINDConfig
from models.sasrec import SASRecConfig
from recsys_cli.commands.common import add_data_arg, add_plot_arg, plot_path
from recsys_cli.errors import UsageError
from training import distributed
from training.checkpoints import RetrievalModel, load_retrieval
from training.data.sources import load
from training.data.splits import LeaveOneOut
from training.stages.retrieval.encoders import ENCODERS, RetrievalConfig, build_model
from training.report import result, table, timed, write_json
from training.warm_start import attempt, read_stage, warm_retrieval
from training.stages.retrieval.losses import SAMPLERS
from training.stages.retrieval.train import (
    RetrievalTrainConfig,
    describe,
    evaluate_model,
    save_checkpoint,
    train_retrieval,
)

COLUMNS = ("HR@1", "HR@10", "HR@50", "HR@100", "NDCG@10", "NDCG@50", "NDCG@100", "Coverage@10", "LauncherEntropy")


def register(stages: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = stages.add_parser(
        "retrieval",
        help="multi-launcher SASRec (launchers 0 = plain SASRec)",
        description="Train the multi-launcher SASRec retriever. Data-parallel under torchrun, e.g. "
        "torchrun --nproc_per_node=2 --no-python recsys train retrieval ... (gloo, DDP; rank 0 "
        "validates, prints and writes the checkpoint).",
    )
    add_data_arg(p)
    p.add_argument(
        "--encoder", choices=sorted(ENCODERS), default="sasrec",
        help="sasrec (M = --launchers, 1 for 0), hstu (M = 1) or mind (M = --interests) (default: sasrec)",
    )
    p.add_argument("--interests", type=int, default=4, metavar="K", help="mind: interest capsules K (default: 4)")
    p.add_argument("--routing-iters", type=int, default=3, help="mind: dynamic-routing iterations (default: 3)")
    p.add_argument("--label-power", type=float, default=2.0, help="mind: p of label-aware attention (default: 2)")
    p.add_argument("--head-dim", type=int, default=32, help="hstu: per-head width of Q, K, V, U (default: 32)")
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint folder")
    p.add_argument("--json", metavar="FILE", help="write test metrics as JSON")
    add_plot_arg(p, "OUT/training.png", "the loss and validation NDCG@10 per epoch")
    p.add_argument("--launchers", type=int, default=1, metavar="M", help="launcher tokens (0 = plain SASRec)")
    p.add_argument("--launcher-init", choices=("independent", "copy_last"), default="copy_last",
                   help="launcher token initialisation: learned independently, or launcher + last-item embedding")
    p.add_argument("--maxlen", type=int, default=50, help="history items the encoder reads (the most recent)")
    p.add_argument("--dim", type=int, default=64, help="embedding width D")
    p.add_argument("--blocks", type=int, default=2, help="transformer blocks")
    p.add_argument("--heads", type=int, default=1, help="attention heads per block")
    p.add_argument("--dropout", type=float, default=0.5, help="dropout rate")
    p.add_argument("--epochs", type=int, default=200, help="epoch cap (training stops earlier on --patience)")
    p.add_argument(
        "--batch-size", type=int, default=128,
        help="global batch; under torchrun each of the W ranks trains on batch/W of it (default: 128)",
    )
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--weight-decay", type=float, default=0.0, help="weight decay")
    p.add_argument("--num-negatives", type=int, default=0, help="sampled softmax with K negatives (0 = full)")
    p.add_argument(
        "--sampler", choices=SAMPLERS, default="uniform",
        help="how negatives are drawn: K uniform or popularity-proportional items shared by the batch, or "
        "the batch's own targets (in-batch; needs --num-negatives 0) (default: uniform)",
    )
    p.add_argument("--no-logq", action="store_true", help="no logQ correction of the sampled negatives")
    p.add_argument("--patience", type=int, default=10, help="early stopping on NDCG@10 of the validation items (and, with --holdout, the held-out ones)")
    p.add_argument("--average-best", type=int, default=RetrievalTrainConfig.average, metavar="K",
                   help="keep the average of the K best epochs' weights when it validates higher than the best "
                        "epoch alone (1: the best epoch; default: %(default)s)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop after this much training time")
    p.add_argument("--init-from", metavar="DIR", help="warm-start from a trained retrieval checkpoint of the same data")
    p.add_argument(
        "--warm-from", metavar="DIR",
        help="start from a retrieval checkpoint of another data set (`recsys retrain`: the live version's): item "
        "rows copied by external id, new items initialised fresh (training/warm_start.py); a checkpoint that does "
        "not fit (another encoder, launcher count, dims) is reported in one line and training starts anew",
    )
    p.add_argument(
        "--holdout", type=int, default=0, metavar="H",
        help="ranking fold: leave each user's last H training items out, so the pre-ranker and re-ranker "
        "can learn on lists this model did not train on (training/stages/prerank/folds.py); the served retriever "
        "is then this one continued on all the data with --init-from (default: 0)",
    )
    p.add_argument(
        "--folds", type=int, default=0, metavar="K",
        help="K-fold ranking data: train K retrievers, each without one fold of the users, into OUT/fold-k "
        "(+ OUT/folds.json, folds dealt with --seed); pass OUT as the rankers' --upstream, and serve a "
        "retriever trained on all the data (training/stages/prerank/folds.py) (default: 0, one retriever)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (and the K-fold deal)")
    p.add_argument(
        "--threads", type=int, default=None,
        help="torch intra-op threads per process (default: all cores; under torchrun cores / ranks)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def model_config(args: argparse.Namespace, num_items: int) -> RetrievalConfig:
    """The encoder's config from the command line (ValueError on a bad value)."""
    if args.encoder == "hstu":
        return HSTUConfig(
            num_items=num_items, maxlen=args.maxlen, dim=args.dim, num_blocks=args.blocks, num_heads=args.heads,
            head_dim=args.head_dim, dropout=args.dropout,
        )
    if args.encoder == "mind":
        return MINDConfig(
            num_items=num_items, maxlen=args.maxlen, dim=args.dim, num_interests=args.interests,
            routing_iters=args.routing_iters, label_power=args.label_power, dropout=args.dropout,
        )
    return SASRecConfig(
        num_items=num_items, maxlen=args.maxlen, dim=args.dim, num_blocks=args.blocks, num_heads=args.heads,
        dropout=args.dropout, num_launchers=args.launchers, launcher_init=args.launcher_init,
    )


def run(args: argparse.Namespace) -> int:
    with distributed.process_group(args.threads):  # a no-op unless launched by torchrun
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    rank0 = distributed.is_rank0()
    png = plot_path(args, Path(args.out) / "training.png")
    timings: dict[str, float] = {}
    with timed("load", timings) if rank0 else nullcontext():
        ds = load(args.data)
    if rank0:
        print(ds.describe())
    try:
        split = LeaveOneOut(ds, holdout=args.holdout)
        model_cfg = model_config(args, ds.num_items)
        train_cfg = RetrievalTrainConfig(
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
            num_negatives=args.num_negatives, sampler=args.sampler, logq=not args.no_logq,
            patience=args.patience, average=args.average_best, seed=args.seed, max_minutes=args.max_minutes,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.folds:
        if args.holdout:
            raise UsageError("--folds and --holdout are two ranking-data schemes: give one")
        if distributed.world_size() > 1:
            raise UsageError("--folds trains in one process (not under torchrun)")
        return _run_folds(args, ds, model_cfg, train_cfg, timings)
    if args.warm_from and (args.init_from or args.folds):
        raise UsageError("--warm-from starts one retriever from another data set's checkpoint: not with "
                         "--init-from or --folds")
    source = resume = None
    warm: dict[str, Any] | None = None
    if args.warm_from:
        resume, warm = _warm(args, ds, model_cfg, rank0)
    if args.init_from:
        try:
            source, _ = load_retrieval(args.init_from, ds, args.data)
        except ValueError as exc:  # DataError / CheckpointError: the user's input
            raise UsageError(f"--init-from: {exc}") from None
    with timed("train", timings) if rank0 else nullcontext():
        try:
            res = train_retrieval(
                split, model_cfg, train_cfg, progress=not args.quiet and sys.stderr.isatty(), init_from=source,
                resume=resume,
            )
        except ValueError as exc:  # warm-start shape mismatch
            raise UsageError(str(exc)) from None
    if not rank0:  # every rank holds the same trained weights; rank 0 reports and saves them
        return 0
    with timed("evaluate", timings):
        metrics = evaluate_model(res.model, split, "test")
    name = {
        "sasrec": "sasrec" if args.launchers == 0 else f"ml-sasrec(M={args.launchers},{args.launcher_init})",
        "hstu": "hstu", "mind": f"mind(K={args.interests})",
    }[args.encoder]
    print(table({name: metrics}, COLUMNS))
    summary = describe(res)
    extra = {
        "train_config": train_cfg.__dict__, "training": summary, "seconds": timings, "init_from": args.init_from,
        "world_size": distributed.world_size(), "holdout": args.holdout, "warm_start": warm,
    }
    save_checkpoint(args.out, res.model, ds, args.data, {**extra, "metrics": metrics})
    if png is not None:
        from training.plots import history_figure, save

        print(f"wrote {save(history_figure({name: summary['history']}, f'{name} on {args.data}'), png)}")
    if args.json:
        write_json(
            args.json,
            result(name, args.data, metrics, fingerprint=ds.fingerprint, model_config=model_cfg.to_dict(), **extra),
        )
    return 0


def _warm(args: argparse.Namespace, ds: Any, model_cfg: RetrievalConfig,
          rank0: bool) -> tuple[RetrievalModel | None, dict[str, Any]]:
    """--warm-from: a fresh model (drawn from --seed, as train_retrieval draws one) filled from the
    checkpoint; (None, the record) when it does not fit, after one line saying so."""
    torch.manual_seed(args.seed)
    model = build_model(model_cfg)
    record, line = attempt("train retrieval", args.warm_from, lambda: warm_retrieval(
        model, read_stage(args.warm_from, "retrieval"), ds.item_ids.tolist()))
    if rank0:
        print(line, flush=True)
    return (None if "skipped" in record else model), record


def _run_folds(args: argparse.Namespace, ds: Any, model_cfg: RetrievalConfig, train_cfg: RetrievalTrainConfig,
               timings: dict[str, float]) -> int:
    """--folds K: the K fold retrievers and the fold map under --out (training/stages/prerank/upstreams.py)."""
    from training.stages.prerank.folds import FoldMap
    from training.stages.prerank.upstreams import train_fold_set

    try:
        fmap = FoldMap.assign(ds, args.folds, args.seed)
    except ValueError as exc:
        raise UsageError(f"--folds: {exc}") from None

    def train(k: int, split: LeaveOneOut) -> Any:
        with timed(f"train fold {k}", timings):
            res = train_retrieval(split, model_cfg, train_cfg, progress=not args.quiet and sys.stderr.isatty())
        print(f"fold {k}/{args.folds}: {res.summary()}", flush=True)
        return res

    results = train_fold_set(ds, args.data, args.out, fmap, train, {"train_config": train_cfg.__dict__,
                                                                    "seconds": timings})
    if args.json:
        write_json(args.json, {"data": args.data, "fingerprint": ds.fingerprint, "folds": args.folds,
                               "model_config": model_cfg.to_dict(), "seconds": timings,
                               "training": [describe(r) for r in results]})
    return 0
