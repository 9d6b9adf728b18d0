"""Batch re-index (`recsys reindex`) and rollback (`recsys rollback`) of artifact versions.

reindex() publishes a new version for the current catalog, new items included, from the live
version's checkpoints, through the same build / check / rename / flip steps as `recsys export`
(training/artifacts.py):

 1. lock        artifacts/.reindex.lock (flock): one reindex or rollback at a time.
 2. load        data spec and checkpoint folders from the live manifest (data.spec and each
                stage's `source`) unless given; load_sources + check_upstream. The pre-ranker
                must be a next-item tower (its item features need no labels).
 3. catalog     base = the live catalog when it extends the data set's (same ids in the same
                order, each vocabulary extending the data set's: items added by earlier
                re-indexes keep their rows), else the data set's items. Then the --catalog
                JSON Lines file, then the pending updates of PUT /v1/items, later wins. An
                update replaces an item's features (service/catalog_updates.py); new items
                are appended, so every existing item keeps its internal index and stored
                histories (external ids) keep working. New categorical / multi values extend
                the vocabularies (codes past the pre-ranker's vocabulary encode as OOV).
 4. embeddings  retrieval: rows of trained items are the checkpoint's; every other row (items
                with no trained ID embedding) gets COLD_START_RULE, recomputed on every run so a
                changed item follows its features. The embedding table is extended and
                retrieval.onnx re-exported with it, so item_seq accepts the new indices.
                Pre-rank item heads: the IntTower item tower over every item's features (item
                id out of vocabulary for new items, log-count 0). Re-rank item features: as
                training.impressions.Pipeline builds them, z-scored with the statistics of the
                data set's catalog the re-ranker was trained with.
 5. publish     training/artifacts.publish_items: ONNX parity, index (kind by size unless
                given) + recall against exact search, the stage gate on the served path (as
                for export: validation users through every served cut, a stage that hurts
                switched off in manifest `serving`), then the gate against the live version:
                the served NDCG@10 (each version's last served cut, validation users) at most
                max_regression lower. A live version without a serving block is compared on
                NDCG@10 of the new catalog against its own, both measured here on the same
                leave-one-out test users (full ranking over each version's items with its own
                retrieval.onnx, seen items removed). Load + smoke run; rename; flip.
 6. after       prune to the newest `keep` versions (never CURRENT nor the one it replaced),
                clear exactly the pending updates consumed, announce the version on Redis
                (a failure there is a warning: replicas also poll CURRENT).

A failed check raises PublishError and leaves CURRENT and every version folder as they were.
rollback() points CURRENT at an older version (default: the newest one created before the
live one) only after that version loads and passes a smoke run. Items added after the
rollback target are not in it; a later reindex starts from the rolled-back catalog.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from models.sasrec import MultiLauncherSASRec
from service.artifacts import ORT_ERRORS, session
from service.catalog_updates import (
    CatalogUpdates,
    FeatureKind,
    ItemError,
    ItemUpdate,
    PendingSnapshot,
    make_catalog_updates,
    schema_from_catalog,
    validate_item,
)
from service.index import IndexSpec
from service.stores import StoreError
from training import prerank as pr
from training.artifacts import (
    CATALOG,
    CURRENT,
    DEFAULT_MAX_REGRESSION,
    DEFAULT_MIN_RECALL,
    MANIFEST,
    ItemSide,
    PublishError,
    PublishResult,
    Regression,
    Sources,
    catalog_arrays,
    check_gates,
    check_upstream,
    default_version,
    load_sources,
    publish_items,
    read_current,
    served_comparison,
    set_current,
    smoke,
)
from training.data.dataset import DataError
from training.data.splits import LeaveOneOut
from training.report import timed
from training.features import RETRIEVAL_ITEM, retrieval_columns
from training.metrics import mask_seen, ranking_metrics, target_ranks
from training.served_eval import ServingGate

log = logging.getLogger(__name__)

LOCK = ".reindex.lock"
DEFAULT_KEEP = 5
GATE_METRIC = "NDCG@10"
GATE_USERS = 1000  # the first test users (fixed, so live and new are measured on the same ones)
COLD_START_RULE = (
    "trained items keep their embedding; any other item gets the mean, over its features with a value "
    "some trained item has (each categorical feature, and each multi-valued feature with its values "
    "averaged first), of the mean embedding of the trained items sharing that value; no such value: "
    "the mean of all trained embeddings. Numeric features are not used."
)
HEADS_BATCH = 65536
_SCORE_CHUNK = 1 << 25  # scores per chunk in the gate's exact ranking (float32: 128 MiB)
_COLD_CHUNK = 1 << 17  # items per cold-start chunk
_SAMPLE = 20  # ids listed in the manifest per kind of change


# --- the catalog ---


@dataclass(eq=False)
class ItemCatalog:
    """External ids and features of every item, laid out as catalog.npz (artifacts.catalog_arrays)."""

    item_ids: list[str]  # (N + 1,), [0] = padding
    popularity: np.ndarray  # (N + 1,) int64
    categorical: dict[str, np.ndarray] = field(default_factory=dict)  # (N + 1,) codes, 0 = unknown
    multi: dict[str, np.ndarray] = field(default_factory=dict)  # (N + 1, K) codes, right-padded with 0
    numeric: dict[str, np.ndarray] = field(default_factory=dict)  # (N + 1,) float32
    vocab: dict[str, list[str]] = field(default_factory=dict)  # code c >= 1 is vocab[c - 1]

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ItemCatalog:
        cat = cls(arrays["item_ids"].astype(str).tolist(), arrays["popularity"].astype(np.int64))
        for key, arr in arrays.items():
            kind, _, name = key.partition(":")
            if kind == "cat":
                cat.categorical[name] = arr.astype(np.int64)
            elif kind == "multi":
                cat.multi[name] = arr.astype(np.int64)
            elif kind == "num":
                cat.numeric[name] = arr.astype(np.float32)
            elif kind == "vocab":
                cat.vocab[name] = arr.astype(str).tolist()
        return cat

    @property
    def num_items(self) -> int:
        return len(self.item_ids) - 1

    def schema(self) -> dict[str, FeatureKind]:
        return schema_from_catalog(self.features())

    def arrays(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {"item_ids": np.array(self.item_ids, dtype=str), "popularity": self.popularity}
        out.update(self.features())
        out.update({f"vocab:{k}": np.array(v, dtype=str) for k, v in self.vocab.items()})
        return out

    def features(self) -> dict[str, np.ndarray]:
        """The per-item feature arrays by catalog.npz name (`cat:`, `multi:`, `num:`)."""
        out = {f"cat:{k}": v for k, v in self.categorical.items()}
        out.update({f"multi:{k}": v for k, v in self.multi.items()})
        out.update({f"num:{k}": v for k, v in self.numeric.items()})
        return out

    def extends(self, other: ItemCatalog) -> bool:
        """Same features, `other`'s items first in the same order, vocabularies extending `other`'s."""
        n = len(other.item_ids)
        return (self.item_ids[:n] == other.item_ids
                and (self.categorical.keys(), self.multi.keys(), self.numeric.keys())
                == (other.categorical.keys(), other.multi.keys(), other.numeric.keys())
                and all(self.vocab.get(k, [])[:len(v)] == v for k, v in other.vocab.items()))

    def apply(self, updates: Sequence[ItemUpdate]) -> tuple[list[str], list[str]]:
        """Apply updates in order (a later update of an item replaces an earlier one); new items
        are appended. Returns the ids added and the ids of existing items whose features changed."""
        latest: dict[str, ItemUpdate] = {}
        for u in updates:
            latest[u.item_id] = u
        index = {x: i for i, x in enumerate(self.item_ids) if i > 0}
        n0 = len(self.item_ids)
        added = [x for x in latest if x not in index]
        rows = np.array([index.get(x, -1) for x in latest], dtype=np.int64)
        rows[rows < 0] = np.arange(n0, n0 + len(added))
        self.item_ids.extend(added)
        n = len(self.item_ids)
        old_rows = rows[rows < n0]
        before = {k: v[old_rows].copy() for k, v in self.features().items()}
        self.popularity = _grow(self.popularity, n)
        feats = [u.features for u in latest.values()]
        for name, col in self.categorical.items():
            codes = self._codes(name, [f.get(name) for f in feats])
            self.categorical[name] = col = _grow(col, n)
            col[rows] = codes
        for name, col in self.multi.items():
            lists = [f.get(name) or [] for f in feats]
            lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
            width = max(col.shape[1], int(lengths.max(initial=0)))
            mat = np.zeros((len(lists), width), dtype=np.int64)
            starts = np.repeat(np.cumsum(lengths) - lengths, lengths)  # flat position of each list's first value
            flat = self._codes(name, [v for values in lists for v in values])  # type: ignore[union-attr]
            mat[np.repeat(np.arange(len(lists)), lengths), np.arange(flat.size) - starts] = flat
            col = _grow(col, n)
            self.multi[name] = col = np.pad(col, ((0, 0), (0, width - col.shape[1])))
            col[rows] = mat
        for name, col in self.numeric.items():
            self.numeric[name] = col = _grow(col, n)
            col[rows] = [float(f.get(name, 0.0)) for f in feats]  # type: ignore[arg-type]  # validated numeric
        after = self.features()
        diff = np.zeros(old_rows.size, dtype=bool)
        for k, old in before.items():
            new = after[k][old_rows]
            if old.ndim == 2:
                old = np.pad(old, ((0, 0), (0, new.shape[1] - old.shape[1])))
                diff |= (old != new).any(axis=1)
            else:
                diff |= old != new
        changed = [self.item_ids[r] for r in old_rows[diff]]
        return added, changed

    def _codes(self, name: str, values: Sequence[object]) -> np.ndarray:
        """Codes of categorical values (None -> 0, unknown); unseen values extend the vocabulary."""
        vocab = self.vocab.setdefault(name, [])
        lookup = {v: i + 1 for i, v in enumerate(vocab)}
        out = np.zeros(len(values), dtype=np.int64)
        for j, v in enumerate(values):
            if v is None:
                continue
            code = lookup.get(v)  # type: ignore[call-overload]
            if code is None:
                vocab.append(str(v))
                code = lookup[v] = len(vocab)  # type: ignore[index]
            out[j] = code
        return out

    def digest(self) -> str:
        h = hashlib.sha256("\x1f".join(self.item_ids).encode())
        for key, arr in sorted(self.arrays().items()):
            h.update(key.encode())
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()[:16]


def read_catalog_file(path: str | Path, schema: dict[str, FeatureKind]) -> list[ItemUpdate]:
    """--catalog: JSON Lines, one {"item_id", "features"} per line; DataError naming line and field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such catalog file")
    out: list[ItemUpdate] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(validate_item(json.loads(line), schema))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            except ItemError as exc:
                raise DataError(f"{path}:{lineno}: {exc}") from None
    return out


# --- the item side ---


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
        codes, hit = _distinct(col[1 : n_trained + 1].reshape(n_trained, -1))  # (T, K)
        V = int(col.max(initial=0)) + 1
        owner = np.broadcast_to(np.arange(n_trained)[:, None], codes.shape)[hit]
        count = np.bincount(codes[hit], minlength=V)
        sums = np.stack([np.bincount(codes[hit], weights=trained[owner, d], minlength=V) for d in range(D)], axis=1)
        known = count > 0
        known[0] = False
        mean = sums / np.maximum(count, 1)[:, None]  # (V, D)
        centroids.append((*_distinct(col[rows].reshape(rows.size, -1)), mean, known))
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


def extend_retrieval(model: MultiLauncherSASRec, table: np.ndarray) -> MultiLauncherSASRec:
    """A copy of `model` whose item embedding table is `table` (N + 1, D), row 0 padding."""
    grown = MultiLauncherSASRec(dataclasses.replace(model.config, num_items=table.shape[0] - 1))
    state = model.state_dict()
    state["item_embedding.weight"] = torch.from_numpy(np.ascontiguousarray(table, dtype=np.float32))
    grown.load_state_dict(state)
    return grown.eval()


def item_heads(src: Sources, catalog: ItemCatalog, table: np.ndarray) -> np.ndarray:
    """(N + 1, G, d) pre-rank item heads of every catalog item (row 0 zero, as export_prerank);
    table (N + 1, D): the grown retrieval table, for a pre-ranker that reads it (RETRIEVAL_ITEM)."""
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
    parts = []
    model = src.prerank.eval()
    n = catalog.num_items + 1
    with torch.no_grad():
        for s in tqdm(range(0, n, HEADS_BATCH), desc="pre-rank item heads", unit="batch", leave=False, disable=None):
            batch = {k: v[s : s + HEADS_BATCH] for k, v in raw.items()}
            parts.append(model.item_heads(pr.to_fields(item_spec.encode(batch))).numpy())
    heads = np.concatenate(parts).astype(np.float32)
    heads[0] = 0.0
    return heads


def rerank_features(pipe: Any, table: np.ndarray, heads: np.ndarray, popularity: np.ndarray) -> np.ndarray:
    """(N + 1, F) re-rank item features of training.impressions.Pipeline, z-scored with the
    statistics of the data set's catalog (pipe) the re-ranker was trained with; row 0 zero."""

    def raw(emb: np.ndarray, h: np.ndarray, cnt: np.ndarray) -> np.ndarray:
        return np.concatenate([emb, h.mean(axis=1), np.log1p(cnt)[:, None]], axis=1, dtype=np.float32)

    n = pipe.dataset.num_items
    ref = raw(pipe.retrieval.item_embedding.weight.detach().numpy(), pipe.item_heads.numpy(), popularity[: n + 1])
    mu, sd = ref[1:].mean(axis=0), ref[1:].std(axis=0)
    feats = (raw(table, heads, popularity) - mu) / np.where(sd > 1e-8, sd, 1.0)
    feats[0] = 0.0
    return feats.astype(np.float32)


# --- the gate ---


def catalog_metrics(folder: Path, loo: LeaveOneOut, users: np.ndarray,
                    manifest: dict[str, Any] | None = None) -> dict[str, float]:
    """HR@10 / NDCG@10 of the test item under full ranking over the version's whole catalog:
    its retrieval.onnx encodes the histories, max over launchers of the inner products with its
    items.npy, the user's history removed. Item indices of the data set must be the version's.
    `manifest`: the folder's, when not yet written."""
    m = manifest if manifest is not None else json.loads((folder / MANIFEST).read_text())
    items = np.load(folder / m["files"]["items"])  # (N, D)
    enc = session(folder / m["files"]["retrieval_onnx"])
    q = enc.run(None, {"item_seq": loo.histories("test", users, maxlen=int(m["dims"]["maxlen"]))})[0]  # (B, M, D)
    seen, targets = loo.histories("test", users), loo.targets("test")[users]
    B, M, D = q.shape
    N = items.shape[0]
    items_t = np.ascontiguousarray(items.T)  # (D, N): 1.5x faster GEMM than the transposed view
    chunk = max(1, _SCORE_CHUNK // (N * M))
    ranks = np.empty(B, dtype=np.int64)
    for s in range(0, B, chunk):
        c = min(chunk, B - s)
        scores = np.empty((c, N + 1), dtype=np.float32)
        np.max((q[s : s + c].reshape(c * M, D) @ items_t).reshape(c, M, N), axis=1, out=scores[:, 1:])
        mask_seen(scores, seen[s : s + c])
        ranks[s : s + c] = target_ranks(scores, targets[s : s + c])
    return ranking_metrics(ranks, (10,))


def catalog_gate(root: Path, live: str | None, loo: LeaveOneOut, max_regression: float | None) -> Regression:
    """The offline-metric gate of a re-index against the live version: the served NDCG@10 of both
    (manifest `serving`, set by the stage gate before this runs), else catalog NDCG@10 of both,
    measured here on the same test users. The new catalog's metrics are recorded either way."""

    def gate(tmp: Path, manifest: dict[str, Any]) -> dict[str, Any]:
        entry: dict[str, Any] = {"metric": f"catalog {GATE_METRIC}", "max_regression": max_regression,
                                 "live_version": live}
        users = np.arange(min(GATE_USERS, loo.eval_users.size))
        new = catalog_metrics(tmp, loo, users, manifest)
        manifest["retrieval"]["catalog_metrics"] = {**new, "users": int(users.size)}
        if max_regression is None or live is None:
            return {**entry, "result": "skipped: " + ("gate off" if max_regression is None else "no live version")}
        try:
            old_manifest = json.loads((root / live / MANIFEST).read_text())
            if old_manifest["data"]["fingerprint"] != manifest["data"]["fingerprint"]:
                return {**entry, "result": "skipped: the live version was built on other data"}
            served = served_comparison(old_manifest, manifest)
            if served is None:
                old = catalog_metrics(root / live, loo, users)
        except (OSError, KeyError, ValueError, *ORT_ERRORS) as exc:
            return {**entry, "result": f"skipped: the live version does not load ({exc})"}
        if served is not None:
            what, before, after = served
            n, split = manifest["serving"]["users"], manifest["serving"]["split"]
        else:
            what, before, after, n, split = entry["metric"], old[GATE_METRIC], new[GATE_METRIC], users.size, "test"
        entry["metric"] = what
        if after < before - max_regression:
            raise PublishError(f"{what} {after:.4f} is worse than the live version {live} "
                               f"({before:.4f}) by more than {max_regression} ({n} {split} users)")
        return {**entry, "result": "passed", "live": before, "new": after, "users": int(n)}

    return gate


# --- reindex ---


@dataclass(frozen=True)
class ReindexConfig:
    """What `recsys reindex` was asked for; None = from the live version's manifest."""

    artifacts: Path
    data: str | None = None
    catalog: Path | None = None
    redis_url: str | None = None
    retrieval: Path | None = None
    prerank: Path | None = None
    rerank: Path | None = None
    index_spec: IndexSpec | None = None
    min_recall: float = DEFAULT_MIN_RECALL
    max_regression: float | None = DEFAULT_MAX_REGRESSION
    keep: int = DEFAULT_KEEP
    version: str | None = None
    gate: ServingGate = ServingGate()

    def __post_init__(self) -> None:
        check_gates(self.min_recall, self.max_regression)
        if self.keep < 1:
            raise ValueError(f"keep must be >= 1, got {self.keep}")


@dataclass
class ReindexResult:
    published: PublishResult
    previous: str | None
    pruned: list[str]
    cleared: int
    notified: int | None  # subscribers reached; None without Redis or when the announcement failed
    timings: dict[str, float]


def reindex(cfg: ReindexConfig, timings: dict[str, float] | None = None) -> ReindexResult:
    """Grow the catalog, rebuild the item side, publish and flip CURRENT (see the module doc).

    Raises PublishError when a check fails (CURRENT and the version folders unchanged),
    DataError for a bad catalog line, FileNotFoundError / ValueError for bad arguments.
    """
    timings = {} if timings is None else timings
    root = Path(cfg.artifacts)
    with artifacts_lock(root):
        live = read_current(root)
        with timed("load", timings):
            src = load_sources(*_resolve_sources(cfg, root, live))
            pipe = check_upstream(src)
            if pipe is None:
                raise PublishError(f"{src.pre_dir}: reindex needs a next-item pre-ranker to compute item heads, "
                                   f"this one was trained on {src.pre_ckpt.get('objective')!r}")
        updates = make_catalog_updates(cfg.redis_url, root)
        try:
            with timed("catalog", timings):
                catalog, base = _base_catalog(src, root, live)
                schema = catalog.schema()
                file_items = read_catalog_file(cfg.catalog, schema) if cfg.catalog else []
                snapshot, pending, rejected = _pending(_snapshot(updates), schema)
                added, changed = catalog.apply([*file_items, *pending])
            log.info("catalog: %d items (%d added, %d changed, %d pending updates, %d rejected)",
                     catalog.num_items, len(added), len(changed), len(pending), len(rejected))
            with timed("embeddings", timings):
                items = _item_side(src, pipe, catalog)
            items.info.update(base=base, catalog_file=str(cfg.catalog) if cfg.catalog else None,
                              pending_backend="redis" if cfg.redis_url else str(root / "catalog_pending.jsonl"),
                              pending_applied=len(pending), pending_rejected=rejected[:_SAMPLE],
                              added=len(added), changed=len(changed),
                              added_ids=added[:_SAMPLE], changed_ids=changed[:_SAMPLE])
            version = cfg.version or default_version(src.ds.fingerprint + catalog.digest(), src.checkpoints)
            published = publish_items(src, items, root, version, cfg.min_recall, cfg.index_spec,
                                      catalog_gate(root, live, src.loo, cfg.max_regression), timings, cfg.gate)
            with timed("prune", timings):
                pruned = prune_versions(root, cfg.keep, protect={version, live} - {None})  # type: ignore[arg-type]
            cleared = _clear(updates, snapshot)
        finally:
            updates.close()
    return ReindexResult(published, live, pruned, cleared, announce(cfg.redis_url, version), timings)


def _resolve_sources(cfg: ReindexConfig, root: Path, live: str | None) -> tuple[str, Path, Path, Path | None]:
    """--data and the checkpoint folders, each from the live manifest unless given."""
    m: dict[str, Any] = {}
    if live is not None:
        try:
            m = json.loads((root / live / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            if None in (cfg.data, cfg.retrieval, cfg.prerank):
                raise ValueError(f"{root / live / MANIFEST}: unreadable ({exc}); give --data, --retrieval "
                                 f"and --prerank") from None
    elif None in (cfg.data, cfg.retrieval, cfg.prerank):
        raise ValueError(f"{root}: no CURRENT version to take --data / --retrieval / --prerank from; give them")

    def source(stage: str, given: Path | None, required: bool = True) -> Path | None:
        value = given or (m.get(stage) or {}).get("source")
        if value is None and required:
            raise ValueError(f"give --{stage}: the live manifest records no {stage} source")
        return None if value is None else Path(value)

    data = cfg.data or (m.get("data") or {}).get("spec")
    if data is None:
        raise ValueError("give --data: the live manifest records no data spec")
    retrieval, prerank = source("retrieval", cfg.retrieval), source("prerank", cfg.prerank)
    assert retrieval is not None and prerank is not None
    return data, retrieval, prerank, source("rerank", cfg.rerank, required=False)


def _base_catalog(src: Sources, root: Path, live: str | None) -> tuple[ItemCatalog, str]:
    """The live catalog when it extends the data set's, else the data set's."""
    dataset = ItemCatalog.from_arrays(catalog_arrays(src.ds, src.loo))
    if live is None:
        return dataset, "data set"
    try:
        files = json.loads((root / live / MANIFEST).read_text())["files"]
        name = files.get("catalog", CATALOG)
        if not isinstance(name, str) or Path(name).name != name or name.startswith("."):
            raise ValueError(f"files.catalog = {name!r} is not a file name inside the version folder")
        with np.load(root / live / name, allow_pickle=False) as z:
            current = ItemCatalog.from_arrays({k: z[k] for k in z.files})
    except (OSError, KeyError, ValueError) as exc:
        log.warning("live version %s: catalog unreadable (%s); starting from the data set", live, exc)
        return dataset, "data set"
    if not current.extends(dataset):
        return dataset, f"data set (live version {live} has another catalog)"
    return current, f"live version {live}"


def _pending(snapshot: PendingSnapshot, schema: dict[str, FeatureKind]
             ) -> tuple[PendingSnapshot, list[ItemUpdate], list[dict[str, str]]]:
    """Re-validate pending updates against the data set's features. A rejected one is logged,
    recorded in the manifest and left pending (not cleared), so it is not lost silently."""
    ok: list[ItemUpdate] = []
    rejected: list[dict[str, str]] = []
    for u in snapshot.items:
        try:
            ok.append(validate_item(u.to_json(), schema))
        except ItemError as exc:
            log.warning("pending update of item %r skipped: %s", u.item_id, exc)
            rejected.append({"item_id": u.item_id, "error": str(exc)})
    bad = {r["item_id"] for r in rejected}
    consumed = PendingSnapshot(tuple(ok), tuple(e for e in snapshot.entries if e[0] not in bad))
    return consumed, ok, rejected


def _item_side(src: Sources, pipe: Any, catalog: ItemCatalog) -> ItemSide:
    n_trained = src.ds.num_items
    trained = src.retrieval.item_embedding.weight.detach().numpy()  # (n_trained + 1, D)
    table = np.zeros((catalog.num_items + 1, trained.shape[1]), dtype=np.float32)
    table[: n_trained + 1] = trained
    cold = np.arange(n_trained + 1, catalog.num_items + 1)
    table[cold], n_global = cold_start_embeddings(trained, catalog, n_trained, cold)
    heads = item_heads(src, catalog, table)
    return ItemSide(
        catalog=catalog.arrays(),
        retrieval=extend_retrieval(src.retrieval, table),
        prerank_items=heads,
        rerank_items=rerank_features(pipe, table, heads, catalog.popularity) if src.re_dir is not None else None,
        info={"popularity": "training-part interaction counts (0 for items added by reindex)",
              "trained_items": n_trained,
              "cold_start": {"rule": COLD_START_RULE, "items": int(cold.size),
                             "from_features": int(cold.size) - n_global, "global_mean": n_global}},
    )


def _snapshot(updates: CatalogUpdates) -> PendingSnapshot:
    try:
        return updates.snapshot()
    except (StoreError, OSError) as exc:
        raise PublishError(f"cannot read the pending catalog updates: {exc}") from None


def _clear(updates: CatalogUpdates, snapshot: PendingSnapshot) -> int:
    try:
        return int(updates.clear(snapshot))
    except (StoreError, OSError) as exc:  # published already; the updates re-apply harmlessly next time
        log.warning("could not clear %d consumed catalog updates: %s", len(snapshot.entries), exc)
        return 0


def announce(redis_url: str | None, version: str) -> int | None:
    """notify_version when a Redis URL is known; a failure is a warning (replicas poll CURRENT)."""
    if not redis_url:
        return None
    import redis

    from service.notify import notify_version

    try:
        return notify_version(redis_url, version)
    except redis.RedisError as exc:
        log.warning("could not announce version %s on Redis (replicas will see CURRENT when they poll): %s",
                    version, exc)
        return None


# --- versions: lock, list, prune, rollback ---


@contextmanager
def artifacts_lock(root: Path) -> Iterator[None]:
    """Exclusive non-blocking flock on root/.reindex.lock; PublishError when another holds it."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PublishError(f"{root / LOCK}: another reindex or rollback is running") from None
        yield
    finally:
        os.close(fd)


def list_versions(root: Path) -> list[tuple[str, str]]:
    """(name, created_at) of every version folder with a readable manifest, oldest first."""
    out = []
    for p in root.iterdir() if root.is_dir() else ():
        if not p.is_dir() or p.name.startswith("."):
            continue
        try:
            out.append((p.name, str(json.loads((p / MANIFEST).read_text())["created_at"])))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a version (or a broken one): never listed, pruned or rolled back to
    return sorted(out, key=lambda v: (v[1], v[0]))


def previous_version(root: Path, current: str) -> str | None:
    """The newest version created before `current` (by manifest created_at)."""
    versions = list_versions(root)
    names = [name for name, _ in versions]
    if current not in names:
        return names[-1] if names else None
    i = names.index(current)
    return names[i - 1] if i > 0 else None


def prune_versions(root: Path, keep: int, protect: set[str]) -> list[str]:
    """Delete version folders beyond the newest `keep`, never one in `protect`; returns their names."""
    names = [name for name, _ in list_versions(root)]
    doomed = [n for n in names[: max(0, len(names) - keep)] if n not in protect]
    for name in doomed:
        shutil.rmtree(root / name)
        log.info("pruned version %s", name)
    return doomed


@dataclass
class RollbackResult:
    previous: str
    current: str
    notified: int | None


def rollback(artifacts_root: str | Path, to: str | None = None, redis_url: str | None = None) -> RollbackResult:
    """Point CURRENT at `to` (default: the version before the live one) once it loads and
    passes a smoke run; PublishError (CURRENT unchanged) when it cannot be served."""
    root = Path(artifacts_root)
    with artifacts_lock(root):
        current = read_current(root)
        if current is None:
            raise PublishError(f"{root}: no CURRENT version to roll back from")
        target = to or previous_version(root, current)
        if target is None:
            raise PublishError(f"no version older than {current} in {root} to roll back to")
        if target == current:
            raise PublishError(f"{target} is already CURRENT")
        if target.startswith(".") or "/" in target or target == CURRENT:
            raise PublishError(f"{target!r} is not a version name")
        smoke(root / target, f"version {target} cannot be served")
        set_current(root, target)
    log.info("rolled back CURRENT from %s to %s", current, target)
    return RollbackResult(current, target, announce(redis_url, target))


def _distinct(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, K) codes -> the codes sorted per row and a mask of each row's distinct values > 0."""
    srt = np.sort(codes, axis=1)
    first = srt > 0
    first[:, 1:] &= srt[:, 1:] != srt[:, :-1]
    return srt, first


def _grow(arr: np.ndarray, n: int) -> np.ndarray:
    """`arr` with zero rows appended up to n rows."""
    if arr.shape[0] >= n:
        return arr
    return np.concatenate([arr, np.zeros((n - arr.shape[0], *arr.shape[1:]), dtype=arr.dtype)])
