"""`recsys train rerank`: PRM, PRM-BASE and a pointwise MLP on impressions from the real pipeline.

The lists come from the trained retrieval (--retrieval) and next-item pre-rank (--prerank)
checkpoints (training/stages/rerank/impressions.py: pre-rank top-N of the retrieval top-C, clicks = items
met within the next T training steps). Each re-ranker is trained listwise with early stopping
on the lists the service would re-rank for the leave-one-out validation users (their next item
is the label); reported: test-list NDCG / MAP / P before and after re-ranking, and the
end-to-end HR / NDCG of the leave-one-out test item (retrieval alone, retrieval -> pre-rank,
retrieval -> pre-rank -> re-rank). The work and the files it writes: training/stages/rerank/run.py.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from recsys_cli.commands.common import (
    add_data_arg,
    add_plot_arg,
    add_ranking_fold_args,
    plot_path,
    quiet_onnx_exporter,
)
from recsys_cli.errors import UsageError
from service.contract.layout import PRERANK_CHECKPOINT, RETRIEVAL_CHECKPOINT
from training.report import table, timed, write_json
from training.stages.prerank.folds import FOLD_MAP, is_fold_set

LIST_COLUMNS = ("NDCG@5", "NDCG@10", "MAP@10", "P@5", "slate_acc")
E2E_COLUMNS = ("HR@10", "NDCG@10", "HR@20", "NDCG@20")
ORDER_NAMES = {"before": "before (pre-rank order)", "prm": "PRM", "prm_base": "PRM-BASE", "mlp": "MLP"}


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    from training.stages.rerank.sampling import ImpressionConfig
    from training.stages.rerank.models import RerankerHParams
    from training.stages.rerank.train import RerankTrainConfig

    d, h, t = ImpressionConfig(), RerankerHParams(), RerankTrainConfig()
    p = sub.add_parser("rerank", help="train PRM / PRM-BASE / MLP re-rankers on pipeline impressions")
    add_data_arg(p)
    p.add_argument("--retrieval", required=True, metavar="DIR", help="retrieval (SASRec) checkpoint folder")
    p.add_argument("--prerank", required=True, metavar="DIR", help="next-item pre-rank checkpoint folder")
    add_ranking_fold_args(p, "learn on the re-rank window of a ranking fold of H (default: the upstream's "
                             "holdout; 0 = steps sampled from the whole training part)")
    p.add_argument("--no-residual", action="store_true",
                   help="re-rankers start from random scores instead of the pre-rank order (models/prm.py)")
    p.add_argument("--no-retrieval-score", action="store_true",
                   help="the re-ranker sees only the pre-rank score, not also the fused retrieval score")
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint and artifact folder")
    p.add_argument("--json", metavar="FILE", help="also write the metrics as JSON")
    add_plot_arg(p, "OUT/training.png", "each re-ranker's loss and validation metrics per epoch")
    p.add_argument("--list-len", type=int, default=d.list_len,
                   help=f"pre-rank top N per list (<= 100; default {d.list_len})")
    p.add_argument("--candidates", type=int, default=d.candidates, help="retrieval top C")
    p.add_argument("--horizon", type=int, default=d.horizon, help="T: clicked = met within the next T steps")
    p.add_argument("--lists-per-user", type=int, default=d.lists_per_user, help="training lists per user")
    p.add_argument("--eval-steps", type=int, default=d.eval_steps, help="last steps per user for valid/test lists")
    p.add_argument("--epochs", type=int, default=t.epochs, help="epoch cap (training stops earlier on --patience)")
    p.add_argument("--patience", type=int, default=t.patience, help="epochs without a validation gain before stopping")
    p.add_argument("--batch-size", type=int, default=t.batch_size, help="lists per training batch")
    p.add_argument("--lr", type=float, default=t.lr, help="Adam learning rate")
    p.add_argument("--weight-decay", type=float, default=t.weight_decay, help="weight decay")
    p.add_argument("--d-model", type=int, default=h.d_model, help="transformer width")
    p.add_argument("--layers", type=int, default=h.layers, help="transformer encoder layers")
    p.add_argument("--heads", type=int, default=h.heads, help="attention heads")
    p.add_argument("--dropout", type=float, default=h.dropout, help="dropout rate")
    p.add_argument("--seed", type=int, default=0, help="re-ranker init and shuffling (the impressions use --data-seed)")
    p.add_argument("--data-seed", type=int, default=d.seed, help="step sampling and the valid/test user split")
    p.add_argument("--warm-from", metavar="DIR",
                   help="start PRM, PRM-BASE and the MLP from a re-rank folder of another data set (`recsys retrain`: "
                        "the live version's; training/warm_start.py); when one does not fit (another config, feature "
                        "width), one line says so and all three start anew")
    p.add_argument("--no-export", action="store_true", help="skip rerank.onnx")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.set_defaults(func=run)


def _configs(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    from training.stages.rerank.sampling import ImpressionConfig
    from training.stages.rerank.models import RerankerHParams
    from training.stages.rerank.train import RerankTrainConfig

    try:
        imp = ImpressionConfig(list_len=args.list_len, candidates=args.candidates, horizon=args.horizon,
                               lists_per_user=args.lists_per_user, eval_steps=args.eval_steps, seed=args.data_seed,
                               retrieval_score=not args.no_retrieval_score)
        hp = RerankerHParams(d_model=args.d_model, heads=args.heads, layers=args.layers,
                             ffn_dim=2 * args.d_model, dropout=args.dropout, residual=not args.no_residual)
        train = RerankTrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                  weight_decay=args.weight_decay, patience=args.patience, seed=args.seed)
        # the model configs validate d_model / heads / dropout
        from training.stages.rerank.models import reranker_config

        for name in ("prm", "mlp"):
            reranker_config(name, 1, 1, imp.list_len, hp)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return imp, hp, train


def _check_dir(flag: str, path: str, marker: str) -> None:
    if not (Path(path) / marker).is_file():
        raise UsageError(f"{flag} {path}: no {marker} there")


def run(args: argparse.Namespace) -> int:
    from training.stages.rerank.run import open_upstream, train_rerank

    if args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    imp_cfg, hp, train_cfg = _configs(args)
    _check_dir("--retrieval", args.retrieval, RETRIEVAL_CHECKPOINT)
    _check_dir("--prerank", args.prerank, PRERANK_CHECKPOINT)
    if args.upstream:  # one retriever, or a K-fold set (its fold map; load_upstreams checks the folds)
        _check_dir("--upstream", args.upstream, FOLD_MAP if is_fold_set(args.upstream) else RETRIEVAL_CHECKPOINT)

    png = plot_path(args, Path(args.out) / "training.png")

    def progress(line: str) -> None:
        print(line, file=sys.stderr)

    timings: dict[str, float] = {}
    with timed("load", timings):
        try:
            up = open_upstream(args.data, args.retrieval, args.prerank, args.upstream)
            imp_cfg = up.impression_config(imp_cfg, args.window)
        except ValueError as exc:  # DataError and CheckpointError are ValueErrors too: all the user's input
            raise UsageError(str(exc)) from None
    print(up.ds.describe())
    if not args.no_export:
        quiet_onnx_exporter()
    r = train_rerank(up, args.out, imp_cfg, hp, train_cfg, export=not args.no_export, progress=progress,
                     warm_from=args.warm_from, notice=lambda line: print(line, flush=True))
    timings.update(r.timings)
    desc = r.impressions
    print("impressions: " + ", ".join(f"{n} {desc[n]['lists']} lists ({desc[n]['with_click']} with a click)"
                                      for n in ("train", "valid", "test")))
    print(f"\ntest lists (N = {imp_cfg.list_len}, T = {imp_cfg.horizon}, {int(r.results['before']['lists'])} lists with a click)")
    print(table({ORDER_NAMES[k]: v for k, v in r.results.items()}, LIST_COLUMNS))
    print(f"\nend to end, leave-one-out test ({up.loo.eval_users.size} users)")
    print(table(r.end_to_end, E2E_COLUMNS))
    if r.artifacts:
        print(f"\nrerank.onnx parity: max |onnx - eager| {r.artifacts['parity_max_abs_diff']:.2e} (random lists), "
              f"{r.artifacts['real_lists_max_abs_diff']:.2e} (test lists)")
    if png is not None:
        from training.plots import history_figure, save

        runs = {name: f["history"] for name, f in r.fits.items()}
        print(f"wrote {save(history_figure(runs, f're-rankers on {args.data}'), png)}")
    if args.json:
        write_json(args.json, {
            **r.results, "valid": r.valid, "end_to_end": r.end_to_end, "data": args.data,
            "fingerprint": up.ds.fingerprint, "retrieval": args.retrieval, "prerank": args.prerank,
            "impressions": desc, "hparams": asdict(hp), "train": asdict(train_cfg), "fits": r.fits,
            "artifacts": r.artifacts, "seconds": timings,
        })
    return 0
