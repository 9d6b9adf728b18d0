"""The trivial baselines beside the served cuts (DESIGN §3, STYLE 15): the publish gate refuses a
version whose served cut does not beat the best of them, and `recsys evaluate --artifacts` prints
them under the cuts.

Same users, same metric definition as training/eval/served_eval.py: full catalog, the whole
request history removed, a top-50 list (a target outside it is a miss), HR / NDCG@10/20/50,
Coverage@10 over the version's catalog, Diversity@10 over its item vectors; each user's NDCG@10
is kept for paired comparisons. NumPy only:

  popularity   training.eval.baselines.Popularity: interaction counts
  last-item    training.eval.baselines.LastItem: what followed the user's last item
  item2item    the version's own item-to-item route alone, through the served functions
               (service.item2item: Item2ItemRoute.score + top_route), no backfill: a list
               shorter than 50 misses what it does not reach (as
               benchmarks/quality/item2item_route.py); only for a version with the route

The counts are fitted on the rows known before the evaluated target (LeaveOneOut.known_mask):
training rows for validation users, training + validation rows for test users.

The verdict (`baseline_verdict`): d_u = NDCG@10_u(served cut) - NDCG@10_u(best baseline), best
= the highest mean NDCG@10 on these users; the served cut beats it when mean(d) > SE(d) =
std(d, ddof=1) / sqrt(U), i.e. by more than one paired standard error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from service.artifacts import LoadedVersion
from service.contract.stage_blocks import Baselines
from service.item2item import top_route
from training.data.dataset import Dataset
from training.data.splits import LeaveOneOut, Split
from training.eval.baselines import LastItem, Popularity
from training.eval.diversity import embedding_diversity
from training.eval.metrics import Scorer, mask_seen, ranking_metrics, target_ranks, top_k
from training.eval.served_eval import COVERAGE_K, KS, METRIC, TOP, ServedEval

ITEM2ITEM = "item2item"
COUNT_BASELINES: dict[str, Callable[[LeaveOneOut, Split], Scorer]] = {"popularity": Popularity,
                                                                      "last-item": LastItem}
BASELINE_COLUMNS = ("HR@10", "NDCG@10", "Coverage@10")  # what the manifest keeps per baseline
_CHUNK = 256  # users scored at once: (256, N + 1) float32
_MISS = np.iinfo(np.int64).max // 4


@dataclass(frozen=True)
class BaselineEval:
    """Per baseline: its metrics (served_eval's columns) and each user's NDCG@10 (U,)."""

    split: Split
    users: int
    rows: dict[str, dict[str, float]]
    ndcg: dict[str, np.ndarray]


def evaluate_baselines(version: LoadedVersion, ds: Dataset, loo: LeaveOneOut, split: Split,
                       users: np.ndarray) -> BaselineEval:
    """The baselines on the leave-one-out users `users` (positions into loo.eval_users), the
    same users evaluate_served replays. Item indices are the version's (its catalog may have
    grown past the data set's items: a reindex)."""
    sel = np.asarray(users, np.int64)
    to_version = np.concatenate([[0], version.id_to_index.lookup(ds.item_ids[1:].astype(str).tolist())])
    targets = to_version[loo.targets(split)[sel]]  # (U,) version indices
    ranks: dict[str, np.ndarray] = {}
    top10: dict[str, np.ndarray] = {}
    for name, make in COUNT_BASELINES.items():
        scorer = make(loo, split)
        ranks[name] = np.empty(sel.size, np.int64)
        top10[name] = np.zeros((sel.size, COVERAGE_K), np.int64)
        for lo in range(0, sel.size, _CHUNK):
            part = sel[lo:lo + _CHUNK]
            hist = loo.histories(split, part)  # (B, L): the whole history, to remove it
            scores = np.array(scorer(hist), np.float32)  # (B, N + 1), a writable copy
            mask_seen(scores, hist)
            ranks[name][lo:lo + part.size] = target_ranks(scores, loo.targets(split)[part])
            top10[name][lo:lo + part.size] = to_version[top_k(scores, COVERAGE_K)]
        ranks[name][ranks[name] >= TOP] = _MISS  # outside the top-50 list, as a served request
    if version.item2item is not None:
        ranks[ITEM2ITEM], top10[ITEM2ITEM] = _route_alone(version, ds, loo, split, sel, to_version, targets)
    vectors = np.vstack([np.zeros((1, version.items.shape[1]), np.float32), version.items])  # (N + 1, D)
    rows: dict[str, dict[str, float]] = {}
    ndcg: dict[str, np.ndarray] = {}
    for name, r in ranks.items():
        m = ranking_metrics(r, KS)
        m.pop("MRR")  # as the served cuts: over a top-50 list
        shown = np.unique(top10[name][top10[name] > 0])
        m[f"Coverage@{COVERAGE_K}"] = float(shown.size / version.num_items)
        m[f"Diversity@{COVERAGE_K}"] = embedding_diversity(top10[name], vectors)
        m["users"] = int(sel.size)
        rows[name] = m
        ndcg[name] = np.where(r < 10, 1.0 / np.log2(np.minimum(r, 10) + 2.0), 0.0)
    return BaselineEval(split, int(sel.size), rows, ndcg)


def _route_alone(version: LoadedVersion, ds: Dataset, loo: LeaveOneOut, split: Split, sel: np.ndarray,
                 to_version: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(U,) ranks and (U, 10) top-10 of the item-to-item route's own list (version indices)."""
    route = version.item2item
    assert route is not None  # checked by the caller
    starts, ends = ds.offsets[loo.eval_users[sel]], loo.history_end(split)[sel]
    ranks = np.full(sel.size, _MISS, np.int64)
    top10 = np.zeros((sel.size, COVERAGE_K), np.int64)
    for u in range(sel.size):
        history = to_version[ds.items[starts[u]:ends[u]]]  # (L,) oldest first
        got, _ = top_route(*route.score(history, np.unique(history)), TOP)
        hit = np.flatnonzero(got == targets[u])
        if hit.size:
            ranks[u] = hit[0]
        top10[u, : min(COVERAGE_K, got.size)] = got[:COVERAGE_K]
    return ranks, top10


@dataclass(frozen=True)
class Verdict:
    """The served cut against the best baseline on the same users (see the module doc)."""

    served_cut: str
    served: float
    best: str
    best_value: float
    diff: float  # mean(served - best) per-user NDCG@10
    paired_se: float

    @property
    def beats(self) -> bool:
        return self.diff > self.paired_se

    def line(self, users: int, split: str) -> str:
        """One sentence with both numbers and the SE."""
        verb = "beats" if self.beats else "does not beat"
        return (f"served {METRIC} {self.served:.4f} ({self.served_cut} cut) {verb} the best baseline {self.best} "
                f"({self.best_value:.4f}) by more than its paired SE: served - {self.best} = {self.diff:+.4f}, "
                f"paired SE {self.paired_se:.4f} ({users} {split} users)")


def baseline_verdict(ev: ServedEval, bl: BaselineEval, served_cut: str) -> Verdict:
    """The served cut `served_cut` of `ev` against the best baseline of `bl` (same users)."""
    if ev.users != bl.users or ev.split != bl.split:
        raise ValueError(f"the cuts ({ev.users} {ev.split} users) and the baselines ({bl.users} {bl.split} users) "
                         "must be measured on the same users")
    if not bl.rows:
        raise ValueError("no baseline was measured")
    best = max(bl.rows, key=lambda name: bl.rows[name][METRIC])  # first listed on a tie
    d = ev.ndcg[served_cut] - bl.ndcg[best]  # (U,)
    se = float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else 0.0
    return Verdict(served_cut, float(ev.cuts[served_cut][METRIC]), best, float(bl.rows[best][METRIC]),
                   float(d.mean()), se)


def baselines_block(bl: BaselineEval, v: Verdict, allowed_below: bool) -> Baselines:
    """The manifest's `serving.baselines`."""
    rows = {name: {k: m[k] for k in BASELINE_COLUMNS if k in m} for name, m in bl.rows.items()}
    return Baselines(rows=rows, best=v.best, served_cut=v.served_cut, served_minus_best=v.diff,
                     paired_se=v.paired_se, rule="served - best > paired SE (per-user NDCG@10)",
                     beats=v.beats, allowed_below=allowed_below and not v.beats)
