"""Which out-of-sample lists the pair prior should be fit on under the `tail` scheme (issue 22):
the H tail lists per user, the validation lists, or both; judged on the test users' lists.

    python benchmarks/quality/prior_fit_tail.py DATA TAIL_RETRIEVAL H [tail-route] [holdout-tables] [prerank-window]

TAIL_RETRIEVAL: the demo's tail retriever (`recsys demo --ranking-data tail --holdout H`, or
`recsys train retrieval --holdout H`): it never trained on each user's last H training items, so
its lists there, at validation and at test are all out of sample. Tables: the whole training
part, each list without its own future (as the product's lists). The prior is the experiment's
combiner of prior_fit_lists.py (merged score + linear + 16-unit MLP, full batch). "cross-fit
valid" fits on the tail lists plus half of the validation users and scores the other half (both
ways): an estimate of the validation gain that no fitted list has seen; "cross-fit tail" the same
over the tail lists (halves by user). tail-route: the route's request settings tuned on the tail
lists instead of the validation users (by default as the product does); holdout-tables: the tail
lists read tables built without every user's last H training rows (by default: the whole training
part, each list without its own future); prerank-window: only the pre-ranker's first ceil(H / 2) of
the H positions (folds.py prerank_rows; by default all H). An experiment, not the
product's code path. Results: benchmarks/quality/results/ranking_data_tail_issue22.txt.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from prior_fit_lists import fit, routes_for  # noqa: E402

from training.checkpoints import load_retrieval  # noqa: E402
from training.data.sources import load  # noqa: E402
from training.data.splits import LeaveOneOut  # noqa: E402
from training.stages.prerank.folds import prerank_rows  # noqa: E402
from training.stages.prerank.lists import (  # noqa: E402
    MergedLists,
    list_routes,
    make_lists,
    tune_route_settings,
)


def per_list(scores: np.ndarray, lists: MergedLists, targets: np.ndarray) -> np.ndarray:
    s = np.where(lists.items > 0, scores, -np.inf)
    order = np.argsort(-s, axis=1, kind="stable")[:, :10]
    hit = lists.items[np.arange(len(targets))[:, None], order] == targets[:, None]
    return (hit / np.log2(np.arange(2, 12))).sum(1)


def cat(a: MergedLists, b: MergedLists) -> MergedLists:
    w = max(a.items.shape[1], b.items.shape[1])

    def pad(x: np.ndarray, fill: float) -> np.ndarray:
        widths = [(0, 0), (0, w - x.shape[1])] + [(0, 0)] * (x.ndim - 2)
        return np.pad(x, widths, constant_values=fill)

    return MergedLists(np.concatenate([pad(a.items, 0), pad(b.items, 0)]),
                       np.concatenate([pad(a.merged, -np.inf), pad(b.merged, -np.inf)]),
                       np.concatenate([pad(a.retrieval, -np.inf), pad(b.retrieval, -np.inf)]),
                       np.concatenate([pad(a.launchers, 0), pad(b.launchers, 0)]),
                       np.concatenate([pad(a.features, 0), pad(b.features, 0)]),
                       np.concatenate([a.users, b.users]))


def main() -> None:
    torch.set_num_threads(1)
    ds = load(sys.argv[1])
    h = int(sys.argv[3])
    loo = LeaveOneOut(ds)
    model, _ = load_retrieval(sys.argv[2], ds)
    model.eval()
    ends = ds.offsets[:-1] + loo.train_lengths()
    rows = np.sort(np.concatenate([ends - k for k in range(1, h + 1)]))
    rows = rows[rows > ds.offsets[ds.users[rows]]]
    if "prerank-window" in sys.argv[4:]:  # only the pre-ranker's ceil(H / 2) positions (folds.py prerank_rows)
        rows = prerank_rows(loo, h)
    if "tail-route" in sys.argv[4:]:
        routes = list_routes(ds, loo.train_mask)
        assert routes.route is not None
        serving, _ = tune_route_settings(model, routes, ds, ds.offsets[ds.users[rows]], rows, ds.items[rows])
        routes.route = routes.route.with_serving(serving)
        print("route settings (tuned on the tail lists)", serving, flush=True)
    else:
        routes = routes_for(model, ds, loo)
    vt, tt = loo.targets("valid"), loo.targets("test")
    starts = ds.offsets[loo.eval_users]
    valid = make_lists(model, routes, ds, starts, loo.history_end("valid"))
    test = make_lists(model, routes, ds, starts, loo.history_end("test"))
    tail_routes = routes
    if "holdout-tables" in sys.argv[4:]:  # the tail lists read tables without every user's last H training rows
        tail_routes = list_routes(ds, LeaveOneOut(ds, holdout=h).train_mask)
        assert tail_routes.route is not None and routes.route is not None
        tail_routes.route = replace(tail_routes.route, recent=routes.route.recent, decay=routes.route.decay,
                                    candidates=routes.route.candidates, beta=routes.route.beta)
        print("tail lists: tables without every user's last H training rows", flush=True)
    tail = make_lists(model, tail_routes, ds, ds.offsets[ds.users[rows]], rows)
    tail_t = ds.items[rows]
    print(f"H {h}: {rows.size} tail lists, {len(vt)} valid, {len(tt)} test")
    mv, mt = per_list(valid.merged, valid, vt), per_list(test.merged, test, tt)
    print(f"merged order: valid {mv.mean():.4f} test {mt.mean():.4f}")
    half = np.random.default_rng(0).permutation(len(vt)) % 2
    for epochs in (50, 200):
        for name, (lists, targets) in {"tail": (tail, tail_t), "valid": (valid, vt),
                                       "tail+valid": (cat(tail, valid), np.concatenate([tail_t, vt]))}.items():
            f = fit(lists, targets, epochs)
            v, t = per_list(f(valid), valid, vt), per_list(f(test), test, tt)
            d = t - mt
            print(f"fit on {name:10s} epochs {epochs:3d}: valid {v.mean():.4f} test {t.mean():.4f} "
                  f"(test gain {d.mean():+.4f}, paired SE {d.std(ddof=1) / np.sqrt(d.size):.4f})", flush=True)
        users = ds.users[rows]
        uhalf = np.random.default_rng(1).permutation(ds.num_users)[users] % 2
        tm = per_list(tail.merged, tail, tail_t)
        tcross = np.zeros(rows.size)
        for k in (0, 1):
            a, b = np.flatnonzero(uhalf != k), np.flatnonzero(uhalf == k)
            f = fit(tail.take(a), tail_t[a], epochs)
            tcross[b] = per_list(f(tail.take(b)), tail.take(b), tail_t[b])
        d = tcross - tm
        print(f"cross-fit tail (by user halves) epochs {epochs:3d}: merged {tm.mean():.4f} fit {tcross.mean():.4f} "
              f"(gain {d.mean():+.4f}, paired SE {d.std(ddof=1) / np.sqrt(d.size):.4f})", flush=True)
        cross = np.zeros(len(vt))
        for k in (0, 1):
            a, b = np.flatnonzero(half != k), np.flatnonzero(half == k)
            f = fit(cat(tail, valid.take(a)), np.concatenate([tail_t, vt[a]]), epochs)
            cross[b] = per_list(f(valid.take(b)), valid.take(b), vt[b])
        d = cross - mv
        print(f"cross-fit valid (tail + other half) epochs {epochs:3d}: valid {cross.mean():.4f} "
              f"(gain {d.mean():+.4f}, paired SE {d.std(ddof=1) / np.sqrt(d.size):.4f})", flush=True)


if __name__ == "__main__":
    main()
