"""Pre-ranking quality on ml-100k (issue #4, "Must show"): prints tables, saves them.

    OMP_NUM_THREADS=1 python benchmarks/quality/prerank_quality.py --part ctr
    OMP_NUM_THREADS=1 python benchmarks/quality/prerank_quality.py --part next-item [--retrieval DIR]

ctr: per-user temporal split, label = rating > 3, rating 3 dropped; every spec statistic
and aggregate from the training rows; early stopping on validation AUC; test AUC / LogLoss
as mean ± std over seeds. next-item: the retrieval top-C of each leave-one-out test user
re-ordered by each pre-ranker (early stopping on validation NDCG@10).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from training.stages.prerank import train as pr  # noqa: E402
from training.stages.prerank.data import build_ctr_data, build_next_item_data  # noqa: E402
from training.eval.baselines import LastItem  # noqa: E402
from training.data.sources import load  # noqa: E402
from training.data.splits import CTRSplit, LeaveOneOut  # noqa: E402

ML100K = f"movielens:{ROOT.parent / 'shared' / 'data' / 'ml-100k'}"
CIR_WEIGHT = 0.1

# name -> (model, config overrides, CIR weight)
CTR_VARIANTS: dict[str, tuple[str, dict, float]] = {
    "two-tower": ("two-tower", {}, 0.0),
    "IntTower": ("inttower", {}, CIR_WEIGHT),
    "IntTower w/o CIR": ("inttower", {}, 0.0),
    "IntTower w/o LightSE": ("inttower", {"lightse": False}, CIR_WEIGHT),
    "DCN-v2": ("dcnv2", {}, 0.0),
}


def pm(values: list[float]) -> str:
    a = np.asarray(values)
    return f"{a.mean():.4f} ± {a.std():.4f}"


def run_ctr(data_spec: str, seeds: list[int], epochs: int) -> str:
    ds = load(data_spec)
    data = build_ctr_data(ds, CTRSplit(ds))
    lines = [
        f"ctr objective — {ds.describe()}",
        f"rows train/valid/test {len(data.train)}/{len(data.valid)}/{len(data.test)}, seeds {seeds}, "
        f"CIR weight {CIR_WEIGHT} temperature {pr.TrainConfig().temperature}, early stopping on valid AUC",
        "",
    ]
    results: dict[str, dict[str, list[float]]] = {}
    for name, (model_name, overrides, cir) in CTR_VARIANTS.items():
        res = results.setdefault(name, {"valid AUC": [], "AUC": [], "LogLoss": [], "epochs": [], "s": []})
        for seed in seeds:
            torch.manual_seed(seed)
            model = pr.build_model(model_name, data.spec, **overrides)
            t0 = time.perf_counter()
            fit = pr.train_ctr(model, data, pr.TrainConfig(epochs=epochs, cir_weight=cir, seed=seed))
            m = pr.evaluate_ctr(model, data.test)
            res["valid AUC"].append(fit["best_valid_AUC"])
            res["AUC"].append(m["AUC"])
            res["LogLoss"].append(m["LogLoss"])
            res["epochs"].append(len(fit["history"]))
            res["s"].append(time.perf_counter() - t0)
            print(f"{name} seed {seed}: test AUC {m['AUC']:.4f} LogLoss {m['LogLoss']:.4f} "
                  f"(valid {fit['best_valid_AUC']:.4f}, {len(fit['history'])} epochs)", file=sys.stderr)
    w = max(len(n) for n in results)
    lines.append(f"{'model'.ljust(w)}  {'valid AUC':>17}  {'test AUC':>17}  {'test LogLoss':>17}  epochs  s/run")
    lines.append("-" * (w + 80))
    for name, r in results.items():
        lines.append(f"{name.ljust(w)}  {pm(r['valid AUC']):>17}  {pm(r['AUC']):>17}  {pm(r['LogLoss']):>17}  "
                     f"{np.mean(r['epochs']):6.1f}  {np.mean(r['s']):5.0f}")
    lines.append("")
    lines.append("per seed (test AUC): " + "; ".join(
        f"{n}: {', '.join(f'{v:.4f}' for v in r['AUC'])}" for n, r in results.items()))
    it, tt, dc = (np.mean(results[k]["AUC"]) for k in ("IntTower", "two-tower", "DCN-v2"))
    lines.append(f"IntTower - two-tower = {it - tt:+.4f} AUC (goal >= +0.01); "
                 f"IntTower - DCN-v2 = {it - dc:+.4f} AUC (goal >= -0.005)")
    return "\n".join(lines)


def run_next_item(data_spec: str, seeds: list[int], epochs: int, retrieval: str | None, candidates: int) -> str:
    ds = load(data_spec)
    loo = LeaveOneOut(ds)
    if retrieval:
        from training.checkpoints import load_retrieval
        from training.stages.retrieval.train import model_scorer

        scorer = model_scorer(load_retrieval(retrieval, ds, data_spec)[0])
        scorers, source = {"valid": scorer, "test": scorer}, f"SASRec checkpoint {retrieval}"
    else:
        scorers, source = {"valid": LastItem(loo, "valid"), "test": LastItem(loo, "test")}, "last-item (LastItem)"
    t0 = time.perf_counter()
    data = build_next_item_data(ds, loo, scorers, candidates=candidates)
    print(f"next-item data built in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    lines = [
        f"next-item objective — {ds.describe()}",
        f"candidates: retrieval top-{candidates} from {source}, seen items removed; "
        f"{data.train_targets.size} training examples; seeds {seeds}; early stopping on valid NDCG@10",
        "NDCG@10 / MAP@10 over users whose held-out item is among the candidates; "
        "NDCG@10_all over all test users (0 where retrieval missed it)",
        "",
    ]
    rows: dict[str, dict[str, list[float]]] = {"retrieval order": {}}
    base = pr.list_quality(data.test.retrieval_scores, data.test)
    cols = ["NDCG@10", "MAP@10", "NDCG@10_all", f"Recall@{candidates}"]
    for c in cols:
        rows["retrieval order"][c] = [base[c]]
    for name, model_name in (("two-tower", "two-tower"), ("IntTower", "inttower")):
        cir = CIR_WEIGHT if model_name == "inttower" else 0.0
        r = rows.setdefault(name, {c: [] for c in cols})
        for seed in seeds:
            torch.manual_seed(seed)
            model = pr.build_model(model_name, data.spec)
            t1 = time.perf_counter()
            fit = pr.train_next_item(model, data, pr.TrainConfig(epochs=epochs, cir_weight=cir, seed=seed))
            m = pr.evaluate_next_item(model, data, "test")
            for c in cols:
                r[c].append(m[c])
            print(f"{name} seed {seed}: test NDCG@10 {m['NDCG@10']:.4f} (valid {fit['best_valid_NDCG@10']:.4f}, "
                  f"{len(fit['history'])} epochs, {time.perf_counter() - t1:.0f}s)", file=sys.stderr)
    w = max(len(n) for n in rows)
    lines.append(f"{'order'.ljust(w)}  " + "  ".join(f"{c:>17}" for c in cols))
    lines.append("-" * (w + 2 + 19 * len(cols)))
    for name, r in rows.items():
        lines.append(f"{name.ljust(w)}  " + "  ".join(f"{pm(r[c]):>17}" for c in cols))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=ML100K)
    ap.add_argument("--part", choices=("ctr", "next-item"), required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--retrieval", metavar="DIR", help="next-item: SASRec checkpoint (default: last-item)")
    ap.add_argument("--candidates", type=int, default=200)
    ap.add_argument("--save", metavar="FILE", help="also write the table here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.part == "ctr":
        text = run_ctr(args.data, seeds, args.epochs)
    else:
        text = run_next_item(args.data, seeds, args.epochs, args.retrieval, args.candidates)
    print(text)
    if args.save:
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save).write_text(text + "\n")


if __name__ == "__main__":
    main()
