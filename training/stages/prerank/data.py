"""Pre-ranking data: the encoded rows of the two objectives (training/stages/prerank/train.py).

- `ctr` (build_ctr_data): explicit ratings, label = rating > 3, rating 3 dropped, per-user
  temporal split (CTRSplit); features fitted on the training rows only.
- `next-item` (build_next_item_data): each training position's next item is the positive; its
  hard negatives are the retrieval candidates of its history; evaluation lists are the
  retrieval top-C of each leave-one-out user. With `Retrievers` the lists come from the ranking
  fold (training/stages/prerank/folds.py) and carry the cascade inputs (the retriever's scores,
  launchers and vectors); with `Retrievers.pair` (the default) every list is the served one,
  merged with the item-to-item route and carrying the pair features (lists.py make_lists: the
  training lists from the upstream retriever with the route built from its own rows, the
  validation / test lists from the served retriever with the route of the training part).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from models.cascade import PairPrior, PairPriorConfig, RetrievalPrior, RetrievalPriorConfig
from service.contract.pair_features import PAIR_FEATURES, STD_FLOOR, feature_index
from service.item2item import DEFAULT_SERVING
from training.checkpoints import RetrievalModel
from training.data.dataset import DataError, Dataset
from training.stages.retrieval.encoders import served_vectors
from training.data.splits import CTRSplit, LeaveOneOut, Split, pad_left
from training.data.features import (
    RETRIEVAL_ITEM,
    RETRIEVAL_USER,
    EncodedFields,
    FeatureSpec,
    declare_features,
    fit_spec,
    item_columns,
    label_aggregates,
    recent_histories,
    retrieval_columns,
    user_columns,
)
from training.eval.metrics import Scorer, mask_seen
from training.stages.prerank.folds import prerank_rows
from training.stages.prerank.upstreams import UpstreamSet, by_fold
from training.stages.prerank.lists import MergedLists, list_routes, make_lists, tune_route_settings
from training.stages.retrieval.item2item import Item2ItemConfig
from training.stages.retrieval.train import FusedTop, fused_top


@dataclass
class PairRows:
    """Aligned (user, item, label) rows for the CTR objective."""

    user: EncodedFields
    item: EncodedFields
    items: np.ndarray  # (E,) item index of each row
    labels: np.ndarray  # (E,) float32

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class CTRData:
    spec: FeatureSpec
    train: PairRows
    valid: PairRows
    test: PairRows
    catalog: EncodedFields  # (N + 1,) item rows with training aggregates, for export


def build_ctr_data(ds: Dataset, split: CTRSplit, history_len: int = 50) -> CTRData:
    """Encode the CTR split; the spec (vocabularies, statistics, aggregates) sees train rows only."""
    decl = declare_features(ds, "ctr", history_len)
    labels = split.labels

    def raw(rows: np.ndarray, train: bool) -> tuple[dict, dict]:
        agg = label_aggregates(ds, split.train_idx, labels, rows, leave_one_out=train)
        u = user_columns(ds, ds.users[rows], recent_histories(ds, rows, history_len))
        i = item_columns(ds, ds.items[rows])
        u.update({k: v for k, v in agg.items() if k.startswith("user_")})
        i.update({k: v for k, v in agg.items() if k.startswith("item_")})
        return u, i

    u_train, i_train = raw(split.train_idx, train=True)
    spec = fit_spec(decl, u_train, i_train)

    def rows_of(idx: np.ndarray, u: dict, i: dict) -> PairRows:
        return PairRows(spec.user.encode(u), spec.item.encode(i), ds.items[idx], labels[idx].astype(np.float32))

    parts = {"train": rows_of(split.train_idx, u_train, i_train)}
    for name, idx in (("valid", split.valid_idx), ("test", split.test_idx)):
        parts[name] = rows_of(idx, *raw(idx, train=False))
    agg = split.aggregates()  # per item, training rows only
    cat = item_columns(ds, np.arange(ds.num_items + 1))
    cat.update({k: v for k, v in agg.items() if k.startswith("item_")})
    return CTRData(spec, **parts, catalog=spec.item.encode(cat))


@dataclass
class CandidateLists:
    """Evaluation lists for one leave-one-out split: retrieval top-C per evaluated user."""

    user: EncodedFields  # (B,) rows
    candidates: np.ndarray  # (B, C) item indices in retrieval order
    retrieval_scores: np.ndarray  # (B, C)
    targets: np.ndarray  # (B,)
    launchers: np.ndarray | None = None  # (B, C) int64 launcher of each fused score (cascade inputs)
    features: np.ndarray | None = None  # (B, C, F) pair features (lists merged with the route; 0 = padding item)


@dataclass(eq=False)
class Retrievers:
    """Where the pre-ranker's lists and cascade inputs come from (training/stages/prerank/folds.py).

    served: the retriever the version serves (validation / test lists, export); upstream: the one
    that made the training lists, trained with `holdout` (the same model and 0 for in-sample
    lists); window: held-out positions the training examples come from (default: holdout; 0 =
    every training position); features: the retrieval score, launcher and vectors as inputs;
    pair: the lists merged with the item-to-item route as served, with pair features and the
    learned pair prior (training/stages/prerank/lists.py; needs `features`); item2item: the
    route's table settings (None: lists of FAISS alone, still with pair features).
    """

    served: RetrievalModel
    upstream: RetrievalModel
    holdout: int = 0
    window: int | None = None
    features: bool = True
    # K-fold lists (training/stages/prerank/folds.py): user u's training lists come from
    # fold_set.models[fold_of_user[u]] (in the served basis); `upstream` is then the served one
    fold_set: UpstreamSet | None = None

    def rows(self, loo: LeaveOneOut) -> np.ndarray:
        """(E,) the pre-rank training targets of this scheme (prerank_rows); an explicit `window`
        is a holdout window whatever the scheme."""
        if self.window is None and self.fold_set is not None and self.fold_set.folds:
            return prerank_rows(loo, 0, kfold=True)
        return prerank_rows(loo, self.holdout if self.window is None else self.window)

    def training_lists(self, ds: Dataset, rows: np.ndarray, k: int) -> FusedTop:
        """The top-k of each training row's history from the retriever that makes that user's lists."""
        fs = self.fold_set
        if fs is None:
            return _fused_rows(self.upstream, ds, rows, k)
        return by_fold(fs.fold_of_user[ds.users[rows]], len(fs.models),
                       lambda f, sel: _fused_rows(fs.models[f], ds, rows[sel], k))
    pair: bool = True
    item2item: Item2ItemConfig | None = field(default_factory=Item2ItemConfig)

    @property
    def dims(self) -> tuple[int, int]:
        """(M, D) of the user vectors: M = launchers, or 1 for plain SASRec."""
        cfg = self.served.config
        return served_vectors(cfg), cfg.dim


@dataclass
class NextItemData:
    spec: FeatureSpec
    catalog: EncodedFields  # (N + 1,) item rows as served; row 0 = padding
    train_user: EncodedFields  # (E,) one row per training example
    train_targets: np.ndarray  # (E,)
    train_candidates: np.ndarray  # (E, C) int32 retrieval candidates of each example's history
    valid: CandidateLists
    test: CandidateLists
    # cascade inputs (None without them): the upstream retriever's user vectors of each example
    # (E, M, D), its item table (N + 1, D) and the catalog rows encoded with it (training only)
    train_users: np.ndarray | None = None
    train_table: np.ndarray | None = None
    train_catalog: EncodedFields | None = None
    # the training lists merged with the route, with pair features (Retrievers.pair); rows whose
    # target is not in its list are left out (nothing to order)
    train_lists: MergedLists | None = None
    train_list_users: np.ndarray | None = None  # (E,) the data set's user index of each training list
    # the route's request settings the lists were made with (tuned by publish's search on the ranking
    # fold's lists, on the validation users for in-sample lists: lists.py; publish then serves them:
    # prerank.serving.pair_prior.route)
    route_serving: dict[str, float] | None = None

    @property
    def cascade(self) -> bool:
        return self.train_users is not None

    @property
    def num_launchers(self) -> int:
        return 1 if self.train_users is None else int(self.train_users.shape[1])


def top_candidates(scorer: Scorer, histories: np.ndarray, k: int, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Retrieval top-k with seen items removed: (B, k) item indices and their scores."""
    items, scores = [], []
    for start in range(0, histories.shape[0], batch_size):
        hist = histories[start : start + batch_size]
        s = np.array(scorer(hist), dtype=np.float32, copy=True)
        mask_seen(s, hist)
        top = torch.topk(torch.from_numpy(s), min(k, s.shape[1] - 1), dim=1)
        items.append(top.indices.numpy())
        scores.append(top.values.numpy())
    return np.concatenate(items), np.concatenate(scores)


def build_next_item_data(
    ds: Dataset,
    loo: LeaveOneOut,
    scorers: dict[Split, Scorer] | None = None,
    history_len: int = 50,
    candidates: int = 200,
    max_train_examples: int | None = None,
    seed: int = 0,
    retrievers: Retrievers | None = None,
) -> NextItemData:
    """Training examples from the training part; evaluation lists from the retriever.

    With `retrievers` (a SASRec): training lists from the upstream retriever over the ranking
    window (training/stages/prerank/folds.py), validation / test lists from the served one, and with
    `retrievers.features` the cascade inputs. Without: `scorers[split]` (e.g. last-item) make
    the lists; `scorers["valid"]` must only know the training part (it also supplies the
    training examples' hard negatives), `scorers["test"]` may know the validation items too.
    """
    if retrievers is None and scorers is None:
        raise ValueError("build_next_item_data needs scorers or retrievers")
    cascade = retrievers if retrievers is not None and retrievers.features else None
    decl = declare_features(ds, "next-item", history_len, cascade.dims if cascade else None)
    rows = prerank_rows(loo, 0) if retrievers is None else retrievers.rows(loo)
    if max_train_examples is not None and rows.size > max_train_examples:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_train_examples, replace=False))
    if rows.size == 0:
        raise DataError(f"{ds.name}: no training example with a history for the next-item objective")
    train_rows = np.flatnonzero(loo.full_train_mask())
    item_cnt = np.log1p(np.bincount(ds.items[train_rows], minlength=ds.num_items + 1)).astype(np.float32)

    def users_raw(users: np.ndarray, hist: np.ndarray, vectors: np.ndarray | None, ends: np.ndarray) -> dict:
        u = user_columns(ds, users, hist)
        # log1p of the history's length: what a request's history gives the service (a user's
        # total training count would differ from it at every training step)
        u["user_log_count"] = np.log1p(ends - ds.offsets[users]).astype(np.float32)
        if cascade:
            assert vectors is not None
            u.update(retrieval_columns(RETRIEVAL_USER, vectors))
        return u

    def items_raw(table: np.ndarray | None) -> dict:
        i = item_columns(ds, np.arange(ds.num_items + 1))
        i["item_log_count"] = item_cnt
        if cascade:
            assert table is not None
            i.update(retrieval_columns(RETRIEVAL_ITEM, table))
        return i

    pair = cascade is not None and cascade.pair
    train_lists: MergedLists | None = None
    served_routes = list_routes(ds, loo.train_mask, cascade.item2item) if pair and cascade else None
    route_serving: dict[str, float] | None = None
    if pair and cascade:
        assert served_routes is not None
        if cascade.fold_set is not None and cascade.fold_set.folds:
            raise ValueError("K-fold ranking data with pair features is not built yet (each fold would need its "
                             "own route table): train the pre-ranker with --no-pair-features, or use in-sample / "
                             "holdout ranking data")
        up_routes = list_routes(ds, ranking_tables_mask(ds, cascade.holdout, loo), cascade.item2item)
        if served_routes.route is not None:  # the route's settings as publish would choose them, then served as such
            if cascade.holdout and up_routes.route is not None:
                # on the ranking fold's lists: out of sample for the upstream and the tables, and not the
                # validation users the publish gate judges the cuts on (lists.py module doc)
                route_serving, _ = tune_route_settings(cascade.upstream, up_routes, ds, ds.offsets[ds.users[rows]],
                                                       rows, ds.items[rows], candidates)
            else:  # in-sample lists would choose for the retriever's memorised scores
                route_serving, _ = tune_route_settings(cascade.served, served_routes, ds, ds.offsets[loo.eval_users],
                                                       loo.history_end("valid"), loo.targets("valid"), candidates)
            served_routes.route = served_routes.route.with_serving(route_serving)
            if up_routes.route is not None:
                up_routes.route = up_routes.route.with_serving(route_serving)
        train_lists = make_lists(cascade.upstream, up_routes, ds, ds.offsets[ds.users[rows]], rows, candidates)
        found = (train_lists.items == ds.items[rows][:, None]).any(axis=1)
        if not found.any():
            raise DataError(f"{ds.name}: no training list holds its target")
        rows, train_lists = rows[found], train_lists.take(np.flatnonzero(found))
    hist = recent_histories(ds, rows, history_len)
    targets = ds.items[rows]
    users_vec: np.ndarray | None = None
    if train_lists is not None:
        train_cands, users_vec = train_lists.items, train_lists.users
    elif retrievers is not None:
        top = retrievers.training_lists(ds, rows, candidates)
        train_cands, users_vec = top.items, top.users
    else:
        assert scorers is not None
        train_cands, _ = top_candidates(scorers["valid"], hist, candidates)
    up_table = _table(cascade.upstream) if cascade else None
    served_table = _table(cascade.served) if cascade else None
    u_train = users_raw(ds.users[rows], hist, users_vec, rows)
    i_up = items_raw(up_table)
    spec = fit_spec(decl, u_train, {k: v[targets] for k, v in i_up.items()})

    def lists(which: Split) -> CandidateLists:
        # candidates from the whole history, so every seen item is removed, not only the last
        # history_len ones (the scorers truncate to their own maxlen themselves)
        h = loo.histories(which, maxlen=history_len)
        if retrievers is None:
            assert scorers is not None
            cands, scores = top_candidates(scorers[which], loo.histories(which), candidates)
            return CandidateLists(spec.user.encode(users_raw(loo.eval_users, h, None, loo.history_end(which))),
                                  cands, scores, loo.targets(which))
        if served_routes is not None:
            ml = make_lists(retrievers.served, served_routes, ds, ds.offsets[loo.eval_users], loo.history_end(which),
                            candidates)
            return CandidateLists(spec.user.encode(users_raw(loo.eval_users, h, ml.users, loo.history_end(which))),
                                  ml.items, ml.merged, loo.targets(which), ml.launchers, ml.features)
        top = fused_top(retrievers.served, loo.histories(which), candidates)
        return CandidateLists(spec.user.encode(users_raw(loo.eval_users, h, top.users, loo.history_end(which))),
                              top.items, top.scores, loo.targets(which), top.launchers)

    return NextItemData(
        spec=spec,
        catalog=spec.item.encode(items_raw(served_table)),
        train_user=spec.user.encode(u_train),
        train_targets=targets,
        train_candidates=train_cands.astype(np.int32),
        valid=lists("valid"),
        test=lists("test"),
        train_users=users_vec if cascade else None,
        train_table=up_table,
        train_catalog=spec.item.encode(i_up) if cascade else None,
        train_lists=train_lists,
        train_list_users=ds.users[rows] if train_lists is not None else None,
        route_serving=route_serving,
    )


def ranking_tables_mask(ds: Dataset, holdout: int, loo: LeaveOneOut) -> np.ndarray:
    """(E,) the rows the ranking lists' route table and pair tables count: ranking_split's training part."""
    return ranking_split(ds, holdout, loo).train_mask


def ranking_split(ds: Dataset, holdout: int, loo: LeaveOneOut) -> LeaveOneOut:
    """The split whose training rows the ranking lists' route table and pair tables count. A ranking
    fold (holdout H > 0): the upstream retriever's own training rows, every user's last H training rows left out,
    so a list's tables never held its target, like a served request's (whose tables were built
    before its history's latest items). In-sample (H = 0): the whole training part, each list
    then read without its own future (lists.py without_future). Not the whole training part for a
    ranking fold: without_future only approximates tables rebuilt without a user's rows (an item
    kept in a row's top R by that user's count stays there), and the pair prior learnt that
    (ml-100k, H = 2, 200 full-batch steps: held-out tail lists +0.09 NDCG@10, the test users -0.013;
    with these tables held-out -0.0006, and after 50 steps the test users +0.008;
    benchmarks/quality/prior_fit_tail.py holdout-tables)."""
    return LeaveOneOut(ds, holdout=holdout) if holdout > 0 else loo


def _table(model: RetrievalModel) -> np.ndarray:
    """(N + 1, D) float32 item embeddings of a retriever."""
    return model.item_embedding.weight.detach().numpy().astype(np.float32)


def _fused_rows(model: RetrievalModel, ds: Dataset, rows: np.ndarray, k: int, chunk: int = 2048) -> FusedTop:
    """fused_top for the histories ds.items[user start : row] of each row, built in chunks
    (whole histories, so every seen item is removed; the encoder keeps its maxlen)."""
    parts = []
    for start in range(0, rows.size, chunk):
        r = rows[start : start + chunk]
        parts.append(fused_top(model, pad_left(ds.items, ds.offsets[ds.users[r]], r, None), k))
    return FusedTop(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("items", "scores", "launchers", "users")))


def retrieval_prior(data: NextItemData, hidden: int = 16) -> RetrievalPrior | PairPrior | None:
    """A fresh prior for cascade data (None without cascade inputs): the pair prior for lists
    with pair features, started at the merged-retrieval order, else the retrieval prior."""
    if not data.cascade:
        return None
    if data.train_lists is None:
        return RetrievalPrior(RetrievalPriorConfig(data.num_launchers))
    x = data.train_lists.features[data.train_lists.mask]  # (R, F) real entries
    mean, sd = x.mean(axis=0), x.std(axis=0)
    sd = np.where(sd > STD_FLOOR, sd, 1.0)
    # z . w = retrieval + beta * route_term - const = the merged score the lists are ordered by
    w = np.zeros(len(PAIR_FEATURES))
    w[feature_index("retrieval")] = sd[feature_index("retrieval")]
    beta = (data.route_serving or DEFAULT_SERVING)["beta"]  # the beta the lists were merged with
    w[feature_index("route_term")] = beta * sd[feature_index("route_term")]
    return PairPrior(PairPriorConfig(len(PAIR_FEATURES), data.num_launchers, hidden, tuple(map(float, w)),
                                     tuple(map(float, mean)), tuple(map(float, sd))))


def fused_pair(users: np.ndarray, table: np.ndarray, items: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """users (b, M, D), table (N + 1, D), items (b, K) -> fused scores (b, K) and launchers (b, K)."""
    per = torch.einsum("bmd,bkd->bkm", torch.from_numpy(users), torch.from_numpy(table[items]))  # (b, K, M)
    score, launcher = per.max(dim=-1)
    return score, launcher
