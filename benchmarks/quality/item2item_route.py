"""The item-to-item recall route beside SASRec, through the served functions (issue 13).

    python benchmarks/quality/item2item_route.py --data movielens:../shared/data/ml-100k --retrieval DIR \
        --out benchmarks/quality/results/item2item_route_ml100k.txt

Leave-one-out split (DESIGN §2), full catalog, seen items removed. Rows:

  popularity, last-item  training.eval.baselines over the whole catalog (NumPy)
  SASRec                 the checkpoint exported to ONNX (training/publish/onnx/retrieval.py), one ONNX Runtime
                         call per user on its unpadded history (as service/pipeline.py), exact
                         FAISS max-fusion search (service/index.py), top 200 (retrieval_k)
  i2i route alone        service/item2item.py on the table of training/stages/retrieval/item2item.py; its list is
                         the route's reached items only (no backfill: a shorter list is a miss)
  SASRec + i2i merged    service/item2item.merge_routes: the union of FAISS's 200 and the route's
                         best `candidates`, ordered by r + beta * sd(r) * i2i / max i2i

Table and request settings (window, alpha, R, recent, decay, candidates, beta) are tuned on the
validation split (the route alone by its NDCG@10; then its JOINT best configurations with every
candidates / beta for the merge, by the merged NDCG@10); the test split is measured once with the chosen ones. Coverage@10 = distinct
items in the top-10 lists / N; diversity@10 = mean pairwise cosine distance of the SASRec item
vectors in each top-10 (training/eval/diversity.py), and genre Jaccard distance where the catalog has
a multi-valued genre feature. Recall@200: the share of users whose target is in the candidate
set the pre-ranker sees (FAISS's 200; the union; the merged order cut at 200).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from service.artifacts import session
from service.index import search_fused
from service.index_build import IndexSpec, build_index
from service.item2item import Item2ItemRoute, merge_routes, top_route
from training.checkpoints import load_retrieval
from training.eval.baselines import LastItem, Popularity
from training.data.sources import load
from training.data.splits import LeaveOneOut
from training.eval.diversity import category_diversity, embedding_diversity
from training.publish.onnx.retrieval import export_retrieval
from training.stages.retrieval.item2item import Item2ItemConfig, build_table, training_rows
from training.eval.metrics import mask_seen, ranking_metrics
from training.report import table

RETRIEVAL_K = 200
TOP = 100  # ranks beyond are misses
KS = (10, 50, 100)
COLUMNS = ("HR@10", "HR@50", "NDCG@10", "NDCG@50", "NDCG@100", "Coverage@10", "EmbDiv@10", "GenreDiv@10")
GRID = {"window": (1, 3, 5, 8), "alpha": (0.0, 0.25, 0.5), "recent": (1, 3, 5, 8), "decay": (0.3, 0.6, 1.0)}
JOINT = 3  # the best route configs (alone, on validation) tried with every merge setting
MERGE_GRID = {"candidates": (20, 50, 100), "beta": (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)}
NEIGHBOURS = 100  # R: the route never takes more than `candidates` <= 100 items per request


class Served:
    """Per split: histories, targets, user vectors (U, M, D) and FAISS's top 200 per user."""

    def __init__(self, ds, loo: LeaveOneOut, onnx, maxlen: int, index, which: str) -> None:  # type: ignore[no-untyped-def]
        starts = ds.offsets[loo.eval_users]
        ends = loo.history_end(which)
        self.histories = [ds.items[s:e] for s, e in zip(starts, ends)]
        self.targets = loo.targets(which)
        self.banned = [np.unique(h) for h in self.histories]
        t0 = time.perf_counter()
        self.users = np.stack([onnx.run(None, {"item_seq": h[-maxlen:][None]})[0][0] for h in self.histories])
        self.encode_s = time.perf_counter() - t0
        self.faiss = [search_fused(index, u, RETRIEVAL_K, exclude=b).user(0) for u, b in zip(self.users, self.banned)]


def rank_of(lists: list[np.ndarray], targets: np.ndarray) -> np.ndarray:
    """Zero-based rank of each target in its list; TOP (a miss) when absent or past TOP."""
    out = np.full(len(lists), TOP, np.int64)
    for u, (lst, t) in enumerate(zip(lists, targets)):
        pos = np.flatnonzero(lst[:TOP] == t)
        if pos.size:
            out[u] = pos[0]
    return out


def metrics(lists: list[np.ndarray], targets: np.ndarray, n: int, vectors: np.ndarray,
            genres: np.ndarray | None) -> dict[str, float]:
    m = ranking_metrics(rank_of(lists, targets), KS)
    m.pop("MRR")
    top10 = np.zeros((len(lists), 10), np.int64)
    for u, lst in enumerate(lists):
        top10[u, : min(10, lst.size)] = lst[:10]
    m["Coverage@10"] = float(np.unique(top10[top10 > 0]).size / n)
    m["EmbDiv@10"] = embedding_diversity(top10, vectors)
    m["GenreDiv@10"] = category_diversity(top10, genres) if genres is not None else float("nan")
    return m


def route_lists(sv: Served, route: Item2ItemRoute) -> list[np.ndarray]:
    return [top_route(*route.score(h, b), TOP)[0] for h, b in zip(sv.histories, sv.banned)]


def merged_lists(sv: Served, route: Item2ItemRoute, items: np.ndarray) -> list[np.ndarray]:
    out = []
    for h, b, u, (cand, fused, launch) in zip(sv.histories, sv.banned, sv.users, sv.faiss):
        out.append(merge_routes(cand, fused, launch, route, h, b, u, items).items)
    return out


def ndcg10(lists: list[np.ndarray], targets: np.ndarray) -> float:
    return ranking_metrics(rank_of(lists, targets), (10,))["NDCG@10"]


def recall(lists: list[np.ndarray], targets: np.ndarray, cut: int | None) -> float:
    return float(np.mean([t in (lst if cut is None else lst[:cut]) for lst, t in zip(lists, targets)]))


def baseline_lists(scorer, loo: LeaveOneOut, which: str, users: int) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    out = []
    for lo in range(0, users, 256):
        sel = np.arange(lo, min(lo + 256, users))
        hist = loo.histories(which, sel)
        s = scorer(hist).astype(np.float32).copy()
        mask_seen(s, hist)
        order = np.argsort(-s, axis=1, kind="stable")[:, :TOP]
        out.extend(list(order))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--retrieval", required=True, help="retrieval checkpoint folder")
    ap.add_argument("--out", help="results file")
    a = ap.parse_args()
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    ds = load(a.data)
    loo = LeaveOneOut(ds)
    model, ckpt = load_retrieval(a.retrieval, ds, a.data)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path, items_path = export_retrieval(model, tmp)
        onnx = session(onnx_path)
        items = np.load(items_path)  # (N, D)
    index = build_index(items, IndexSpec(kind="flat"))
    vectors = np.vstack([np.zeros((1, items.shape[1]), np.float32), items])  # (N + 1, D)
    feats = ds.item_features
    genres = None
    if feats is not None:
        key = next((k for k in feats.multi if k.startswith("genre")), None)
        genres = feats.multi[key] if key else None
    n = ds.num_items
    served = {w: Served(ds, loo, onnx, model.config.maxlen, index, w) for w in ("valid", "test")}
    rows_tr = training_rows(ds, loo.train_mask)
    rows_test = training_rows(ds, loo.known_mask("test"))  # at test time the validation item is history too

    # --- tune on validation ---
    sv = served["valid"]
    tables: dict[tuple[int, float], tuple[np.ndarray, np.ndarray]] = {}
    tuning = []
    for window, alpha, recent, decay in itertools.product(*GRID.values()):
        if recent == 1 and decay != GRID["decay"][0]:
            continue  # decay does nothing with one recent item
        key = (window, alpha)
        if key not in tables:
            tables[key] = build_table(*rows_tr, n, Item2ItemConfig(NEIGHBOURS, window, alpha))
        r = Item2ItemRoute(*tables[key], recent=recent, decay=decay, candidates=TOP)
        tuning.append((ndcg10(route_lists(sv, r), sv.targets), window, alpha, recent, decay))
    tuning.sort(reverse=True)
    best = tuning[0]
    merge_tuning = []
    for (_, w, al, rc, dc), (cands, beta) in itertools.product(tuning[:JOINT], itertools.product(*MERGE_GRID.values())):
        r = Item2ItemRoute(*tables[(w, al)], recent=rc, decay=dc, candidates=cands, beta=beta)
        merge_tuning.append((ndcg10(merged_lists(sv, r, items), sv.targets), cands, beta, w, al, rc, dc))
    merge_tuning.sort(key=lambda x: (-x[0], x[2], x[1]))
    _, cands, beta, m_window, m_alpha, m_recent, m_decay = merge_tuning[0]
    _, window, alpha, recent, decay = best

    # --- test, once ---
    out: dict[str, dict[str, dict[str, float]]] = {}
    recalls: dict[str, dict[str, float]] = {}
    for which, rows in (("valid", rows_tr), ("test", rows_test)):
        sv = served[which]
        alone = Item2ItemRoute(*build_table(*rows, n, Item2ItemConfig(NEIGHBOURS, window, alpha)), recent=recent,
                               decay=decay, candidates=TOP)
        m_table = build_table(*rows, n, Item2ItemConfig(NEIGHBOURS, m_window, m_alpha))
        route = Item2ItemRoute(*m_table, recent=m_recent, decay=m_decay, candidates=cands, beta=beta)
        faiss_lists = [c for c, _, _ in sv.faiss]
        merged = merged_lists(sv, route, items)
        lists = {
            "popularity": baseline_lists(Popularity(loo, which), loo, which, len(sv.histories)),  # type: ignore[arg-type]
            "last-item": baseline_lists(LastItem(loo, which), loo, which, len(sv.histories)),  # type: ignore[arg-type]
            "SASRec (M=1)": faiss_lists,
            "i2i route alone": route_lists(sv, alone),
            "SASRec + i2i merged": merged,
        }
        out[which] = {name: metrics(lst, sv.targets, n, vectors, genres) for name, lst in lists.items()}
        recalls[which] = {"FAISS top-200": recall(faiss_lists, sv.targets, None),
                          f"merged (i2i {cands}) order cut at 200": recall(merged, sv.targets, RETRIEVAL_K)}
        for c in MERGE_GRID["candidates"]:
            union = merged_lists(sv, dataclasses.replace(route, candidates=c), items)
            size = np.mean([m.size for m in union])
            recalls[which][f"union FAISS 200 + i2i {c} (mean size {size:.1f})"] = recall(union, sv.targets, None)

    lines = [f"# python {' '.join(sys.argv)}",
             f"# data {ds.describe()}",
             f"# SASRec checkpoint {a.retrieval}: config {model.config.to_dict()}, "
             f"train {ckpt.extra.get('train', {})}",
             f"# tuned on validation: route alone window={window} alpha={alpha} R={NEIGHBOURS} recent={recent} "
             f"decay={decay} (valid NDCG@10 {best[0]:.4f}); merged: window={m_window} alpha={m_alpha} "
             f"recent={m_recent} decay={m_decay} candidates={cands} beta={beta} "
             f"(valid NDCG@10 {merge_tuning[0][0]:.4f})",
             f"# route grid {GRID}; merge grid {MERGE_GRID}; top-5 route configs (NDCG@10, window, alpha, recent, "
             f"decay): {[(round(t[0], 4), *t[1:]) for t in tuning[:5]]}",
             f"# merge tuning, best 8 (NDCG@10, candidates, beta, window, alpha, recent, decay): "
             f"{[(round(t[0], 4), *t[1:]) for t in merge_tuning[:8]]}",
             f"# ONNX encode of {len(served['test'].histories)} users one at a time: "
             f"{served['test'].encode_s * 1000 / len(served['test'].histories):.2f} ms/user; "
             f"wall {time.perf_counter() - t_start:.0f}s"]
    for which in ("test", "valid"):
        lines += ["", f"## {which} ({len(served[which].histories)} users)", table(out[which], COLUMNS), "",
                  f"Recall@200 of the candidate set ({which}):"]
        lines += [f"  {k:<44} {v:.4f}" for k, v in recalls[which].items()]
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
