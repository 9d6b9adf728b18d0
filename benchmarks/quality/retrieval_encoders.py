"""Retrieval encoders side by side: popularity, last-item, SASRec, multi-launcher SASRec, HSTU,
MIND (K = 2, 4), under one leave-one-out split and one training budget per row.

    python benchmarks/quality/retrieval_encoders.py --data movielens:../shared/data/ml-100k \\
        --out runs/encoders/ml100k --epochs 30 --patience 5 --latency

Every trained row gets the same budget (--epochs, early stopping with --patience on validation
NDCG@10, optional --max-minutes), from scratch, seed --seed. Columns: HR@10/50,
NDCG@10/50/100 with full ranking and the user's whole history removed, Coverage@10 (share of
the catalog in some user's top 10), diversity@10 (training.eval.diversity): embedding diversity of
the top-10 lists with the row's own item embeddings (`div_own`) and with one fixed reference
table, the SASRec row's (`div_ref`, comparable across rows), category diversity (`div_cat`,
the data set's first multi-valued item field, or --categories-from for a data set without
one, matched by external item id), training sequences/s (mean over epochs; a contended figure
on a shared machine).

Served path (--served, default on): each trained row is exported to ONNX
(training.publish.onnx.retrieval.export_retrieval, parity-checked), the test histories are encoded by ONNX
Runtime (1 thread), and the top 100 come from an exact FAISS index with max-fusion over the M
user vectors and the history excluded (service.index.search_fused, what the service runs);
`served NDCG@10` beside the offline one. --latency: encode-stage latency of each ONNX graph at
batch 1 (p50/p99 over --latency-calls calls, onnxruntime with 1 thread, history of maxlen).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from models.hstu import HSTUConfig
from models.mind import MINDConfig
from models.sasrec import SASRecConfig
from service.index import search_fused
from service.index_build import IndexSpec, build_index
from training.eval.baselines import LastItem, Popularity
from training.data.sources import load
from training.data.splits import LeaveOneOut
from training.eval.diversity import category_diversity, embedding_diversity
from training.stages.retrieval.encoders import RetrievalConfig, RetrievalModel
from training.publish.onnx.retrieval import export_retrieval, retrieval_parity
from training.eval.metrics import Scorer, mask_seen, ranking_metrics, target_ranks
from training.report import table, write_json
from training.checkpoints import load_retrieval
from training.stages.retrieval.train import RetrievalTrainConfig, describe, model_scorer, save_checkpoint, train_retrieval

ROWS = ("popularity", "last-item", "sasrec", "ml-sasrec-M2", "hstu", "mind-K2", "mind-K4")
COLUMNS = ("HR@10", "HR@50", "NDCG@10", "NDCG@50", "NDCG@100", "Coverage@10", "div_own@10", "div_ref@10",
           "div_cat@10", "served_NDCG@10", "seq/s")
REFERENCE_ROW = "sasrec"
TOP = 100


def row_config(name: str, num_items: int, a: argparse.Namespace) -> RetrievalConfig:
    common = {"num_items": num_items, "maxlen": a.maxlen, "dim": a.dim, "dropout": a.dropout}
    if name == "sasrec":
        return SASRecConfig(**common, num_launchers=0)
    if name.startswith("ml-sasrec-M"):
        return SASRecConfig(**common, num_launchers=int(name.rsplit("M", 1)[1]), launcher_init="copy_last")
    if name == "hstu":
        return HSTUConfig(**{**common, "dropout": a.hstu_dropout}, num_heads=a.hstu_heads, head_dim=a.hstu_head_dim,
                          num_blocks=a.hstu_blocks)
    if name.startswith("mind-K"):
        return MINDConfig(**common, num_interests=int(name.rsplit("K", 1)[1]), label_power=a.label_power)
    raise ValueError(f"unknown row {name!r}; known: {ROWS}")


def ranked_lists(scorer: Scorer, split: LeaveOneOut, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Offline full ranking on the test split: (B,) target ranks and (B, TOP) top lists."""
    targets = split.targets("test")
    ranks, tops = [], []
    for start in range(0, targets.size, batch_size):
        idx = np.arange(start, min(start + batch_size, targets.size))
        hist = split.histories("test", idx)
        scores = np.array(scorer(hist), dtype=np.float32, copy=True)
        mask_seen(scores, hist)
        ranks.append(target_ranks(scores, targets[idx]))
        tops.append(torch.topk(torch.from_numpy(scores), min(TOP, scores.shape[1] - 1), dim=1).indices.numpy())
    return np.concatenate(ranks), np.concatenate(tops)


def quality(ranks: np.ndarray, tops: np.ndarray, num_items: int) -> dict[str, float]:
    m = ranking_metrics(ranks, (10, 50, 100))
    m["Coverage@10"] = float(np.unique(tops[:, :10]).size / num_items)
    return m


def served(model: RetrievalModel, split: LeaveOneOut, folder: Path) -> dict[str, Any]:
    """ONNX + exact FAISS + max-fusion on the test users: NDCG@10 and the parity of the export."""
    onnx_path, items_path = export_retrieval(model, folder)
    parity = retrieval_parity(model, onnx_path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    index = build_index(np.load(items_path), IndexSpec(kind="flat"))
    targets = split.targets("test")
    ranks = np.full(targets.size, 10**9, dtype=np.int64)  # a target outside the top 100 is a miss
    for start in range(0, targets.size, 256):
        idx = np.arange(start, min(start + 256, targets.size))
        full = split.histories("test", idx)
        users = sess.run(None, {"item_seq": full[:, -model.config.maxlen :].astype(np.int64)})[0]  # (b, M, D)
        hits = search_fused(index, users, TOP, exclude=[h[h > 0] for h in full])
        row, col = np.nonzero(hits.items == targets[idx, None])
        ranks[idx[row]] = col
    m = ranking_metrics(ranks, (10, 50, 100))
    return {"served_NDCG@10": m["NDCG@10"], "served_HR@10": m["HR@10"], "parity_max_abs_diff": parity,
            "onnx": str(onnx_path)}


def encode_latency(onnx_path: str, maxlen: int, num_items: int, calls: int, seed: int = 0) -> dict[str, float]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    seqs = rng.integers(1, num_items + 1, size=(calls + 20, 1, maxlen)).astype(np.int64)
    for s in seqs[:20]:  # warm-up
        sess.run(None, {"item_seq": s})
    ms = []
    for s in seqs[20:]:
        t0 = time.perf_counter()
        sess.run(None, {"item_seq": s})
        ms.append((time.perf_counter() - t0) * 1e3)
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def categories_of(ds: Any, spec: str | None) -> np.ndarray | None:
    """(N + 1, C) category codes of ds's items: its own first multi field, or another data set's by item id."""
    src = load(spec) if spec else ds
    if src.item_features is None or not src.item_features.multi:
        return None
    codes = next(iter(src.item_features.multi.values()))
    if src is ds:
        return codes
    where = {str(x): i for i, x in enumerate(src.item_ids)}
    out = np.zeros((ds.item_ids.size, codes.shape[1]), dtype=codes.dtype)
    for i, x in enumerate(ds.item_ids[1:], start=1):
        if str(x) in where:
            out[i] = codes[where[str(x)]]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="movielens:../shared/data/ml-100k")
    ap.add_argument("--out", default="runs/encoders")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--epochs", type=int, default=30, help="epoch budget of every trained row")
    ap.add_argument("--patience", type=int, default=5)
    ap.add_argument("--max-minutes", type=float, default=None, help="training time cap of every trained row")
    ap.add_argument("--maxlen", type=int, default=50)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--dropout", type=float, default=0.5, help="SASRec and MIND dropout")
    ap.add_argument("--hstu-dropout", type=float, default=0.2)
    ap.add_argument("--hstu-heads", type=int, default=2)
    ap.add_argument("--hstu-head-dim", type=int, default=32)
    ap.add_argument("--hstu-blocks", type=int, default=2)
    ap.add_argument("--label-power", type=float, default=2.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--categories-from", default=None, help="data set whose item categories to use (by item id)")
    ap.add_argument("--no-served", action="store_true", help="skip the ONNX + FAISS served evaluation")
    ap.add_argument("--latency", action="store_true", help="encode-stage latency at batch 1 per ONNX graph")
    ap.add_argument("--latency-calls", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="reuse OUT/<row>/result.json of rows already run")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    ds = load(a.data)
    split = LeaveOneOut(ds)
    cats = categories_of(ds, a.categories_from)
    print(ds.describe(), file=sys.stderr)
    names = [r for r in a.rows.split(",") if r]
    ref_table: np.ndarray | None = None
    rows: dict[str, dict[str, Any]] = {}
    lists: dict[str, np.ndarray] = {}
    latency: dict[str, dict[str, float]] = {}
    for name in names:
        folder = out / name
        cached = folder / "result.json"
        if a.resume and cached.is_file():
            payload = json.loads(cached.read_text())
            lists[name] = np.load(folder / "top10.npy")
            if name not in ("popularity", "last-item"):
                model, _ = load_retrieval(folder, ds, a.data)
                if name == REFERENCE_ROW:
                    ref_table = model.item_embedding.weight.detach().numpy()
        elif name in ("popularity", "last-item"):
            scorer = Popularity(split, "test") if name == "popularity" else LastItem(split, "test")
            ranks, tops = ranked_lists(scorer, split)
            payload = {"row": name, "metrics": quality(ranks, tops, ds.num_items)}
            lists[name] = tops[:, :10]
        else:
            cfg = row_config(name, ds.num_items, a)
            tcfg = RetrievalTrainConfig(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, patience=a.patience,
                                        seed=a.seed, max_minutes=a.max_minutes)
            t0 = time.perf_counter()
            res = train_retrieval(split, cfg, tcfg, progress=False)
            wall = time.perf_counter() - t0
            model = res.model
            ranks, tops = ranked_lists(model_scorer(model), split)
            lists[name] = tops[:, :10]
            own = model.item_embedding.weight.detach().numpy()
            if name == REFERENCE_ROW:
                ref_table = own
            tr = describe(res)
            metrics = {**quality(ranks, tops, ds.num_items), "div_own@10": embedding_diversity(lists[name], own),
                       "seq/s": tr["sequences_per_s"]}
            if not a.no_served:
                metrics.update(served(model, split, folder / "onnx"))
            payload = {"row": name, "data": a.data, "metrics": metrics, "model_config": cfg.to_dict(),
                       "train_config": tcfg.__dict__,
                       "training": {k: v for k, v in tr.items() if k != "history"} | {"wall_seconds": round(wall, 1)}}
            save_checkpoint(folder, model, ds, a.data, {"metrics": metrics})
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "top10.npy", lists[name])
        write_json(cached, payload)
        rows[name] = dict(payload["metrics"])
        if a.latency and "onnx" in rows[name]:
            cfg_d = payload["model_config"]
            latency[name] = encode_latency(rows[name]["onnx"], cfg_d["maxlen"], ds.num_items, a.latency_calls)
        print(f"{name}: NDCG@10 {rows[name]['NDCG@10']:.4f}", file=sys.stderr, flush=True)
    for name in names:  # the diversities that need every row's lists or the reference table
        if ref_table is not None:
            rows[name]["div_ref@10"] = embedding_diversity(lists[name], ref_table)
        if cats is not None:
            rows[name]["div_cat@10"] = category_diversity(lists[name], cats)
    budget = (f"budget per trained row: <= {a.epochs} epochs, early stop after {a.patience} epochs without a better "
              f"validation NDCG@10" + (f", <= {a.max_minutes} min" if a.max_minutes else "")
              + f"; batch {a.batch_size}, lr {a.lr}, seed {a.seed}, {a.threads} torch thread(s)")
    print(budget)
    print(table(rows, COLUMNS))
    speed = {n: {"best_epoch": json.loads((out / n / "result.json").read_text())["training"]["best_epoch"],
                 "epochs": json.loads((out / n / "result.json").read_text())["training"]["epochs_run"],
                 "s/epoch": json.loads((out / n / "result.json").read_text())["training"]["seconds_per_epoch"]}
             for n in names if n not in ("popularity", "last-item")}
    print()
    print(table(speed, ("best_epoch", "epochs", "s/epoch")))
    if latency:
        print()
        print("encode stage at batch 1 (onnxruntime, 1 thread, history of maxlen items):")
        print(table(latency, ("p50_ms", "p99_ms")))
    write_json(out / "summary.json", {"data": a.data, "budget": budget, "rows": rows, "speed": speed,
                                      "latency": latency, "argv": sys.argv})
    return 0


if __name__ == "__main__":
    sys.exit(main())
