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
validation users; the pre-ranker records them (prerank.serving.pair_prior.route) and publish
serves them instead of tuning again, so the rankers' lists are the served ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from service.contract.pair_features import PAIR_FEATURES
from service.item2item import DEFAULT_SERVING, Item2ItemRoute, Merged, merge_routes
from service.pair_features import PairTables, category_codes, item_popularity, pair_features
from training.checkpoints import RetrievalModel
from training.data.dataset import Dataset
from training.data.splits import pad_left
from training.publish.catalog import item_features_of
from training.stages.retrieval.item2item import Item2ItemConfig, build_table
from training.stages.retrieval.route_search import TOP, Setting, coordinate_search
from training.stages.retrieval.train import fused_top


@dataclass(eq=False)
class ListRoutes:
    """The item-to-item route (None: lists without it) and the pair tables, from one set of interactions."""

    route: Item2ItemRoute | None
    tables: PairTables


def list_routes(ds: Dataset, train_mask: np.ndarray, item2item: Item2ItemConfig | None = Item2ItemConfig(),
                serving: Mapping[str, float] | None = None) -> ListRoutes:
    """The route's table and the popularity columns from ds's rows in `train_mask` (the rows the
    list-making retriever trained on), the category codes from the catalog; `serving`: the
    route's request settings (default DEFAULT_SERVING)."""
    items, users = ds.items[train_mask], ds.users[train_mask]
    cats = category_codes(item_features_of(ds), ds.num_items)
    pop = item_popularity(items, users, ds.num_items)
    if item2item is None:
        return ListRoutes(None, PairTables(pop, cats))
    nb, sc = build_table(items, users, ds.num_items, item2item)
    return ListRoutes(with_settings(Item2ItemRoute(nb, sc), serving), PairTables(pop, cats, nb, sc))


def with_settings(route: Item2ItemRoute, serving: Mapping[str, float] | None) -> Item2ItemRoute:
    """`route` with the request settings `serving` (recent, decay, candidates, beta; default DEFAULT_SERVING)."""
    s = {**DEFAULT_SERVING, **(serving or {})}
    return replace(route, recent=int(s["recent"]), decay=float(s["decay"]), candidates=int(s["candidates"]),
                   beta=float(s["beta"]))


def tune_route_settings(model: RetrievalModel, routes: ListRoutes, ds: Dataset, starts: np.ndarray,
                        ends: np.ndarray, targets: np.ndarray, candidates: int = 200) -> tuple[Setting, list[dict[str, float]]]:
    """The route's request settings as publish chooses them (route_search.coordinate_search over
    NDCG@10 of the merged retrieval cut) for the histories ds.items[starts : ends] and their
    `targets`; the encoder runs once. -> (settings, every setting tried with its NDCG@10)."""
    assert routes.route is not None
    table = model.item_embedding.weight.detach().numpy().astype(np.float32)
    top = fused_top(model, pad_left(ds.items, np.asarray(starts), np.asarray(ends), None), candidates)
    hists = [ds.items[s:e].astype(np.int64) for s, e in zip(starts, ends)]
    banned = [np.unique(h) for h in hists]

    def measure(setting: Setting) -> float:
        route = with_settings(routes.route, setting)  # type: ignore[arg-type]
        gain = 0.0
        for j, h in enumerate(hists):
            real = top.items[j] > 0
            m = merge_routes(top.items[j][real], top.scores[j][real], top.launchers[j][real], route, h, banned[j],
                             top.users[j], table[1:])
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
    for c0 in range(0, B, chunk):
        sl = slice(c0, c0 + chunk)
        top = fused_top(model, pad_left(ds.items, starts[sl], ends[sl], None), candidates)
        users.append(top.users)
        for j in range(top.items.shape[0]):
            b = c0 + j
            hist = ds.items[starts[b]:ends[b]].astype(np.int64)
            real = top.items[j] > 0
            cand, fused, launch = top.items[j][real], top.scores[j][real], top.launchers[j][real]
            if route is None:
                m = Merged.faiss_only(cand, fused, launch)
            else:
                m = merge_routes(cand, fused, launch, route, hist, np.unique(hist), top.users[j], table[1:])
            n = m.items.size
            items[b, :n], merged[b, :n], retrieval[b, :n], launchers[b, :n] = m.items, m.merged, m.retrieval, m.launchers
            feats[b, :n] = pair_features(routes.tables, hist, m)
    return MergedLists(items, merged, retrieval, launchers, feats, np.concatenate(users) if users else
                       np.zeros((0, 1, table.shape[1]), np.float32))
