"""`recsys train retrieval`: train the multi-launcher SASRec and report test metrics."""

from __future__ import annotations

import argparse
import sys

import torch

from models.sasrec import SASRecConfig
from training.commands.common import UsageError, add_data_arg, timed
from training.data.sources import load
from training.data.splits import LeaveOneOut
from training.report import result, table, write_json
from training.retrieval import (
    RetrievalTrainConfig,
    describe,
    evaluate_model,
    load_checkpoint,
    save_checkpoint,
    train_retrieval,
)

COLUMNS = ("HR@1", "HR@10", "HR@50", "HR@100", "NDCG@10", "NDCG@50", "NDCG@100", "Coverage@10", "LauncherEntropy")


def register(stages: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = stages.add_parser("retrieval", help="multi-launcher SASRec (launchers 0 = plain SASRec)")
    add_data_arg(p)
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint folder")
    p.add_argument("--json", metavar="FILE", help="write test metrics as JSON")
    p.add_argument("--launchers", type=int, default=1, metavar="M", help="launcher tokens (0 = plain SASRec)")
    p.add_argument("--launcher-init", choices=("independent", "copy_last"), default="copy_last")
    p.add_argument("--maxlen", type=int, default=50)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--num-negatives", type=int, default=0, help="sampled softmax with K negatives (0 = full)")
    p.add_argument("--patience", type=int, default=10, help="early stopping on validation NDCG@10")
    p.add_argument("--max-minutes", type=float, default=None, help="stop after this much training time")
    p.add_argument("--init-from", metavar="DIR", help="warm-start from a trained retrieval checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    timings: dict[str, float] = {}
    with timed("load", timings):
        ds = load(args.data)
    print(ds.describe())
    split = LeaveOneOut(ds)
    try:
        model_cfg = SASRecConfig(
            num_items=ds.num_items, maxlen=args.maxlen, dim=args.dim, num_blocks=args.blocks,
            num_heads=args.heads, dropout=args.dropout, num_launchers=args.launchers,
            launcher_init=args.launcher_init,
        )
        train_cfg = RetrievalTrainConfig(
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
            num_negatives=args.num_negatives, patience=args.patience, seed=args.seed,
            max_minutes=args.max_minutes,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    source = None
    if args.init_from:
        source, payload = load_checkpoint(args.init_from)
        if payload["fingerprint"] != ds.fingerprint:
            raise UsageError(f"{args.init_from} was trained on other data ({payload['data']})")
    with timed("train", timings):
        try:
            res = train_retrieval(
                split, model_cfg, train_cfg, progress=not args.quiet and sys.stderr.isatty(), init_from=source
            )
        except ValueError as exc:  # warm-start shape mismatch
            raise UsageError(str(exc)) from None
    with timed("evaluate", timings):
        metrics = evaluate_model(res.model, split, "test")
    name = "sasrec" if args.launchers == 0 else f"ml-sasrec(M={args.launchers},{args.launcher_init})"
    print(table({name: metrics}, COLUMNS))
    summary = describe(res)
    extra = {"train_config": train_cfg.__dict__, "training": summary, "seconds": timings, "init_from": args.init_from}
    save_checkpoint(args.out, res.model, ds, args.data, {**extra, "metrics": metrics})
    if args.json:
        write_json(
            args.json,
            result(name, args.data, metrics, fingerprint=ds.fingerprint, model_config=model_cfg.to_dict(), **extra),
        )
    return 0
