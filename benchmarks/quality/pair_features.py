"""What the pre-ranker's pair prior learned, and whether it generalises (issue 22, item 2).

    python benchmarks/quality/pair_features.py --data SPEC --retrieval RET --upstream UP --prerank PRE [--out F]

Rebuilds the pre-ranker's lists as `recsys train prerank` does (training lists from the upstream
retriever of the ranking fold merged with the route built from its rows; validation / test lists
from the served retriever with the route of the training part: training/stages/prerank/lists.py)
and reports NDCG@10 of the lists that hold their target:

- per list set (train = in-sample for the pre-ranker, valid = early stopping, test): the merged-
  retrieval order (the prior as initialised), the trained pre-ranker, the trained prior alone
  (tower weight 0) and the towers alone;
- permutation importance on the test lists: NDCG@10 lost when one pair feature's column is
  shuffled across lists (each list keeps its own length), for every feature of PAIR_FEATURES.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from models.cascade import PairPrior  # noqa: E402
from service.contract.pair_features import PAIR_FEATURES  # noqa: E402
from training.checkpoints import load_prerank, load_retrieval  # noqa: E402
from training.data.sources import load  # noqa: E402
from training.data.splits import LeaveOneOut  # noqa: E402
from training.stages.prerank import train as pr  # noqa: E402
from training.stages.prerank.data import CandidateLists, Retrievers, build_next_item_data, retrieval_prior  # noqa: E402


def ndcg(model: torch.nn.Module, prior: PairPrior, lists: CandidateLists, catalog: object) -> float:
    s = pr.score_lists(model, lists.user, lists.candidates, catalog, prior=prior, lists=lists)  # type: ignore[arg-type]
    return pr.list_quality(s, lists)["NDCG@10"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--retrieval", required=True)
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--prerank", required=True)
    ap.add_argument("--candidates", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(1)
    ds = load(a.data)
    loo = LeaveOneOut(ds)
    served, _ = load_retrieval(a.retrieval, ds, a.data)
    upstream, up_ckpt = load_retrieval(a.upstream, ds, a.data)
    model, _, ckpt = load_prerank(a.prerank, ds, a.data)
    prior = pr.load_prior(ckpt)
    if not isinstance(prior, PairPrior):
        raise SystemExit(f"{a.prerank}: the pre-ranker has no pair prior")
    hist_len = 50  # recsys train prerank's default --history-len
    data = build_next_item_data(ds, loo, None, hist_len, a.candidates, None, a.seed,
                                retrievers=Retrievers(served, upstream, holdout=int(up_ckpt.extra.get("holdout") or 0)))
    assert data.train_lists is not None and data.train_catalog is not None
    tl = data.train_lists
    train = CandidateLists(data.train_user, tl.items, tl.merged, data.train_targets, tl.launchers, tl.features)
    sets = {"train (in-sample)": (train, data.train_catalog), "valid": (data.valid, data.catalog),
            "test": (data.test, data.catalog)}
    fresh = retrieval_prior(data)
    assert isinstance(fresh, PairPrior)
    fresh.load_state_dict({**fresh.state_dict(), "mean": prior.mean, "std": prior.std})  # the trained statistics
    alone = copy.deepcopy(prior)
    with torch.no_grad():
        alone.tower_weight.zero_()
    towers = copy.deepcopy(fresh)
    with torch.no_grad():
        towers.weight.zero_()
        towers.tower_weight.fill_(1.0)
    orders = {"merged retrieval (init)": fresh, "pre-ranker (trained)": prior, "prior alone": alone, "towers alone": towers}
    lines = [f"# python {' '.join(shlex.quote(x) for x in sys.argv)}",
             f"# {ds.name}: lists of {a.candidates} + the route; NDCG@10 over the lists that hold the target "
             f"(train lists: {len(data.train_targets)} examples)",
             f"{'order':<26}" + "".join(f"{k:>20}" for k in sets)]
    for name, p in orders.items():
        lines.append(f"{name:<26}" + "".join(f"{ndcg(model, p, lst, cat):20.4f}" for lst, cat in sets.values()))
    test, cat = sets["test"]
    assert test.features is not None
    base = ndcg(model, prior, test, cat)
    rng = np.random.default_rng(a.seed)
    lines += ["", "permutation importance on the test lists (NDCG@10 lost when the column is shuffled across lists):",
              f"{'feature':<20}{'weight (z)':>12}{'NDCG@10 lost':>14}"]
    weights = prior.weight.detach().numpy()
    for j, name in enumerate(PAIR_FEATURES):
        feats = test.features.copy()
        perm = rng.permutation(feats.shape[0])
        feats[..., j] = feats[perm][..., j]
        shuffled = CandidateLists(test.user, test.candidates, test.retrieval_scores, test.targets, test.launchers, feats)
        lines.append(f"{name:<20}{weights[j]:12.3f}{base - ndcg(model, prior, shuffled, cat):14.4f}")
    lines.append(f"tower_weight {float(prior.tower_weight.detach()):.3f}; MLP |out_weight|_1 {float(prior.out_weight.detach().abs().sum()):.3f}")
    text = "\n".join(lines)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
