"""The eager-PyTorch end-to-end table of the cascade: the reference `recsys evaluate --artifacts`
(training/eval/served_eval.py, the one evaluation of what is served) is checked against.

Each leave-one-out test user (history = training part + validation item): retrieval top-C with
the whole history removed -> pre-rank order of the C -> the re-ranker reorders the top N; items
after the top N keep the pre-rank order. HR@K / NDCG@K of the test item over that final order (an
item outside the C counts as a miss). `recsys train rerank` reports it before any ONNX file
exists; tests/training/eval/test_served_eval.py checks that the served path (ONNX Runtime, FAISS,
NumPy) gives the same table on the same checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from models.prm import RerankModel
from service.contract.rerank_inputs import PVStats
from training.data.splits import LeaveOneOut
from training.eval.metrics import ranking_metrics
from training.stages.rerank.impressions import list_data
from training.stages.rerank.sampling import ImpressionConfig
from training.stages.rerank.train import score_lists
from training.stages.rerank.upstream import Pipeline, rank_candidates

E2E_KS = (1, 5, 10, 20)


def end_to_end(pipe: Pipeline, loo: LeaveOneOut, models: dict[str, RerankModel], stats: PVStats,
               cfg: ImpressionConfig, ks: tuple[int, ...] = E2E_KS,
               progress: Callable[[str], None] | None = None) -> dict[str, dict[str, float]]:
    """HR@K / NDCG@K of the leave-one-out test item: "prerank" (retrieval -> pre-rank order of
    the top C) and "rerank_<name>" per model (its top N reordered, the rest in pre-rank order).

    Retrieval alone is `training.eval.metrics.evaluate_retrieval` (full ranking); the caller adds it.
    """
    users = loo.eval_users
    ranked = rank_candidates(pipe, users, loo.history_end("test"), cfg, progress)
    targets = loo.targets("test")
    N = cfg.list_len
    lists = list_data(pipe, ranked, np.zeros((users.size, N), np.float32), stats, N, cfg.retrieval_score)
    miss = np.iinfo(np.int64).max // 4

    def ranks_of(order_items: np.ndarray) -> np.ndarray:
        hit = order_items == targets[:, None]
        return np.where(hit.any(axis=1), hit.argmax(axis=1), miss)

    out = {"prerank": ranking_metrics(ranks_of(ranked.items), ks)}
    for name, model in models.items():
        s = score_lists(model, lists)  # (B, N)
        order = np.argsort(-np.where(lists.mask, s, -np.inf), axis=1, kind="stable")
        final = np.concatenate([np.take_along_axis(ranked.items[:, :N], order, axis=1), ranked.items[:, N:]], axis=1)
        out[f"rerank_{name}"] = ranking_metrics(ranks_of(final), ks)
    for m in out.values():
        m["users"] = float(users.size)
        m[f"Recall@{ranked.items.shape[1]}"] = float((ranked.items == targets[:, None]).any(axis=1).mean())
        m[f"Recall@{N}"] = float((ranked.items[:, :N] == targets[:, None]).any(axis=1).mean())
    return out

