"""Where the pre-ranker's pair prior must be fit (issue 22): a combiner of the pair features fit on
out-of-sample lists vs on in-sample lists, judged on the test users' served lists (merged retrieval).

    python benchmarks/quality/prior_fit_lists.py DATA RETRIEVAL [HOLDOUT_RETRIEVAL H]

RETRIEVAL: a retriever trained on the whole training part (the in-sample scheme). It prints NDCG@10
on the validation and test lists (all users; 0 where the target is not in the list) of: the merged-
retrieval order; a prior (linear + 16-unit MLP over the standardised pair features, plus the merged
score) fit full-batch with Adam (lr 0.01) on the validation lists (out of sample for the retriever);
the same fit on 20,000 in-sample training lists (tables without each list's own future). With
HOLDOUT_RETRIEVAL (trained with `recsys train retrieval --holdout H`): the same prior fit on that
model's lists at the H held-out positions, valid / test from that model (the `tail` scheme).
An experiment, not the product's code path: the product's refit is training/stages/prerank/train.py
refit_prior. Results: benchmarks/quality/results/ranking_data_tail_issue22.txt.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from training.checkpoints import RetrievalModel, load_retrieval  # noqa: E402
from training.data.dataset import Dataset  # noqa: E402
from training.data.sources import load  # noqa: E402
from training.data.splits import LeaveOneOut  # noqa: E402
from training.stages.prerank.lists import (  # noqa: E402
    ListRoutes,
    MergedLists,
    list_routes,
    make_lists,
    tune_route_settings,
)


def ndcg(scores: np.ndarray, lists: MergedLists, targets: np.ndarray) -> float:
    """NDCG@10 over all lists (0 where the target is not in the list)."""
    s = np.where(lists.items > 0, scores, -np.inf)
    order = np.argsort(-s, axis=1, kind="stable")[:, :10]
    hit = lists.items[np.arange(len(targets))[:, None], order] == targets[:, None]
    return float((hit / np.log2(np.arange(2, 12))).sum(1).mean())


def fit(lists: MergedLists, targets: np.ndarray, epochs: int, hidden: int = 16, l2: float = 1e-3,
        seed: int = 0) -> Callable[[MergedLists], np.ndarray]:
    """s = a * merged / sd(merged) + z . w + relu(z W1 + b1) . w2 fit full-batch (listwise softmax) on
    the lists holding their target; -> the scorer of other lists."""
    keep = (lists.items == targets[:, None]).any(1)
    x = torch.tensor(lists.features[keep])
    real = torch.tensor(lists.items[keep] > 0)
    y = torch.tensor((lists.items[keep] == targets[keep][:, None]).argmax(1))
    base = torch.tensor(np.where(lists.items[keep] > 0, lists.merged[keep], 0.0))
    mu, sd, bsd = x[real].mean(0), x[real].std(0).clamp_min(1e-6), base[real].std()
    torch.manual_seed(seed)
    f = x.shape[-1]
    w = torch.zeros(f, requires_grad=True)
    a = torch.ones(1, requires_grad=True)
    w1 = (0.1 * torch.randn(f, hidden)).requires_grad_()
    b1 = torch.zeros(hidden, requires_grad=True)
    w2 = torch.zeros(hidden, requires_grad=True)
    opt = torch.optim.Adam([w, a, w1, b1, w2], lr=0.01)

    def score(feats: torch.Tensor, merged: torch.Tensor) -> torch.Tensor:
        z = (feats - mu) / sd
        return a * merged / bsd + z @ w + torch.relu(z @ w1 + b1) @ w2

    for _ in range(epochs):
        loss = torch.nn.functional.cross_entropy(score(x, base).masked_fill(~real, -1e9), y)
        loss = loss + l2 * sum((p ** 2).sum() for p in (w, w1, w2))
        opt.zero_grad()
        loss.backward()
        opt.step()

    def apply(other: MergedLists) -> np.ndarray:
        with torch.no_grad():
            return score(torch.tensor(other.features), torch.tensor(np.where(other.items > 0, other.merged, 0.0))).numpy()

    return apply


def routes_for(model: RetrievalModel, ds: Dataset, loo: LeaveOneOut) -> ListRoutes:
    routes = list_routes(ds, loo.train_mask)
    serving, _ = tune_route_settings(model, routes, ds, ds.offsets[loo.eval_users], loo.history_end("valid"),
                                     loo.targets("valid"))
    assert routes.route is not None
    routes.route = routes.route.with_serving(serving)
    print("route settings", serving, flush=True)
    return routes


def main() -> None:
    torch.set_num_threads(1)
    ds = load(sys.argv[1])
    loo = LeaveOneOut(ds)
    model, _ = load_retrieval(sys.argv[2], ds)
    model.eval()
    routes = routes_for(model, ds, loo)
    vt, tt = loo.targets("valid"), loo.targets("test")
    valid = make_lists(model, routes, ds, ds.offsets[loo.eval_users], loo.history_end("valid"))
    test = make_lists(model, routes, ds, ds.offsets[loo.eval_users], loo.history_end("test"))
    rng = np.random.default_rng(0)
    pos = np.flatnonzero(loo.train_mask & (np.arange(ds.items.size) > ds.offsets[ds.users]))
    pos = np.sort(rng.choice(pos, min(20000, pos.size), replace=False))
    inside = make_lists(model, routes, ds, ds.offsets[ds.users[pos]], pos)
    print(f"lists: valid {len(vt)} test {len(tt)} in-sample {pos.size}")
    print(f"merged order: valid {ndcg(valid.merged, valid, vt):.4f} test {ndcg(test.merged, test, tt):.4f}")
    for name, (lists, targets) in {"fit on valid (oos)": (valid, vt),
                                   "fit on in-sample (leak-fixed tables)": (inside, ds.items[pos])}.items():
        for epochs in (50, 200):
            f = fit(lists, targets, epochs)
            print(f"{name} epochs {epochs}: valid {ndcg(f(valid), valid, vt):.4f} test {ndcg(f(test), test, tt):.4f}",
                  flush=True)
    if len(sys.argv) > 3:
        h = int(sys.argv[4]) if len(sys.argv) > 4 else 2
        m2, _ = load_retrieval(sys.argv[3], ds)
        m2.eval()
        r2 = routes_for(m2, ds, loo)
        ends = ds.offsets[:-1] + loo.train_lengths()
        rows = np.sort(np.concatenate([ends - k for k in range(1, h + 1)]))
        rows = rows[rows > ds.offsets[ds.users[rows]]]
        held = make_lists(m2, r2, ds, ds.offsets[ds.users[rows]], rows)
        v2 = make_lists(m2, r2, ds, ds.offsets[loo.eval_users], loo.history_end("valid"))
        t2 = make_lists(m2, r2, ds, ds.offsets[loo.eval_users], loo.history_end("test"))
        print(f"holdout-{h} model: merged valid {ndcg(v2.merged, v2, vt):.4f} test {ndcg(t2.merged, t2, tt):.4f}; "
              f"{rows.size} ranking lists")
        for epochs in (25, 50, 100):
            for hidden in (0, 16):
                f = fit(held, ds.items[rows], epochs, hidden=hidden)
                print(f"  fit on its held-out lists, hidden {hidden}, epochs {epochs}: valid {ndcg(f(v2), v2, vt):.4f} "
                      f"test {ndcg(f(t2), t2, tt):.4f}", flush=True)


if __name__ == "__main__":
    main()
