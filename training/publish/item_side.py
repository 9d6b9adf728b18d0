"""The item side of a grown catalog (`recsys reindex`): cold-start retrieval embeddings for items
no checkpoint was trained on, the retrieval encoder with the grown table, the pre-rank item
heads and the re-rank item features of every item."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from training.checkpoints import RetrievalModel
from service.contract.catalog import ItemCatalog
from service.contract.blocks import Catalog
from training.stages.prerank import train as pr
from training.stages.retrieval.encoders import build_model
from training.publish.build import ItemSide
from service.contract.rerank_inputs import rerank_item_features
from training.publish.sources import Sources
from training.data.features import RETRIEVAL_ITEM, retrieval_columns

log = logging.getLogger(__name__)

COLD_START_RULE = (
    "trained items keep their embedding; any other item gets the mean, over its features with a value "
    "some trained item has (each categorical feature, and each multi-valued feature with its values "
    "averaged first), of the mean embedding of the trained items sharing that value; no such value: "
    "the mean of all trained embeddings. Numeric features are not used."
)
HEADS_BATCH = 65536
_COLD_CHUNK = 1 << 17  # items per cold-start chunk


def distinct_codes(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, K) codes -> the codes sorted per row and a mask of each row's distinct values > 0."""
    srt = np.sort(codes, axis=1)
    first = srt > 0
    first[:, 1:] &= srt[:, 1:] != srt[:, :-1]
    return srt, first


def cold_start_embeddings(table: np.ndarray, catalog: ItemCatalog, n_trained: int,
                          rows: np.ndarray) -> tuple[np.ndarray, int]:
    """COLD_START_RULE for `rows` (R,): (R, D) float32 embeddings and how many fell back to the
    global mean. table (n_trained + 1, D): the trained embeddings, row 0 padding."""
    trained = table[1 : n_trained + 1].astype(np.float64)  # (T, D)
    D = trained.shape[1]
    if rows.size == 0:  # nothing new in the catalog: a plain rebuild
        return np.empty((0, D), dtype=np.float32), 0
    # per feature: codes of `rows` (R, K), their distinct-value mask (R, K), value means (V, D), known (V,)
    centroids: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    for col in (*catalog.categorical.values(), *catalog.multi.values()):
        codes, hit = distinct_codes(col[1 : n_trained + 1].reshape(n_trained, -1))  # (T, K)
        V = int(col.max(initial=0)) + 1
        owner = np.broadcast_to(np.arange(n_trained)[:, None], codes.shape)[hit]
        count = np.bincount(codes[hit], minlength=V)
        sums = np.stack([np.bincount(codes[hit], weights=trained[owner, d], minlength=V) for d in range(D)], axis=1)
        known = count > 0
        known[0] = False
        mean = sums / np.maximum(count, 1)[:, None]  # (V, D)
        centroids.append((*distinct_codes(col[rows].reshape(rows.size, -1)), mean, known))
    out = np.empty((rows.size, D), dtype=np.float32)
    fallback = trained.mean(axis=0)
    n_global = 0
    for s in range(0, rows.size, _COLD_CHUNK):
        r = min(_COLD_CHUNK, rows.size - s)
        acc, used = np.zeros((r, D)), np.zeros(r)
        for codes, first, mean, known in centroids:
            c = codes[s : s + r]  # (r, K)
            ok = known[c] & first[s : s + r]
            feat = np.zeros((r, D))
            for k in range(c.shape[1]):  # not one (r, K, D) gather: K may be 64
                feat += ok[:, k, None] * mean[c[:, k]]
            cnt = ok.sum(axis=1)
            acc += feat / np.maximum(cnt, 1)[:, None]
            used += cnt > 0
        none = used == 0
        acc[none] = fallback
        n_global += int(none.sum())
        out[s : s + r] = acc / np.maximum(used, 1)[:, None]
    return out, n_global


def extend_retrieval(model: RetrievalModel, table: np.ndarray) -> RetrievalModel:
    """A copy of `model` whose item embedding table is `table` (N + 1, D), row 0 padding."""
    grown = build_model(dataclasses.replace(model.config, num_items=table.shape[0] - 1))  # the same encoder
    state = model.state_dict()
    state["item_embedding.weight"] = torch.from_numpy(np.ascontiguousarray(table, dtype=np.float32))
    grown.load_state_dict(state)
    return grown.eval()


def head_inputs(src: Sources, catalog: ItemCatalog, table: np.ndarray) -> dict[str, np.ndarray]:
    """The raw item columns (N + 1 rows) the pre-ranker's item tower reads; table (N + 1, D): the
    retrieval table, for a pre-ranker that reads it (RETRIEVAL_ITEM)."""
    item_spec = src.spec.item
    raw: dict[str, np.ndarray] = {"item_id": np.arange(catalog.num_items + 1),
                                  "item_log_count": np.log1p(catalog.popularity).astype(np.float32)}
    if any(name.startswith(RETRIEVAL_ITEM + ":") for name in item_spec.dense):
        raw.update(retrieval_columns(RETRIEVAL_ITEM, table))
    raw.update(catalog.categorical)
    raw.update(catalog.numeric)
    for name, col in catalog.multi.items():
        width = item_spec.multi[name][1] if name in item_spec.multi else col.shape[1]
        raw[name] = col[:, :width]  # lists are left-aligned: keep their first values
    return raw


def unchanged_rows(raw: dict[str, np.ndarray], reference: dict[str, np.ndarray], n: int) -> np.ndarray:
    """Items 1..n whose item-tower inputs in `raw` equal those in `reference` (sorted indices)."""
    same = np.ones(n, dtype=bool)
    for name, col in raw.items():
        if name not in reference:
            return np.empty(0, dtype=np.int64)
        a, b = col[1 : n + 1].reshape(n, -1), reference[name][1 : n + 1].reshape(n, -1)
        w = max(a.shape[1], b.shape[1])  # multi-valued codes are right-padded with 0
        a, b = (np.pad(x, ((0, 0), (0, w - x.shape[1]))) for x in (a, b))
        same &= (a == b).all(axis=1)
    return np.flatnonzero(same) + 1


def item_heads(src: Sources, raw: dict[str, np.ndarray],
               known: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """(N + 1, G, d) pre-rank item heads of every catalog item (row 0 zero, as export_prerank)
    from their item-tower inputs `raw` (head_inputs). known: (rows, heads) already computed with
    the same inputs (the data set's items, training.stages.rerank.upstream.Pipeline): taken, not recomputed."""
    item_spec = src.spec.item
    n = next(iter(raw.values())).shape[0]
    reuse, known_heads = known if known is not None else (np.empty(0, dtype=np.int64), None)
    todo = np.setdiff1d(np.arange(n), reuse)
    parts = []
    model = src.prerank.eval()
    with torch.no_grad():
        for s in tqdm(range(0, todo.size, HEADS_BATCH), desc="pre-rank item heads", unit="batch", leave=False,
                      disable=None):
            batch = {k: v[todo[s : s + HEADS_BATCH]] for k, v in raw.items()}
            parts.append(model.item_heads(pr.to_fields(item_spec.encode(batch))).numpy())
    if known_heads is None:
        heads = np.concatenate(parts).astype(np.float32)
    else:
        heads = np.zeros((n, *known_heads.shape[1:]), dtype=np.float32)
        heads[reuse] = known_heads[reuse]
        if parts:
            heads[todo] = np.concatenate(parts)
    heads[0] = 0.0
    return heads


def rerank_features(pipe: Any, table: np.ndarray, heads: np.ndarray, popularity: np.ndarray) -> np.ndarray:
    """(N + 1, F) re-rank item features of every catalog item, z-scored with the statistics of the
    data set's catalog (pipe: training.stages.rerank.upstream.Pipeline) the re-ranker was trained with."""
    n = pipe.dataset.num_items
    log_count = np.log1p(popularity).astype(np.float32)
    reference = (pipe.retrieval.item_embedding.weight.detach().numpy(), pipe.item_heads.numpy(), log_count[: n + 1])
    return rerank_item_features(table, heads, log_count, reference)


def grown_item_side(src: Sources, pipe: Any, catalog: ItemCatalog, dataset: ItemCatalog) -> ItemSide:
    """The item side of `catalog`, which extends the data set's catalog `dataset`."""
    n_trained = src.ds.num_items
    trained = src.retrieval.item_embedding.weight.detach().numpy()  # (n_trained + 1, D)
    table = np.zeros((catalog.num_items + 1, trained.shape[1]), dtype=np.float32)
    table[: n_trained + 1] = trained
    cold = np.arange(n_trained + 1, catalog.num_items + 1)
    table[cold], n_global = cold_start_embeddings(trained, catalog, n_trained, cold)
    # the data set's items whose inputs are unchanged keep the heads check_upstream computed
    raw = head_inputs(src, catalog, table)
    reuse = unchanged_rows(raw, head_inputs(src, dataset, trained), n_trained)
    heads = item_heads(src, raw, (reuse, pipe.item_heads.numpy()))
    log.info("pre-rank item heads: %d of %d items computed, %d taken from the first pass",
             catalog.num_items - reuse.size, catalog.num_items, reuse.size)
    return ItemSide(
        catalog=catalog.arrays(),
        retrieval=extend_retrieval(src.retrieval, table),
        prerank_items=heads,
        rerank_items=rerank_features(pipe, table, heads, catalog.popularity) if src.re_dir is not None else None,
        info=Catalog(popularity="training-part interaction counts (0 for items added by reindex)",
                     trained_items=n_trained,
                     cold_start={"rule": COLD_START_RULE, "items": int(cold.size),
                                 "from_features": int(cold.size) - n_global, "global_mean": n_global}),
    )
