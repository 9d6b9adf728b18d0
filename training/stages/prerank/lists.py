"""The rankers' candidate lists as served: the retriever's fused top-C merged with the
item-to-item route (service/item2item.py merge_routes, the service's own function) and each
candidate's pair features (service/pair_features.py, the service's own function).

`make_lists(retriever, routes, ds, starts, ends)` is the one list maker: the pre-ranker's
training / validation / test lists (training/stages/prerank/data.py) and the re-ranker's
impressions (training/stages/rerank/upstream.py) all come from it. `routes` must be built only
from the interactions the list-making retriever trained on (`list_routes(ds, that model's
train mask)`): the route's co-occurrence counts and the popularity columns then never contain
a list's target (the ranking fold, folds.py; a K-fold calls it once per fold).

The route's request settings: `tune_route_settings` chooses them as publish does (the same
coordinate search, training/stages/retrieval/route_search.py) on the merged retrieval cut of the
ranking fold's lists (each user's last H training items, from the upstream retriever and tables
that never held them: training/stages/prerank/data.py), or of the validation users for in-sample
lists (H = 0: lists of items the retriever trained on would choose for its memorised scores). The
pre-ranker records them (prerank.serving.pair_prior.route) and publish serves them instead of
tuning again, so the rankers' lists are the served ones. Not on the validation users when there is
a ranking fold: the publish gate compares the cuts on those users, and settings chosen on them
make the retrieval cut look better there than on new users (ml-100k: a gate that switched off a
pre-ranker the test users scored above retrieval); the pre-ranker's prior starts from the merged
order with the chosen beta, so the gate cannot replay it with other settings either.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from service.contract.pair_features import PAIR_FEATURES
from service.item2item import DEFAULT_SERVING, Item2ItemRoute, Merged, merge_routes
from service.contract.pair_features import COOC_RECENT, RECENT_PER_USER
from service.pair_features import PairTables, category_codes, item_counts, pair_features, popularity_columns
from training.checkpoints import RetrievalModel
from training.data.dataset import Dataset
from training.data.splits import pad_left
from training.publish.catalog import item_features_of
from training.stages.retrieval.item2item import Item2ItemConfig, build_table
from training.stages.retrieval.route_search import TOP, Setting, coordinate_search
from training.stages.retrieval.train import fused_top


@dataclass(eq=False)
class ListRoutes:
    """The item-to-item route (None: lists without it) and the pair tables, from one set of
    interactions. counted_end (U,): the exclusive end of each user's rows those tables counted
    (a prefix of the user's rows); counts (N + 1, 2): the popularity columns before log1p;
    config: the table's settings. With them make_lists takes each list's own future out of the
    tables (`without_future`); without them the tables are used as they are."""

    route: Item2ItemRoute | None
    tables: PairTables
    counted_end: np.ndarray | None = None
    counts: np.ndarray | None = None
    config: Item2ItemConfig | None = None


def list_routes(ds: Dataset, train_mask: np.ndarray, item2item: Item2ItemConfig | None = Item2ItemConfig(),
                serving: Mapping[str, float] | None = None) -> ListRoutes:
    """The route's table and the popularity columns from ds's rows in `train_mask` (the rows the
    list-making retriever trained on), the category codes from the catalog; `serving`: the
    route's request settings (default DEFAULT_SERVING)."""
    items, users = ds.items[train_mask], ds.users[train_mask]
    cats = category_codes(item_features_of(ds), ds.num_items)
    counts = item_counts(items, users, ds.num_items)
    pop = popularity_columns(counts)
    counted_end = ds.offsets[:-1] + np.bincount(users, minlength=ds.num_users)  # the mask is a prefix per user
    if item2item is None:
        return ListRoutes(None, PairTables(pop, cats), counted_end, counts)
    nb, sc = build_table(items, users, ds.num_items, item2item)
    return ListRoutes(Item2ItemRoute(nb, sc).with_serving(serving), PairTables(pop, cats, nb, sc), counted_end,
                      counts, item2item)


@contextmanager
def without_future(routes: ListRoutes, seq: np.ndarray, cut: int) -> Iterator[None]:
    """Inside the block, `routes`' tables read as if built without the rows seq[cut:] (seq: one
    user's rows that the tables counted, in time order; cut: where a list's history ends), i.e.
    without the list's target and what follows it, which a served request's tables never hold
    (the in-sample lists' leak otherwise: the route would always reach the target through the
    target's own transition). Patched in place and restored on exit; only what a request with
    history seq[:cut] reads: the popularity rows of the touched items, and the table rows of the
    last max(recent, COOC_RECENT) history items (an entry whose count falls to zero is dropped;
    an item that would newly enter a row's top R is not added)."""
    seq = np.asarray(seq, np.int64)
    future = seq[cut:]
    tables = routes.tables
    if routes.counts is None or future.size == 0 or cut <= 0:
        yield
        return
    saved: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    fut_items, fut_n = np.unique(future, return_counts=True)
    old_recent, new_recent = seq[-RECENT_PER_USER:], seq[:cut][-RECENT_PER_USER:]
    touched = np.unique(np.concatenate([fut_items, old_recent, new_recent]))
    cnt = routes.counts[touched].copy()  # (T, 2)
    cnt[np.searchsorted(touched, fut_items), 0] -= fut_n
    np.subtract.at(cnt[:, 1], np.searchsorted(touched, old_recent), 1)
    np.add.at(cnt[:, 1], np.searchsorted(touched, new_recent), 1)
    saved.append((tables.items, touched, tables.items[touched].copy()))
    nb, sc, cfg = tables.neighbours, tables.scores, routes.config
    if routes.route is not None and (routes.route.neighbours is not nb or routes.route.scores is not sc):
        raise ValueError("the route and the pair tables must share one item-to-item table")
    if nb is not None and sc is not None and cfg is not None:
        reach = max(routes.route.recent if routes.route is not None else 0, COOC_RECENT)
        rows = np.unique(seq[:cut][-reach:])  # the rows a request reads
        # the user's own pairs the table counted with the follower at cut or later: p < q <= p + window
        p = np.concatenate([np.arange(max(cut - d, 0), seq.size - d) for d in range(1, cfg.window + 1)])
        q = np.concatenate([np.arange(max(cut - d, 0), seq.size - d) + d for d in range(1, cfg.window + 1)])
        src, dst = seq[p], seq[q]
        ok = (src != dst) & np.isin(src, rows)
        n1 = nb.shape[0]
        leak_keys, inv = np.unique(src[ok] * n1 + dst[ok], return_inverse=True)
        leak = np.bincount(inv, weights=1.0 / (q[ok] - p[ok]), minlength=leak_keys.size)
        block = nb[rows].astype(np.int64)  # (A, R)
        hit = (block > 0) & (np.isin(block, fut_items) | np.isin(rows, fut_items)[:, None])
        if hit.any():
            ai, ri = np.nonzero(hit)
            a, b = rows[ai], block[ai, ri]
            pop = routes.counts[:, 0].astype(np.float64)
            pa, pb = pop[a], pop[b]
            c = sc[a, ri].astype(np.float64) * pa ** (1.0 - cfg.alpha) * pb ** cfg.alpha  # the counts back
            key = a * n1 + b
            at = np.minimum(np.searchsorted(leak_keys, key), max(leak_keys.size - 1, 0))
            left = c - (np.where(leak_keys[at] == key, leak[at], 0.0) if leak_keys.size else 0.0)

            def future_count(x: np.ndarray) -> np.ndarray:
                i = np.minimum(np.searchsorted(fut_items, x), fut_items.size - 1)
                return np.where(fut_items[i] == x, fut_n[i], 0)

            pa, pb = pa - future_count(a), pb - future_count(b)
            keep = (left > 1e-5 * c) & (pa > 0) & (pb > 0)
            saved += [(nb, rows, nb[rows].copy()), (sc, rows, sc[rows].copy())]
            nb[a, ri] = np.where(keep, b, 0)
            sc[a, ri] = np.where(keep, left / (np.maximum(pa, 1) ** (1.0 - cfg.alpha) * np.maximum(pb, 1) ** cfg.alpha), 0.0)
    tables.items[touched] = popularity_columns(cnt)
    try:
        yield
    finally:
        for arr, idx, old in reversed(saved):
            arr[idx] = old


def _table_stops(routes: ListRoutes, ds: Dataset, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """(B,) the end of each list's user rows that `routes`' tables counted (at least the list's
    history end): without_future takes rows[end : stop] out of the tables."""
    ends = np.asarray(ends, np.int64)
    if routes.counted_end is None:
        return ends
    return np.maximum(routes.counted_end[ds.users[np.asarray(starts, np.int64)]], ends)


def tune_route_settings(model: RetrievalModel, routes: ListRoutes, ds: Dataset, starts: np.ndarray,
                        ends: np.ndarray, targets: np.ndarray, candidates: int = 200) -> tuple[Setting, list[dict[str, float]]]:
    """The route's request settings as publish chooses them (route_search.coordinate_search over
    NDCG@10 of the merged retrieval cut) for the histories ds.items[starts : ends] and their
    `targets`; the encoder runs once. -> (settings, every setting tried with its NDCG@10)."""
    base = routes.route
    assert base is not None
    table = model.item_embedding.weight.detach().numpy().astype(np.float32)
    top = fused_top(model, pad_left(ds.items, np.asarray(starts), np.asarray(ends), None), candidates)
    hists = [ds.items[s:e].astype(np.int64) for s, e in zip(starts, ends)]
    banned = [np.unique(h) for h in hists]
    stops = _table_stops(routes, ds, starts, ends)

    def measure(setting: Setting) -> float:
        route = base.with_serving(setting)
        gain = 0.0
        for j, h in enumerate(hists):
            real = top.items[j] > 0
            with without_future(routes, ds.items[starts[j]:stops[j]], int(ends[j] - starts[j])):
                m = merge_routes(top.items[j][real], top.scores[j][real], top.launchers[j][real], route, h,
                                 banned[j], top.users[j], table[1:])
            hit = np.flatnonzero(m.items[:TOP] == targets[j])
            gain += 1.0 / np.log2(hit[0] + 2.0) if hit.size else 0.0
        return gain / max(len(hists), 1)

    best, tried = coordinate_search(measure)
    serving = {k: (int(best[k]) if k in ("recent", "candidates") else float(best[k])) for k in DEFAULT_SERVING}
    return serving, tried


@dataclass
class MergedLists:
    """B candidate lists in merged-retrieval order, right-padded to width W (item 0).

    items (B, W) int64; merged (B, W) float32 the retrieval stage's score (-inf padding);
    retrieval (B, W) float32 the fused score; launchers (B, W) int64; features (B, W, F) float32
    pair features (0 padding); users (B, M, D) float32 the retriever's user vectors."""

    items: np.ndarray
    merged: np.ndarray
    retrieval: np.ndarray
    launchers: np.ndarray
    features: np.ndarray
    users: np.ndarray

    @property
    def mask(self) -> np.ndarray:
        return self.items > 0

    def take(self, rows: np.ndarray) -> MergedLists:
        return MergedLists(self.items[rows], self.merged[rows], self.retrieval[rows], self.launchers[rows],
                           self.features[rows], self.users[rows])


def make_lists(model: RetrievalModel, routes: ListRoutes, ds: Dataset, starts: np.ndarray, ends: np.ndarray,
               candidates: int = 200, chunk: int = 1024) -> MergedLists:
    """The served retrieval stage for the histories ds.items[starts[b] : ends[b]] (whole
    histories: every seen item is removed; the encoder keeps its maxlen): FAISS-equivalent
    fused top-`candidates`, merged with the route, with pair features."""
    starts, ends = np.asarray(starts, np.int64), np.asarray(ends, np.int64)
    table = model.item_embedding.weight.detach().numpy().astype(np.float32)  # (N + 1, D)
    route = routes.route
    width = min(candidates, ds.num_items) + (route.candidates if route is not None else 0)
    B, F = starts.size, len(PAIR_FEATURES)
    items = np.zeros((B, width), np.int64)
    merged = np.full((B, width), -np.inf, np.float32)
    retrieval = np.full((B, width), -np.inf, np.float32)
    launchers = np.zeros((B, width), np.int64)
    feats = np.zeros((B, width, F), np.float32)
    users: list[np.ndarray] = []
    stops = _table_stops(routes, ds, starts, ends)
    for c0 in range(0, B, chunk):
        sl = slice(c0, c0 + chunk)
        top = fused_top(model, pad_left(ds.items, starts[sl], ends[sl], None), candidates)
        users.append(top.users)
        for j in range(top.items.shape[0]):
            b = c0 + j
            hist = ds.items[starts[b]:ends[b]].astype(np.int64)
            real = top.items[j] > 0
            cand, fused, launch = top.items[j][real], top.scores[j][real], top.launchers[j][real]
            with without_future(routes, ds.items[starts[b]:stops[b]], int(ends[b] - starts[b])):
                if route is None:
                    m = Merged.faiss_only(cand, fused, launch)
                else:
                    m = merge_routes(cand, fused, launch, route, hist, np.unique(hist), top.users[j], table[1:])
                feats[b, :m.items.size] = pair_features(routes.tables, hist, m)
            n = m.items.size
            items[b, :n], merged[b, :n], retrieval[b, :n], launchers[b, :n] = m.items, m.merged, m.retrieval, m.launchers
    return MergedLists(items, merged, retrieval, launchers, feats, np.concatenate(users) if users else
                       np.zeros((0, 1, table.shape[1]), np.float32))
