"""Re-ranking on pipeline impressions, ml-100k (issue #5, "Must show"): prints tables, saves them.

    OMP_NUM_THREADS=1 python benchmarks/quality/rerank_impressions.py \
        --retrieval runs/sweep/M1-copy_last --prerank runs/prerank-ni

The impressions (training/stages/rerank/impressions.py) are built once from the trained retrieval and
next-item pre-rank checkpoints (step sampling and the valid/test user split use seed 0); each
seed then trains PRM, PRM-BASE and the pointwise MLP (init + shuffling + dropout), early
stopping on the validation lists. Tables: test-list NDCG@5/10, MAP@10, P@5 of the list before
re-ranking and after each model (mean ± std over seeds), and the end-to-end HR@10 / NDCG@10 of
the leave-one-out test item for retrieval alone (full ranking), retrieval -> pre-rank, and
retrieval -> pre-rank -> re-rank. Nothing is tuned on the test lists.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from training.stages.rerank import impressions as im  # noqa: E402
from training.stages.rerank.end_to_end import E2E_KS, end_to_end  # noqa: E402
from training.stages.rerank.sampling import ImpressionConfig  # noqa: E402
from training.stages.rerank.upstream import Pipeline  # noqa: E402
from training.stages.rerank import models as rr  # noqa: E402
from training.data.sources import load  # noqa: E402
from training.data.splits import LeaveOneOut  # noqa: E402
from training.eval.metrics import evaluate_retrieval  # noqa: E402
from training.stages.rerank.train import RerankTrainConfig, evaluate_lists, score_lists, unchanged_scores  # noqa: E402
from training.stages.retrieval.train import model_scorer  # noqa: E402

ML100K = f"movielens:{ROOT.parent / 'shared' / 'data' / 'ml-100k'}"
LIST_COLS = ("NDCG@5", "NDCG@10", "MAP@10", "P@5")
E2E_COLS = ("HR@10", "NDCG@10")
NAMES = {"before": "before (pre-rank order)", "prm": "PRM", "prm_base": "PRM-BASE", "mlp": "MLP (pointwise)"}
E2E_NAMES = {"retrieval": "retrieval alone", "prerank": "retrieval -> pre-rank",
             "rerank_prm": "... -> PRM", "rerank_prm_base": "... -> PRM-BASE", "rerank_mlp": "... -> MLP"}


def mean_std_table(rows: dict[str, list[dict[str, float]]], cols: tuple[str, ...], names: dict[str, str]) -> str:
    w = max(len(n) for n in names.values())
    head = "  ".join([" " * w, *(c.rjust(15) for c in cols)])
    lines = [head, "-" * len(head)]
    for key, runs in rows.items():
        cells = []
        for c in cols:
            v = np.array([r[c] for r in runs])
            cells.append(f"{v.mean():.4f} ± {v.std():.4f}".rjust(15))
        lines.append("  ".join([names[key].ljust(w), *cells]))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=ML100K)
    ap.add_argument("--retrieval", default="runs/sweep/M1-copy_last")
    ap.add_argument("--prerank", default="runs/prerank-ni")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--list-len", type=int, default=30)
    ap.add_argument("--candidates", type=int, default=200)
    ap.add_argument("--horizon", type=int, default=5)
    ap.add_argument("--lists-per-user", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--max-minutes", type=float, default=None, help="cap on each model's training time")
    ap.add_argument("--save", default=str(ROOT / "benchmarks" / "quality" / "results" / "rerank_impressions.txt"))
    ap.add_argument("--json", default="runs/rerank-bench.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    command = "OMP_NUM_THREADS=1 python benchmarks/quality/rerank_impressions.py " + shlex.join(sys.argv[1:])

    t0 = time.perf_counter()
    ds = load(args.data)
    loo = LeaveOneOut(ds)
    pipe = Pipeline.load(ds, loo, args.retrieval, args.prerank, args.data)
    cfg = ImpressionConfig(list_len=args.list_len, candidates=args.candidates, horizon=args.horizon,
                              lists_per_user=args.lists_per_user)
    imp = im.build_impressions(pipe, loo, cfg)
    desc = imp.describe()
    print(f"impressions built in {time.perf_counter() - t0:.0f}s: {json.dumps({k: desc[k] for k in ('train', 'valid', 'test')})}",
          file=sys.stderr)
    retrieval = evaluate_retrieval(model_scorer(pipe.retrieval), loo, "test", ks=E2E_KS, progress=False)

    lists: dict[str, list[dict[str, float]]] = {k: [] for k in NAMES}
    valid: dict[str, list[dict[str, float]]] = {k: [] for k in NAMES}
    e2e: dict[str, list[dict[str, float]]] = {k: [] for k in E2E_NAMES}
    epochs: dict[str, list[int]] = {k: [] for k in rr.RERANKERS}
    hp = rr.RerankerHParams()
    for seed in seeds:
        lists["before"].append(evaluate_lists(unchanged_scores(imp.test), imp.test))
        valid["before"].append(evaluate_lists(unchanged_scores(imp.valid), imp.valid))
        models = {}
        for name in rr.RERANKERS:
            t1 = time.perf_counter()
            fit = rr.fit_reranker(name, imp, hp, RerankTrainConfig(epochs=args.epochs, seed=seed, max_minutes=args.max_minutes))
            models[name] = fit.model
            lists[name].append(evaluate_lists(score_lists(fit.model, imp.test), imp.test))
            valid[name].append(evaluate_lists(score_lists(fit.model, imp.valid), imp.valid))
            epochs[name].append(fit.best_epoch)
            print(f"seed {seed} {name}: best epoch {fit.best_epoch} valid NDCG@10 {fit.best_valid_ndcg10:.4f} "
                  f"test NDCG@10 {lists[name][-1]['NDCG@10']:.4f} ({time.perf_counter() - t1:.0f}s)", file=sys.stderr)
        e = end_to_end(pipe, loo, models, imp.pv_stats, cfg)
        e2e["retrieval"].append(retrieval)
        for k in ("prerank", "rerank_prm", "rerank_prm_base", "rerank_mlp"):
            e2e[k].append(e[k])

    n_test = int(lists["before"][0]["lists"])
    out = [
        command,
        "",
        f"Re-ranking on pipeline impressions — {ds.describe()}",
        f"retrieval {args.retrieval} -> pre-rank {args.prerank} (IntTower, next-item) -> top N = {cfg.list_len} "
        f"of C = {cfg.candidates}; click = item met within the next T = {cfg.horizon} training steps",
        f"lists: train {desc['train']['lists']} ({desc['train']['with_click']} with a click, "
        f"{desc['train']['clicks_per_list']:.2f} clicks/list), valid {desc['valid']['lists']} "
        f"({desc['valid']['with_click']}), test {desc['test']['lists']} ({n_test} with a click; metrics over those)",
        f"seeds {seeds}; PRM d_model {hp.d_model}, {hp.layers} layers, {hp.heads} heads; MLP {hp.mlp_hidden}; "
        f"early stopping on validation NDCG@10 (best epochs: {epochs})",
        "",
        "Test lists (mean ± std over seeds)",
        mean_std_table(lists, LIST_COLS, NAMES),
        "",
        "Validation lists (model selection only)",
        mean_std_table(valid, ("NDCG@10",), NAMES),
        "",
        f"End to end, leave-one-out test item ({loo.eval_users.size} users; retrieval alone = full ranking, "
        f"seen items removed)",
        mean_std_table(e2e, E2E_COLS, E2E_NAMES),
        f"(retrieval recall of the test item in its top C = {cfg.candidates}: "
        f"{e2e['prerank'][0][f'Recall@{cfg.candidates}']:.4f}; in the pre-rank top N: "
        f"{e2e['prerank'][0][f'Recall@{cfg.list_len}']:.4f})",
        f"total {time.perf_counter() - t0:.0f}s",
    ]
    text = "\n".join(out) + "\n"
    print(text)
    Path(args.save).parent.mkdir(parents=True, exist_ok=True)
    Path(args.save).write_text(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"lists": lists, "valid": valid, "end_to_end": e2e,
                                               "impressions": desc, "best_epochs": epochs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
