"""Batch re-index (`recsys reindex`): a new version for the grown catalog.

reindex() publishes a new version for the current catalog, new items included, from the live
version's checkpoints, through the same build / check / rename / flip steps as `recsys export`
(training/publish/build.py):

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
                Pre-rank item heads: the IntTower item tower over the features of new and
                changed items (item id out of vocabulary for new items, log-count 0); the data
                set's items with unchanged inputs keep the heads step 2 computed (not computed
                twice). Re-rank item features: as
                training.stages.rerank.upstream.Pipeline builds them, z-scored with the statistics of the
                data set's catalog the re-ranker was trained with. Item-to-item table
                (training/stages/retrieval/item2item.py): the data set's training part plus --events, each
                user's new events after their training items, so new transitions are served;
                built unless --no-item2item (the live version's table settings, else the
                defaults), its request settings those of the live pre-ranker's lists, or chosen
                again on validation users for one without a pair prior (training/publish/route_tuning.py).
 5. publish     training/publisher.Publisher.publish: ONNX parity, index (kind by size unless
                given) + recall against exact search, the stage gate on the served path (as
                for export: validation users through every served cut, a stage that hurts
                switched off in manifest `serving`, a version below the trivial baselines
                refused: the live one stays), then the gate against the live version:
                the served NDCG@10 (each version's last served cut, validation users) at most
                max_regression lower. A live version without a serving block is compared on
                NDCG@10 of the new catalog against its own, both measured here on the same
                leave-one-out test users (full ranking over each version's items with its own
                retrieval.onnx, seen items removed). Load + smoke run; rename; flip.
 6. after       prune to the newest `keep` versions (never CURRENT nor the one it replaced),
                clear exactly the pending updates consumed, announce the version on Redis
                (a failure there is a warning: replicas also poll CURRENT).

A failed check raises PublishError and leaves CURRENT and every version folder as they were.
The catalog: service/contract/catalog.py (ItemCatalog); the grown item side (step 4): training/publish/item_side.py; the
gate (step 5): training/publish/gates.py; lock, prune, announce and rollback: training/publish/versions.py
(a rollback's target lacks the items added after it; a later reindex starts from its catalog).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from service.catalog_updates import (
    CatalogUpdates,
    FeatureKind,
    ItemError,
    ItemUpdate,
    PendingSnapshot,
    make_catalog_updates,
    validate_item,
)
from service.contract.layout import MANIFEST, PENDING_ITEMS, ContractError
from service.contract.manifest import Manifest
from service.index_build import IndexSpec
from service.stores import StoreError
from training.stages.retrieval import item2item as i2i
from training.publish.build import DEFAULT_MIN_RECALL, PublishResult, check_gates
from service.contract.catalog import ItemCatalog
from training.publish.catalog import catalog_arrays, read_catalog_file
from training.publish.item_side import grown_item_side
from training.publish.sources import Sources
from training.publish.gates import DEFAULT_MAX_REGRESSION
from training.data.sources import load
from training.publish.publisher import Publisher
from training.report import timed
from training.eval.served_eval import ServingGate
from training.publish.versions import (
    DEFAULT_KEEP,
    PublishError,
    announce,
    artifacts_lock,
    default_version,
    prune_versions,
    read_current,
)

log = logging.getLogger(__name__)

_SAMPLE = 20  # ids listed in the manifest per kind of change



# --- reindex ---


@dataclass(frozen=True)
class ReindexConfig:
    """What `recsys reindex` was asked for; None = from the live version's manifest."""

    artifacts: Path
    data: str | None = None
    catalog: Path | None = None
    events: str | None = None  # data spec of new interactions for the item-to-item table
    item2item: bool = True  # False: publish without the item-to-item route
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
        if self.events is not None and not self.item2item:
            raise ValueError(f"--events {self.events} only feeds the item-to-item route's table; "
                             "it contradicts --no-item2item")


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
    publisher = Publisher(cfg.artifacts, cfg.min_recall, cfg.max_regression, cfg.index_spec, cfg.gate, timings)
    root, timings = publisher.root, publisher.timings
    with artifacts_lock(root):
        live = read_current(root)
        live_manifest, unreadable = _read_live(root, live)
        src = publisher.load(*_resolve_sources(cfg, root, live_manifest, unreadable))
        pipe = publisher.upstream
        if pipe is None:
            raise PublishError(f"{src.pre_dir}: reindex needs a next-item pre-ranker to compute item heads, "
                               f"this one was trained on {src.pre_ckpt.extra.get('objective')!r}")
        updates = make_catalog_updates(cfg.redis_url, root)
        try:
            with timed("catalog", timings):
                dataset = catalog_arrays(src.ds, src.loo)  # built once; each ItemCatalog below copies it
                catalog, base = _base_catalog(ItemCatalog.from_arrays(dataset), root, live, live_manifest)
                schema = catalog.schema()
                file_items = read_catalog_file(cfg.catalog, schema) if cfg.catalog else []
                snapshot, pending, rejected = _pending(_snapshot(updates), schema)
                added, changed = catalog.apply([*file_items, *pending])
            log.info("catalog: %d items (%d added, %d changed, %d pending updates, %d rejected)",
                     catalog.num_items, len(added), len(changed), len(pending), len(rejected))
            with timed("embeddings", timings):
                items = grown_item_side(src, pipe, catalog, ItemCatalog.from_arrays(dataset))
            items.item2item = _item2item_config(live_manifest, cfg.item2item)
            if items.item2item is not None:
                items.item2item_rows = _item2item_rows(src, catalog, cfg.events)
            items.info = replace(items.info, base=base, catalog_file=str(cfg.catalog) if cfg.catalog else None,
                                 pending_backend="redis" if cfg.redis_url else str(root / PENDING_ITEMS),
                                 pending_applied=len(pending), pending_rejected=rejected[:_SAMPLE],
                                 added=len(added), changed=len(changed),
                                 added_ids=added[:_SAMPLE], changed_ids=changed[:_SAMPLE])
            version = cfg.version or default_version(src.ds.fingerprint + catalog.digest(), src.checkpoints)
            published = publisher.publish(src, items, version, live=live, catalog=src.loo)
            with timed("prune", timings):
                pruned = prune_versions(root, cfg.keep, protect={version, live} - {None})  # type: ignore[arg-type]
            cleared = _clear(updates, snapshot)
        finally:
            updates.close()
    return ReindexResult(published, live, pruned, cleared, announce(cfg.redis_url, version), timings)


def _read_live(root: Path, live: str | None) -> tuple[Manifest | None, str | None]:
    """The live version's manifest (None without a live version) or None and why it is unreadable."""
    if live is None:
        return None, None
    try:
        return Manifest.load(root / live / MANIFEST), None
    except (OSError, ContractError) as exc:
        return None, str(exc)


def _resolve_sources(cfg: ReindexConfig, root: Path, m: Manifest | None,
                     unreadable: str | None) -> tuple[str, Path, Path, Path | None]:
    """--data and the checkpoint folders, each from the live manifest `m` unless given."""
    if m is None and None in (cfg.data, cfg.retrieval, cfg.prerank):
        if unreadable is not None:
            raise ValueError(f"live manifest unreadable ({unreadable}); give --data, --retrieval and --prerank")
        raise ValueError(f"{root}: no CURRENT version to take --data / --retrieval / --prerank from; give them")

    def source(stage: str, given: Path | None, recorded: str | None, required: bool = True) -> Path | None:
        value = given or recorded
        if value is None and required:
            raise ValueError(f"give --{stage}: the live manifest records no {stage} source")
        return None if value is None else Path(value)

    data = cfg.data or (m.data.spec if m is not None else None)
    if data is None:
        raise ValueError("give --data: the live manifest records no data spec")
    retrieval = source("retrieval", cfg.retrieval, m.retrieval.source if m is not None else None)
    prerank = source("prerank", cfg.prerank, m.prerank.source if m is not None else None)
    assert retrieval is not None and prerank is not None
    rerank = m.rerank.source if m is not None and m.rerank is not None else None
    return data, retrieval, prerank, source("rerank", cfg.rerank, rerank, required=False)


def _base_catalog(dataset: ItemCatalog, root: Path, live: str | None,
                  m: Manifest | None) -> tuple[ItemCatalog, str]:
    """The live catalog when it extends the data set's (`dataset`), else the data set's."""
    if live is None:
        return dataset, "data set"
    try:
        if m is None:
            raise ValueError("the live manifest is unreadable")
        with np.load(root / live / m.files.name("catalog"), allow_pickle=False) as z:
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



def _item2item_config(live: Manifest | None, route: bool) -> i2i.Item2ItemConfig | None:
    """None (no route) when route is False; else the live version's table settings, or the
    defaults when it has none. The request settings are chosen again for the new version."""
    if not route:
        return None
    entry = live.item2item if live is not None else None
    if entry is not None:
        if entry.neighbours is None or entry.window is None or entry.alpha is None:
            raise PublishError("the live manifest's item2item block lacks its table settings (neighbours, window, alpha)")
        return i2i.Item2ItemConfig(entry.neighbours, entry.window, entry.alpha)
    return i2i.Item2ItemConfig()


def _item2item_rows(src: Sources, catalog: ItemCatalog, events: str | None) -> i2i.Rows:
    """The item-to-item table's rows: the data set's training part, then each user's --events."""
    rows = i2i.dataset_rows(src.ds, src.loo.train_mask)
    if events is None:
        return rows
    index = {x: i for i, x in enumerate(catalog.item_ids) if i > 0}
    return i2i.with_events(rows, src.ds.user_ids, load(events), index)


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


