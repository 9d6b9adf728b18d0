"""Re-ranking impressions built from the real pipeline (issue #5).

An impression is what the re-ranker would have been shown: for a user at time step t (the
history is the user's first t interactions), retrieval scores the catalog, the history's items
are removed, the top C go to the pre-ranker, and its top N (in pre-rank order) form the list.
An entry is clicked (label 1) when the user interacts with that item within the next T steps,
i.e. at positions t .. t + T - 1 of the sequence.

Where the lists come from (LeaveOneOut; only each user's TRAINING part is ever read, so no
validation or test interaction is a history item or a click):
    n = training length of the user, positions 0 .. n - 1
    eval steps   s in [n - T - E + 1, n - T]    the last E steps whose whole click window
                                                [s, s + T) fits inside the training part
    train steps  t in [1, s_first - T]          sampled, at most `lists_per_user`, seeded;
                                                t + T <= s_first: a training list's clicks end
                                                before the first evaluation step
Evaluation lists are split by user (seeded, `valid_frac`) into validation lists (early
stopping, tuning) and test lists (reported). Why the last steps and not random steps: the
re-ranker is trained on the past and judged on the future, as deployed, and the gap of T steps
keeps every training click out of every evaluation window, so no click event is both trained
on and tested. Why split the evaluation users: the validation and test windows of one user
overlap, so a user's lists go to one side only.
With a ranking fold (training/stages/prerank/folds.py: the upstream retriever trained with
`--holdout H`) the lists are out of sample instead: every step comes from the user's re-rank
window [n - H + P, n), the retriever never trained on those positions and the pre-ranker only on
earlier ones; the window's users are split train / valid / test (`valid_frac` / 2 each for the
two evaluation sides). With K-fold lists (`folds` K) the same, over each user's last R training
positions, the lists of a user coming from the retriever of their fold (FoldLists). Without one (H = 0) the steps are sampled as above from the whole
training part, in-sample for both upstream stages.

Per candidate (what models/prm.py reads; all fixed, no label enters a feature):
    item_feats (F)  [retrieval item embedding (D) ; pre-rank item heads mean-pooled (d) ;
                     log1p training count], each column z-scored over the catalog
                     (rerank_item_features); with a pair prior then the pair features (P),
                     z-scored with its statistics (service/contract/rerank_inputs.py)
    pv (L * H)      the IntTower interactions: for every user layer l and user head h,
                    max over item heads g of <m_u^{l,h}, m_v^{g}>; z-scored per column with
                    training-list statistics. Their sum is the pre-rank score.
    init_score      the pre-rank score, z-scored within each list (real entries); with
                    `retrieval_score` also the fused retrieval score, z-scored the same way
                    (the re-ranker's num_scores = 2)
The candidates come from the offline scorer of the earlier stages (upstream.py), the feature
formulas and PV statistics from service/contract/rerank_inputs.py (the service uses the same).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from service.contract.rerank_inputs import PVStats, list_zscore
from training.data.splits import LeaveOneOut, Split
from training.stages.rerank.sampling import ImpressionConfig, Steps, click_labels, sample_steps
from training.stages.rerank.train import ListData
from training.stages.prerank.upstreams import by_fold
from training.stages.rerank.upstream import Pipeline, Ranked, rank_candidates


def list_data(pipe: Pipeline, ranked: Ranked, labels: np.ndarray, stats: PVStats, list_len: int,
              retrieval_score: bool = False) -> ListData:
    """ListData of the top `list_len` of `ranked` (pre-rank order); labels (B, list_len); with
    `retrieval_score` the fused retrieval scores as the second score input."""
    items = ranked.items[:, :list_len]
    mask = items > 0
    pv = stats.normalize(ranked.pv[:, :list_len])  # (B, N, L * H), as the service does
    init = list_zscore(ranked.scores[:, :list_len], mask)  # z-score within the list
    ret = list_zscore(ranked.ret_scores[:, :list_len], mask) if retrieval_score else None
    feats = pipe.item_feats[items]  # (B, N, F)
    if ranked.pair is not None:  # (B, N, F + P): the pair features, z-scored as the service does
        feats = np.concatenate([feats, pipe.pair_normalize(ranked.pair[:, :list_len])], axis=-1)
    return ListData(feats * mask[..., None], pv * mask[..., None], init, labels * mask, mask, ret)


@dataclass
class Impressions:
    """Train / valid / test lists, the steps they come from and the PV statistics."""

    train: ListData
    valid: ListData
    test: ListData
    steps: dict[str, Steps]
    items: dict[str, np.ndarray]  # split -> (B, N) item indices of the lists
    pv_stats: PVStats
    config: ImpressionConfig

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"config": asdict(self.config)}
        for name in ("train", "valid", "test"):
            d: ListData = getattr(self, name)
            pos = d.labels.sum(axis=1)
            out[name] = {"lists": len(d), "with_click": int((pos > 0).sum()),
                         "clicks_per_list": float(pos.mean()), "users": int(np.unique(self.steps[name].users).size)}
        return out


@dataclass(eq=False)
class FoldLists:
    """K-fold lists (training/stages/prerank/folds.py): pipes[k] (fold k's retriever, in the served
    basis, + the pre-ranker) ranks the steps of fold k's users."""

    pipes: list[Pipeline]
    fold_of_user: np.ndarray  # (U,)

    def rank(self, users: np.ndarray, ends: np.ndarray, cfg: ImpressionConfig,
             progress: Callable[[str], None] | None = None) -> Ranked:
        users, ends = np.asarray(users, dtype=np.int64), np.asarray(ends, dtype=np.int64)
        return by_fold(self.fold_of_user[users], len(self.pipes),
                       lambda k, sel: rank_candidates(self.pipes[k], users[sel], ends[sel], cfg, progress))


def build_impressions(pipe: Pipeline, loo: LeaveOneOut, cfg: ImpressionConfig,
                      progress: Callable[[str], None] | None = None, folds: FoldLists | None = None) -> Impressions:
    """Sample steps, generate candidates with the real stages, label clicks, assemble ListData.
    With `folds` each step's list comes from its user's fold pipeline, and `pipe` (the served
    one) gives the item features."""
    ds = pipe.dataset
    steps = sample_steps(loo, cfg)
    ranked, labels = {}, {}
    for name, st in steps.items():
        ranked[name] = (rank_candidates(pipe, st.users, st.ends(ds), cfg, progress) if folds is None
                        else folds.rank(st.users, st.ends(ds), cfg, progress))
        labels[name] = click_labels(ds, loo, st, ranked[name].items[:, : cfg.list_len], cfg.horizon)
    top = ranked["train"].items[:, : cfg.list_len] > 0
    stats = PVStats.fit(ranked["train"].pv[:, : cfg.list_len], top)
    parts = {n: list_data(pipe, ranked[n], labels[n], stats, cfg.list_len, cfg.retrieval_score) for n in steps}
    return Impressions(parts["train"], parts["valid"], parts["test"], steps,
                       {n: ranked[n].items[:, : cfg.list_len] for n in steps}, stats, cfg)


# --- lists of the leave-one-out users ---


def leave_one_out_lists(pipe: Pipeline, loo: LeaveOneOut, split: Split, stats: PVStats, cfg: ImpressionConfig,
                        progress: Callable[[str], None] | None = None) -> ListData:
    """The lists the service would re-rank for each leave-one-out user (history before the
    `split` target; retrieval top-C -> pre-rank top N), labelled with that target: early stopping
    on these measures what is served (the next item), not the impressions' click horizon."""
    users = loo.eval_users
    ranked = rank_candidates(pipe, users, loo.history_end(split), cfg, progress)
    labels = (ranked.items[:, : cfg.list_len] == loo.targets(split)[:, None]).astype(np.float32)
    return list_data(pipe, ranked, labels, stats, cfg.list_len, cfg.retrieval_score)
