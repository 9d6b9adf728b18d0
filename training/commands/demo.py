"""`recsys demo`: the main job on the embedded synthetic data.

Today: load the synthetic data set, evaluate the baselines, train a small multi-launcher
SASRec for a bounded time, export it to ONNX (checked against eager PyTorch), build the FAISS
index (recall measured against exact search), print the table and one user's fused top 10.
Pre-ranking, re-ranking and serving join as those stages land.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models.sasrec import SASRecConfig
from training.baselines import BASELINES
from training.commands.common import add_data_arg, timed
from training.data.sources import load
from training.data.splits import LeaveOneOut
import numpy as np
import onnxruntime as ort

from service.index import load_index, search_fused
from training.export import build_item_index, export_retrieval, retrieval_parity
from training.metrics import evaluate_retrieval
from training.report import table
from training.retrieval import RetrievalTrainConfig, evaluate_model, save_checkpoint, train_retrieval


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("demo", help="run the whole job on the embedded synthetic data")
    add_data_arg(p, default="synthetic")
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="where the checkpoint and ONNX go")
    p.add_argument("--launchers", type=int, default=2)
    p.add_argument("--minutes", type=float, default=2.0, help="training time budget")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    timings: dict[str, float] = {}
    with timed("load", timings):
        ds = load(args.data)
    print(ds.describe())
    split = LeaveOneOut(ds)
    rows = {}
    with timed("evaluate baselines", timings):
        for name, cls in BASELINES.items():
            rows[name] = evaluate_retrieval(cls(split, "test"), split, "test", progress=False)
    cfg = SASRecConfig(num_items=ds.num_items, dropout=0.2, num_launchers=args.launchers)
    tcfg = RetrievalTrainConfig(epochs=100, lr=2e-3, patience=5, max_minutes=args.minutes)
    with timed("train retrieval", timings):
        res = train_retrieval(split, cfg, tcfg, progress=sys.stderr.isatty())
    rows[f"ml-sasrec(M={args.launchers})"] = evaluate_model(res.model, split)
    out = Path(args.out)
    with timed("export", timings):
        save_checkpoint(out, res.model, ds, args.data, {})
        onnx_path, items_path = export_retrieval(res.model, out)
        diff = retrieval_parity(res.model, onnx_path)
    with timed("index", timings):
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        hist = split.histories("test", maxlen=cfg.maxlen)
        users = sess.run(None, {"item_seq": hist[:512]})[0]  # (B, M, D)
        index_info = build_item_index(np.load(items_path), users, out)
    print(table(rows))
    print(f"\nexported {onnx_path} and {items_path} (ONNX vs eager max |diff| {diff:.1e})")
    print(f"index: {index_info}")
    # one user through the retrieval stage as the service will run it: ONNX -> FAISS -> max-fusion
    index = load_index(out / str(index_info["file"]))
    fused = search_fused(index, users[0], k=10, exclude=hist[0])
    items, scores, launchers = fused.user(0)
    print(f"user {ds.user_ids[split.eval_users[0]]}: top-10 items", ", ".join(
        f"{ds.item_ids[i]} (launcher {l}, {s:.2f})" for i, s, l in zip(items, scores, launchers)
    ))
    return 0
