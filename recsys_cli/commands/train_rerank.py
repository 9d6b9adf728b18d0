"""`recsys train rerank`: PRM, PRM-BASE and a pointwise MLP on impressions from the real pipeline.

The lists come from the trained retrieval (--retrieval) and next-item pre-rank (--prerank)
checkpoints (training/stages/rerank/impressions.py: pre-rank top-N of the retrieval top-C, clicks = items
met within the next T training steps). Each re-ranker is trained listwise with early stopping
on the lists the service would re-rank for the leave-one-out validation users (their next item
is the label); reported: test-list NDCG / MAP / P before and after re-ranking, and the
end-to-end HR / NDCG of the leave-one-out test item (retrieval alone, retrieval -> pre-rank,
retrieval -> pre-rank -> re-rank).

Writes DIR/{prm,prm_base,mlp}.pt (config + weights + PV statistics), DIR/rerank.onnx (the
PRM, checked against eager PyTorch), DIR/rerank_items.npy (N + 1, F) item features and
DIR/rerank_manifest.json (how to build the other inputs at serving time).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recsys_cli.commands.common import (
    add_data_arg,
    add_ranking_fold_args,
    quiet_onnx_exporter,
)
from recsys_cli.errors import UsageError
from training.report import table, timed, write_json

LIST_COLUMNS = ("NDCG@5", "NDCG@10", "MAP@10", "P@5", "slate_acc")
E2E_COLUMNS = ("HR@10", "NDCG@10", "HR@20", "NDCG@20")
ORDER_NAMES = {"before": "before (pre-rank order)", "prm": "PRM", "prm_base": "PRM-BASE", "mlp": "MLP"}


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    from training.stages.rerank.impressions import ImpressionConfig
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
    p.add_argument("--list-len", type=int, default=d.list_len, help=f"pre-rank top N per list (<= 100; default {d.list_len})")
    p.add_argument("--candidates", type=int, default=d.candidates, help="retrieval top C")
    p.add_argument("--horizon", type=int, default=d.horizon, help="T: clicked = met within the next T steps")
    p.add_argument("--lists-per-user", type=int, default=d.lists_per_user, help="training lists per user")
    p.add_argument("--eval-steps", type=int, default=d.eval_steps, help="last steps per user for valid/test lists")
    p.add_argument("--epochs", type=int, default=t.epochs)
    p.add_argument("--patience", type=int, default=t.patience)
    p.add_argument("--batch-size", type=int, default=t.batch_size)
    p.add_argument("--lr", type=float, default=t.lr)
    p.add_argument("--weight-decay", type=float, default=t.weight_decay)
    p.add_argument("--d-model", type=int, default=h.d_model)
    p.add_argument("--layers", type=int, default=h.layers)
    p.add_argument("--heads", type=int, default=h.heads)
    p.add_argument("--dropout", type=float, default=h.dropout)
    p.add_argument("--seed", type=int, default=0, help="re-ranker init and shuffling (the impressions use --data-seed)")
    p.add_argument("--data-seed", type=int, default=d.seed, help="step sampling and the valid/test user split")
    p.add_argument("--no-export", action="store_true", help="skip rerank.onnx")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.set_defaults(func=run)


def _configs(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    from training.stages.rerank.impressions import ImpressionConfig
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
    from training.stages.rerank import impressions as im
    from training.stages.rerank import models as rr
    from training.data.sources import load
    from training.data.splits import LeaveOneOut
    from training.publish.onnx.rerank import export_rerank, rerank_parity
    from training.eval.metrics import evaluate_retrieval
    from training.stages.prerank.train import CHECKPOINT as PRERANK_CKPT
    from training.stages.rerank.train import evaluate_lists, score_lists, unchanged_scores
    from training.stages.retrieval.train import CHECKPOINT as RETRIEVAL_CKPT
    from training.stages.retrieval.train import load_checkpoint, model_scorer

    if args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    imp_cfg, hp, train_cfg = _configs(args)
    _check_dir("--retrieval", args.retrieval, RETRIEVAL_CKPT)
    _check_dir("--prerank", args.prerank, PRERANK_CKPT)
    if args.upstream:
        _check_dir("--upstream", args.upstream, RETRIEVAL_CKPT)

    def progress(line: str) -> None:
        print(line, file=sys.stderr)

    timings: dict[str, float] = {}
    with timed("load", timings):
        ds = load(args.data)
        loo = LeaveOneOut(ds)
        try:
            pipe = im.Pipeline.load(ds, loo, args.retrieval, args.prerank)
            upstream = im.Pipeline.load(ds, loo, args.upstream, args.prerank) if args.upstream else pipe
        except ValueError as exc:  # DataError is a ValueError too: both are the user's input
            raise UsageError(str(exc)) from None
        holdout = int(load_checkpoint(args.upstream)[1].get("holdout") or 0) if args.upstream else 0
        if args.window is not None and args.window < 0:
            raise UsageError(f"--window must be >= 0, got {args.window}")
        imp_cfg = replace(imp_cfg, holdout=holdout if args.window is None else args.window)
    print(ds.describe())
    with timed("impressions", timings):
        # the training lists come from the upstream retriever (out of sample with a holdout); the
        # exported item features and the end-to-end check use the served one
        imp = im.build_impressions(upstream, loo, imp_cfg, progress)
    desc = imp.describe()
    print("impressions: " + ", ".join(f"{n} {desc[n]['lists']} lists ({desc[n]['with_click']} with a click)"
                                      for n in ("train", "valid", "test")))

    # early stopping on what is served: the lists the service re-ranks for the leave-one-out
    # validation users (served retriever + this pre-ranker), labelled with their next item
    with timed("validation lists", timings):
        stop_on = im.leave_one_out_lists(pipe, loo, "valid", imp.pv_stats, imp_cfg)
    results: dict[str, dict[str, float]] = {"before": evaluate_lists(unchanged_scores(imp.test), imp.test)}
    valid: dict[str, dict[str, float]] = {"before": evaluate_lists(unchanged_scores(imp.valid), imp.valid)}
    fits: dict[str, Any] = {}
    models = {}
    out = Path(args.out)
    for name in rr.RERANKERS:
        with timed(f"train {name}", timings):
            fit = rr.fit_reranker(name, imp, hp, train_cfg, valid=stop_on)
        models[name] = fit.model
        results[name] = evaluate_lists(score_lists(fit.model, imp.test), imp.test)
        valid[name] = evaluate_lists(score_lists(fit.model, imp.valid), imp.valid)
        fits[name] = fit.describe()
        progress(f"{name}: best epoch {fit.best_epoch}, valid NDCG@10 {fit.best_valid_ndcg10:.4f}, "
                 f"test NDCG@10 {results[name]['NDCG@10']:.4f}")
        rr.save_reranker(out / f"{name}.pt", name, fit.model, imp.pv_stats, imp_cfg, fingerprint=ds.fingerprint,
                         train=asdict(train_cfg))
    artifacts: dict[str, Any] = {}
    with timed("save", timings):
        np.save(out / "rerank_items.npy", pipe.item_feats)
        manifest = {
            "model": "PRM", "onnx": "rerank.onnx", "item_features": "rerank_items.npy",
            "item_feats": "rerank_items.npy[item] (N + 1, F): [retrieval embedding ; mean pre-rank item head ; "
                          "log1p count], z-scored over the catalog; row 0 = padding",
            "pv": "(pre-rank per (layer, user head) max over item heads of the dot product - pv_mean) / pv_std",
            "pv_mean": list(imp.pv_stats.mean), "pv_std": list(imp.pv_stats.std),
            "init_score": "pre-rank score z-scored within the list (real entries)"
                          + ("; (1, n, 2) with the fused retrieval score z-scored the same way as [..., 1]"
                             if imp_cfg.retrieval_score else ""),
            "num_scores": 2 if imp_cfg.retrieval_score else 1, "upstream": args.upstream or args.retrieval,
            "holdout": imp_cfg.holdout,
            "list_len": imp_cfg.list_len, "config": models["prm"].config.to_dict(),
        }
        (out / "rerank_manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if not args.no_export:
            quiet_onnx_exporter()
            path = export_rerank(models["prm"], out)
            artifacts = {"onnx": str(path), "parity_max_abs_diff": rerank_parity(models["prm"], path),
                         "real_lists_max_abs_diff": _real_list_parity(models["prm"], path, imp.test)}
    with timed("end-to-end", timings):
        e2e = {"retrieval": evaluate_retrieval(model_scorer(pipe.retrieval), loo, "test", ks=im.E2E_KS, progress=False)}
        e2e.update(im.end_to_end(pipe, loo, models, imp.pv_stats, imp_cfg, progress=progress))

    print(f"\ntest lists (N = {imp_cfg.list_len}, T = {imp_cfg.horizon}, {int(results['before']['lists'])} lists with a click)")
    print(table({ORDER_NAMES[k]: v for k, v in results.items()}, LIST_COLUMNS))
    print(f"\nend to end, leave-one-out test ({loo.eval_users.size} users)")
    print(table(e2e, E2E_COLUMNS))
    if artifacts:
        print(f"\nrerank.onnx parity: max |onnx - eager| {artifacts['parity_max_abs_diff']:.2e} (random lists), "
              f"{artifacts['real_lists_max_abs_diff']:.2e} (test lists)")
    if args.json:
        write_json(args.json, {
            **results, "valid": valid, "end_to_end": e2e, "data": args.data, "fingerprint": ds.fingerprint,
            "retrieval": args.retrieval, "prerank": args.prerank, "impressions": desc,
            "hparams": asdict(hp), "train": asdict(train_cfg), "fits": fits, "artifacts": artifacts,
            "seconds": timings,
        })
    return 0


def _real_list_parity(model: Any, path: Path, data: Any, n: int = 256) -> float:
    """Max |ONNX - eager| over the real entries of the first n test lists (checked as rerank_parity does)."""
    import onnxruntime as ort

    from training.publish.onnx.rerank import OUTPUT_NAME, PARITY_ATOL, PARITY_RTOL, pv_width

    part = data.take(slice(0, n))
    pv = part.pv if model.config.pv_dim else np.zeros((*part.mask.shape, pv_width(model)), np.float32)
    feeds = {"item_feats": part.item_feats, "pv": pv, "init_score": part.scores(), "mask": part.mask}
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run([OUTPUT_NAME], feeds)[0]
    with torch.no_grad():
        want = model(*part.tensors()).numpy()
    np.testing.assert_allclose(got[part.mask], want[part.mask], atol=PARITY_ATOL, rtol=PARITY_RTOL)
    return float(np.abs(got[part.mask] - want[part.mask]).max())
