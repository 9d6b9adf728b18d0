"""`recsys train prerank`: train a pre-ranker (two-tower, IntTower, DCN-v2) and export it.

--objective ctr        explicit ratings (label = rating > 3, rating 3 dropped), per-user
                       temporal split; test AUC / LogLoss.
--objective next-item  implicit next item vs retrieval candidates plus random items; the
                       retrieval top-C re-ordered, list metrics on leave-one-out test.
Writes DIR/prerank.pt + prerank_features.json and, for the towers, the serving artifacts
DIR/prerank_user.onnx + prerank_items.npy + prerank_manifest.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from recsys_cli.commands.common import add_data_arg, add_plot_arg, add_ranking_fold_args, plot_path, quiet_onnx_exporter
from recsys_cli.errors import UsageError
from training.data.sources import load
from training.report import result, table, timed, write_json


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    from training.stages.prerank.train import MODELS, TrainConfig

    d = TrainConfig()
    p = sub.add_parser("prerank", help="train a pre-ranker (two-tower, IntTower, DCN-v2) and export it")
    add_data_arg(p)
    p.add_argument("--model", choices=sorted(MODELS), default="inttower", help="pre-ranker architecture")
    p.add_argument("--objective", choices=("ctr", "next-item"), default="ctr",
                   help="ctr: rating > 3 labels; next-item: the held-out next item against negatives")
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint and artifact folder")
    p.add_argument("--json", metavar="FILE", help="also write the test metrics as JSON")
    add_plot_arg(p, "OUT/training.png", "the loss and validation metrics per epoch")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed")
    p.add_argument("--epochs", type=int, default=d.epochs, help="epoch cap (training stops earlier on --patience)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="training batch size")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate")
    p.add_argument("--prior-lr", type=float, default=d.prior_lr,
                   help="the pair prior's refit with the towers frozen (a dozen weights and a small MLP over the "
                        "pair features, fit on the training lists at once): Adam learning rate")
    p.add_argument("--prior-steps", type=int, default=d.prior_steps,
                   help="the pair prior's refit: steps at most; cross-fitting over 5 folds of the training lists' "
                        "users chooses the step count, kept only when it beats the incoming prior by more than "
                        "one paired SE (0: no refit)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="weight decay")
    p.add_argument("--patience", type=int, default=d.patience, help="epochs without a validation gain before stopping")
    p.add_argument("--embed-dim", type=int, default=None, help="feature embedding width (default: the model's own)")
    p.add_argument("--hidden", default=None, metavar="H1,H2,...", help="hidden layer sizes")
    p.add_argument("--dropout", type=float, default=None, help="dropout rate (default: the model's own)")
    p.add_argument("--heads", type=int, default=None, help="IntTower heads per layer")
    p.add_argument("--head-dim", type=int, default=None, help="IntTower head size")
    p.add_argument("--no-lightse", action="store_true", help="IntTower without LightSE")
    p.add_argument("--cir-weight", type=float, default=None, help="IntTower CIR weight (default 0.1; 0 = off)")
    p.add_argument("--temperature", type=float, default=d.temperature, help="CIR temperature")
    p.add_argument("--history-len", type=int, default=50, help="history items the user tower reads")
    p.add_argument("--candidates", type=int, default=d.candidates, help="next-item: retrieval top-C")
    p.add_argument("--random-negatives", type=int, default=d.random_negatives,
                   help="next-item: uniformly sampled negatives per positive")
    p.add_argument("--hard-negatives", type=int, default=d.hard_negatives,
                   help="next-item: negatives taken from the retriever's candidates per positive")
    p.add_argument("--retrieval", metavar="DIR", help="next-item: the served SASRec checkpoint (default: last-item)")
    add_ranking_fold_args(p, "next-item: learn on the pre-rank window of a ranking fold of H (default: the "
                             "upstream's holdout; 0 = every training position)")
    p.add_argument("--no-pair-features", action="store_true",
                   help="lists of the retriever alone and the retrieval prior (before the pair features): by default "
                        "the lists are merged with the item-to-item route as served and the prior is learned over "
                        "the pair features (training/stages/prerank/lists.py)")
    p.add_argument("--no-retrieval-features", action="store_true",
                   help="next-item: without the cascade inputs (fused retrieval score, launcher, retriever vectors)")
    p.add_argument("--warm-from", metavar="DIR",
                   help="start the tower from a pre-rank checkpoint folder of another data set (`recsys retrain`: the "
                        "live version's): each field's embedding rows copied by key (item, user, feature value), new "
                        "ones initialised fresh (training/warm_start.py); the prior starts at the retrieval order as "
                        "always. A checkpoint that does not fit is reported in one line and the tower starts anew")
    p.add_argument("--max-train-examples", type=int, default=None, help="next-item: subsample training")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.set_defaults(func=run)


def _hidden(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        sizes = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise UsageError(f"--hidden must be comma-separated integers, got '{text}'") from None
    return sizes


def retrievers(args: argparse.Namespace, ds: Any) -> tuple[Any, str]:
    """(training.stages.prerank.data.Retrievers, the scheme of its lists: in-sample / tail / holdout / kfold) from
    --retrieval / --upstream, both checked against the data."""
    from training.checkpoints import load_retrieval
    from training.stages.prerank.data import Retrievers
    from training.stages.prerank.upstreams import load_upstreams

    # one load per flag, --upstream defaulting to --retrieval: building each model draws from torch's
    # generator, which the pre-ranker's initial weights draw from next
    try:
        served, served_ckpt = load_retrieval(args.retrieval, ds, args.data)
    except (FileNotFoundError, ValueError) as exc:  # DataError / CheckpointError are ValueErrors
        raise UsageError(f"--retrieval: {exc}") from None
    try:
        ups = load_upstreams(args.upstream or args.retrieval, ds, args.data, served)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(f"--upstream: {exc}") from None
    if args.upstream is None and served_ckpt.extra.get("holdout"):
        raise UsageError(f"--retrieval {args.retrieval} was trained with --holdout {served_ckpt.extra['holdout']}: "
                         "pass it as --upstream too (it serves and makes its own ranking lists: the demo's tail "
                         "ranking data), or serve the retriever continued on all the data and pass this one as "
                         "--upstream")
    if args.window is not None and args.window < 0:
        raise UsageError(f"--window must be >= 0, got {args.window}")
    if ups.ranking == "kfold":  # the training table and catalog are the served ones (the folds are aligned to it)
        if not args.no_pair_features:  # one route table per fold is not built yet (training/stages/prerank/data.py)
            print("train prerank: K-fold ranking data: without pair features (the plain retrieval prior)",
                  file=sys.stderr)
        return Retrievers(served, served, window=args.window, features=not args.no_retrieval_features, fold_set=ups,
                          pair=False), ups.ranking
    return Retrievers(served, ups.models[0], holdout=ups.holdout, window=args.window,
                      features=not args.no_retrieval_features, pair=not args.no_pair_features), ups.ranking


def run(args: argparse.Namespace) -> int:
    from training.stages.prerank import train as pr
    from training.publish.onnx.prerank import export_prerank
    from training.stages.prerank.data import CTRData, NextItemData, build_ctr_data, build_next_item_data, retrieval_prior
    from training.data.splits import Split
    from training.eval.metrics import Scorer
    from training.eval.baselines import LastItem
    from training.data.splits import CTRSplit, LeaveOneOut
    from service.contract.layout import PRERANK_FEATURES
    from training.data.features import FeatureSpec
    from training.warm_start import attempt, domain_keys, read_stage, warm_prerank

    quiet_onnx_exporter()  # this command exports its ONNX user tower

    if args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    cir = args.cir_weight if args.cir_weight is not None else (0.1 if args.model == "inttower" else 0.0)
    hparams = {"embed_dim": args.embed_dim, "hidden": _hidden(args.hidden), "dropout": args.dropout,
               "heads": args.heads, "head_dim": args.head_dim, "lightse": False if args.no_lightse else None}
    try:
        cfg = pr.TrainConfig(
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
            patience=args.patience, cir_weight=cir, temperature=args.temperature, candidates=args.candidates,
            random_negatives=args.random_negatives, hard_negatives=args.hard_negatives, seed=args.seed,
            prior_lr=args.prior_lr, prior_steps=args.prior_steps,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.history_len < 1:
        raise UsageError(f"--history-len must be >= 1, got {args.history_len}")

    png = plot_path(args, Path(args.out) / "training.png")
    timings: dict[str, float] = {}
    torch.manual_seed(args.seed)
    with timed("load", timings):
        ds = load(args.data)
    print(ds.describe())
    extra: dict = {}
    data: CTRData | NextItemData
    with timed("features", timings):
        if args.objective == "ctr":
            data = build_ctr_data(ds, CTRSplit(ds), args.history_len)
        else:
            loo = LeaveOneOut(ds)
            if args.retrieval:
                rets, ranking = retrievers(args, ds)
                extra["retrieval"] = {"model": "sasrec", "checkpoint": args.retrieval,
                                      "upstream": args.upstream or args.retrieval, "holdout": rets.holdout,
                                      "window": rets.holdout if args.window is None else args.window,
                                      "cascade_inputs": rets.features,
                                      "ranking_data": ranking}
                if rets.fold_set is not None:
                    extra["retrieval"].update(rets.fold_set.describe(), window=args.window)
                data = build_next_item_data(ds, loo, None, args.history_len, args.candidates,
                                            args.max_train_examples, args.seed, retrievers=rets)
                extra["retrieval"]["train_examples"] = int(data.train_targets.size)
                print(f"pre-rank training examples: {data.train_targets.size} "
                      f"({extra['retrieval']['ranking_data']} lists)")
            else:
                if args.upstream or args.window is not None:
                    raise UsageError("--upstream and --window need --retrieval")
                scorers: dict[Split, Scorer] = {"valid": LastItem(loo, "valid"), "test": LastItem(loo, "test")}
                extra["retrieval"] = {"model": "last-item"}
                data = build_next_item_data(ds, loo, scorers, args.history_len, args.candidates,
                                            args.max_train_examples, args.seed)
    try:
        model = pr.build_model(args.model, data.spec, **hparams)
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    keys = domain_keys(ds, data.spec)
    warm = None
    if args.warm_from:
        warm, line = attempt("train prerank", args.warm_from, lambda: warm_prerank(
            model, data.spec, keys, read_stage(args.warm_from, "prerank"),
            FeatureSpec.load(Path(args.warm_from) / PRERANK_FEATURES)))
        print(line, flush=True)

    def progress(line: str) -> None:
        print(line, file=sys.stderr)

    prior = retrieval_prior(data) if isinstance(data, NextItemData) else None
    if prior is not None and not pr.has_heads(model):
        raise UsageError(f"--model {args.model} cannot take the cascade inputs (no precomputable item side); "
                         "add --no-retrieval-features")
    with timed("train", timings):
        if isinstance(data, CTRData):
            fit = pr.train_ctr(model, data, cfg, progress)
        else:
            fit = pr.train_next_item(model, data, cfg, progress, prior)
    with timed("evaluate", timings):
        if isinstance(data, CTRData):
            metrics = pr.evaluate_ctr(model, data.test)
            columns: tuple[str, ...] = ("AUC", "LogLoss")
            rows = {args.model: metrics}
        else:
            metrics = pr.evaluate_next_item(model, data, "test", prior)
            base = pr.list_quality(data.test.retrieval_scores, data.test)
            extra["retrieval"]["metrics"] = base
            columns = ("NDCG@10", "MAP@10", "P@10", "NDCG@10_all", f"Recall@{args.candidates}")
            rows = {f"retrieval order ({extra['retrieval']['model']})": base, args.model: metrics}
    out = Path(args.out)
    if isinstance(data, NextItemData) and data.route_serving is not None:
        extra["retrieval"]["route_serving"] = data.route_serving  # the lists' route settings (Pipeline reads them)
    with timed("save", timings):
        pr.save_checkpoint(model, args.model, data.spec, out, ds.fingerprint, prior, objective=args.objective,
                           train=pr.train_config_dict(cfg), retrieval=extra.get("retrieval"), keys=keys,
                           warm_start=warm)
        if pr.has_heads(model):
            extra["artifacts"] = export_prerank(model, data.spec, data.catalog, out, prior,
                                                route=data.route_serving if isinstance(data, NextItemData) else None)
    print(table(rows, columns))
    if png is not None:
        from training.plots import history_figure, save

        title = f"{args.model} ({args.objective}) on {args.data}"
        print(f"wrote {save(history_figure({args.model: fit['history']}, title), png)}")
    if args.json:
        write_json(args.json, result(
            args.model, args.data, metrics, objective=args.objective, split="test", fingerprint=ds.fingerprint,
            config=model.cfg.to_dict(), train=pr.train_config_dict(cfg), fit=fit, seconds=timings, **extra,
        ))
    return 0

