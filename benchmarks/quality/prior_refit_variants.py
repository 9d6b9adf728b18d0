"""The pair prior's refit, variants on one pre-ranker's own inputs (issue 22, results section 17).

    python benchmarks/quality/prior_refit_variants.py dump FILE.pkl train prerank --data D ... (a `recsys` command line)
    python benchmarks/quality/prior_refit_variants.py run FILE.pkl

`dump` runs the `recsys train prerank` command given and pickles what refit_prior receives (the
trained towers, the incoming prior, the lists, the config) before the refit runs as usual. `run`
re-traces the refit's cross-fitted check (5 folds over the lists' users, as refit_prior) for a few
variants and scores each on the test users' lists (NDCG@10_all: the pre-rank cut, which is what
`recsys evaluate --artifacts` serves when the stage gate keeps it and the re-ranker keeps its start):
  mlp lr1e-2      the refit as it was (1e-2, 200 steps)
  linear lr1e-2   the same with the MLP frozen at its incoming weights (the linear part only)
  mlp lr3e-3 x3   3e-3 for 600 steps (the product since 1da1b81)
and for each: the full fit at the best step count (the product's choice), the average of the five
fold fits at that step count (bag) and bag + full. An experiment, not the product's code path.
"""

from __future__ import annotations

import copy
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from training.stages.prerank import train as T  # noqa: E402
from training.stages.prerank.folds import assign_folds  # noqa: E402


def dump(path: str, argv: list[str]) -> int:
    orig = T.refit_prior

    def hook(model: Any, prior: Any, data: Any, cfg: Any, progress: Any = None) -> Any:
        with open(path, "wb") as f:
            pickle.dump({"model": model, "prior": copy.deepcopy(prior), "data": data, "cfg": cfg}, f)
        return orig(model, prior, data, cfg, progress)

    T.refit_prior = hook
    from recsys_cli.main import main
    return main(argv)


def run(path: str) -> None:
    with open(path, "rb") as f:
        d = pickle.load(f)
    model, prior0, data, cfg = d["model"], d["prior"], d["data"], d["cfg"]
    lists = T.RefitLists.of(model, data, prior0)
    E = len(lists)
    te = data.test
    te_tower = torch.from_numpy(T.score_lists(model, te.user, te.candidates, data.catalog))
    te_f, te_l = torch.from_numpy(te.features), torch.from_numpy(te.launchers.astype(np.int64))

    def test_ndcg(ps: list[Any]) -> float:
        with torch.no_grad():
            s = sum(p.eval()(te_tower, te_f, te_l) for p in ps) / len(ps)
        return T.list_quality(np.where(te.candidates > 0, s.numpy(), -np.inf), te)["NDCG@10_all"]

    def linear_part(p: Any) -> list[Any]:
        return [p.tower_weight, p.weight, p.launcher_bias]

    def fit_on(rows: np.ndarray, steps: int, check: np.ndarray | None, lr: float, linear: bool) -> tuple[Any, list, list]:
        """The product's fit_prior; with `check`, the per-list NDCG@10 of those lists and a copy of the fit at each check."""
        seen, states = [], []

        def every(p: Any) -> None:
            if check is not None:
                seen.append(lists.ndcg(p, check))
                states.append(copy.deepcopy(p))

        p = T.fit_prior(prior0, lists, rows, steps, lr, cfg.seed, cfg.weight_decay,
                        trainable=linear_part if linear else None, every=every)
        return p, seen, states

    users = np.unique(data.train_list_users)
    fold = assign_folds(users.size, T.PRIOR_FOLDS, cfg.seed)[np.searchsorted(users, data.train_list_users)]
    everyone = np.arange(E)
    start = lists.ndcg(prior0, everyone)
    print(f"{E} lists of {users.size} users; incoming prior: held-out {start.mean():.4f}, test {test_ndcg([prior0]):.4f}")
    for name, lr, steps, linear in [("mlp lr1e-2", 1e-2, 200, False), ("linear lr1e-2", 1e-2, 200, True),
                                    ("mlp lr3e-3 x3", 3e-3, 600, False)]:
        held = np.zeros((steps // T.PRIOR_CHECK_EVERY, E))
        fits = []
        for k in range(T.PRIOR_FOLDS):
            inside = np.flatnonzero(fold == k)
            _, seen, states = fit_on(np.flatnonzero(fold != k), steps, inside, lr, linear)
            held[:, inside] = np.stack(seen)
            fits.append(states)
        chosen, gain, se = T.refit_steps(held, start)
        best = int(held.mean(axis=1).argmax())
        n = (best + 1) * T.PRIOR_CHECK_EVERY
        full, _, _ = fit_on(everyone, n, None, lr, linear)
        bag = [f[best] for f in fits]
        print(f"{name}: best {n} steps, held-out {held[best].mean():.4f} (gain {gain:+.4f}, SE {se:.4f}, "
              f"{'kept' if chosen >= 0 else 'incoming kept'}); test: full {test_ndcg([full]):.4f} "
              f"bag {test_ndcg(bag):.4f} bag+full {test_ndcg(bag + [full]):.4f}")


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "dump":
        sys.exit(dump(sys.argv[2], sys.argv[3:]))
    if len(sys.argv) == 3 and sys.argv[1] == "run":
        run(sys.argv[2])
        sys.exit(0)
    sys.exit(__doc__)
