"""`recsys demo`: the whole job on the embedded synthetic data.

synthetic data -> baselines table -> multi-launcher SASRec (bounded time) -> IntTower next-item
pre-ranker -> PRM re-ranker -> `recsys export` (ONNX, FAISS index, the item-to-item route with
its request settings chosen on validation users unless --no-item2item, checks, the stage gate,
CURRENT) -> `recsys evaluate --artifacts` (the served-cut table of the published version on the
leave-one-out test users) -> `recsys serve` on :8000 with a sample request printed. Each step is the same CLI command a user
would run; `--no-serve` stops after publishing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from recsys_cli.commands.common import add_data_arg
from recsys_cli.commands.export import add_item2item_arg
from training.eval.baselines import BASELINES
from training.data.sources import load
from training.data.splits import LeaveOneOut
from training.report import table, timed


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("demo", help="train, export and serve the whole pipeline on synthetic data")
    add_data_arg(p, default="synthetic")
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="where the checkpoints go")
    p.add_argument("--artifacts", default="artifacts", metavar="DIR", help="where versions are published")
    p.add_argument("--launchers", type=int, default=2)
    p.add_argument("--minutes", type=float, default=2.0, help="retrieval training time budget")
    p.add_argument("--epochs", type=int, default=3, help="pre-rank and re-rank epochs")
    p.add_argument("--holdout", type=int, default=6,
                   help="ranking fold: each user's last H training items the rankers learn on (default: 6)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--no-serve", action="store_true", help="stop after publishing the artifacts")
    add_item2item_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # torch is imported here, not at module level, so `recsys serve` runs in an image without it
    from models.sasrec import SASRecConfig
    from recsys_cli.main import main as cli
    from training.eval.metrics import evaluate_retrieval
    from training.stages.retrieval.train import (
        RetrievalTrainConfig,
        evaluate_model,
        save_checkpoint,
        train_retrieval,
    )

    timings: dict[str, float] = {}
    out = Path(args.out)
    with timed("load", timings):
        ds = load(args.data)
    print(ds.describe())
    split = LeaveOneOut(ds)
    rows = {}
    with timed("evaluate baselines", timings):
        for name, cls in BASELINES.items():
            rows[name] = evaluate_retrieval(cls(split, "test"), split, "test", progress=False)
    cfg = SASRecConfig(num_items=ds.num_items, dropout=0.2, num_launchers=args.launchers)
    # the ranking fold (training/stages/prerank/folds.py): an upstream retriever without each user's last
    # --holdout training items makes the rankers' lists; the served one is it continued on everything
    fold = RetrievalTrainConfig(epochs=100, lr=2e-3, patience=5, max_minutes=0.6 * args.minutes)
    with timed("train retrieval (ranking fold)", timings):
        up = train_retrieval(LeaveOneOut(ds, holdout=args.holdout), cfg, fold, progress=sys.stderr.isatty())
    save_checkpoint(out / "upstream", up.model, ds, args.data, {"holdout": args.holdout})
    tcfg = RetrievalTrainConfig(epochs=100, lr=2e-3, patience=5, max_minutes=0.4 * args.minutes)
    with timed("train retrieval (continued on all the data)", timings):
        res = train_retrieval(split, cfg, tcfg, progress=sys.stderr.isatty(), init_from=up.model)
    rows[f"ml-sasrec(M={args.launchers})"] = evaluate_model(res.model, split)
    save_checkpoint(out / "retrieval", res.model, ds, args.data, {"init_from": str(out / "upstream")})
    print(table(rows))

    steps = [
        ["train", "prerank", "--data", args.data, "--model", "inttower", "--objective", "next-item",
         "--retrieval", str(out / "retrieval"), "--upstream", str(out / "upstream"), "--out", str(out / "prerank"),
         "--epochs", str(args.epochs)],
        ["train", "rerank", "--data", args.data, "--retrieval", str(out / "retrieval"),
         "--upstream", str(out / "upstream"), "--prerank", str(out / "prerank"), "--out", str(out / "rerank"),
         "--epochs", str(args.epochs)],
        ["export", "--data", args.data, "--retrieval", str(out / "retrieval"), "--prerank", str(out / "prerank"),
         "--rerank", str(out / "rerank"), "--out", args.artifacts, *(["--no-item2item"] if args.no_item2item else [])],
        ["evaluate", "--artifacts", args.artifacts, "--data", args.data],
    ]
    for step in steps:
        print(f"\n$ recsys {' '.join(step)}", flush=True)
        code = cli(step)
        if code:
            return code
    if args.no_serve:
        return 0
    user = ds.user_ids[split.eval_users[0]]
    recent = ", ".join(f'"{ds.item_ids[i]}"' for i in ds.sequence(int(split.eval_users[0]))[-3:])
    print(
        f"\nserving on http://127.0.0.1:{args.port} (Ctrl-C to stop). Try:\n"
        f"  curl -s -X POST localhost:{args.port}/v1/events -H 'content-type: application/json' "
        f"-d '{{\"user_id\": \"{user}\", \"item_id\": \"{ds.item_ids[1]}\"}}'\n"
        f"  curl -s -X POST localhost:{args.port}/v1/recommend -H 'content-type: application/json' "
        f"-d '{{\"user_id\": \"{user}\", \"k\": 5, \"explain\": true}}'\n"
        f"  curl -s -X POST localhost:{args.port}/v1/recommend -H 'content-type: application/json' "
        f"-d '{{\"history\": [{recent}], \"k\": 5}}'\n",
        flush=True,
    )
    if not os.environ.get("RECSYS_API_KEY"):  # writes are closed without a key; the demo serves on loopback only
        os.environ.setdefault("RECSYS_ALLOW_ANONYMOUS_WRITES", "1")
    return cli(["serve", "--artifacts", args.artifacts, "--port", str(args.port)])
