"""Publish one self-describing artifact version (DESIGN.md §5) from trained checkpoints.

artifacts_root/<version>/ holds manifest.json, catalog.npz, retrieval.onnx, items.npy,
index.faiss, prerank_user.onnx, prerank_items.npy, prerank_features.json and, with a
re-ranker, rerank.onnx + rerank_items.npy, and item2item.npz (the item-to-item route's
neighbour table, training/stages/retrieval/item2item.py; reindex adds its --events). `recsys export` and `recsys reindex`
share every step, driven by training/publisher.Publisher:

    load_sources     the data set and the checkpoints, each checked against the data set
                     (training/checkpoints.py)
    check_upstream   the pre-rank item heads and re-rank item features exported by training
                     are the ones these checkpoints give (the re-ranker fits its upstream)
    ItemSide         the catalog a version serves and its per-item arrays: for export the data
                     set's items and the files training exported (dataset_items); reindex
                     builds a grown catalog (training/publish/item_side.py)
    publish_items    writes artifacts_root/.tmp-<version>: catalog, retrieval.onnx + ONNX
                     parity against eager PyTorch, items.npy, index.faiss + recall against
                     exact search (an IVF chosen by size gets the nprobe that reaches the
                     threshold), pre-rank / re-rank files + parity (training/publish/checks.py);
                     then the item-to-item route's request settings chosen on validation
                     users (training/publish/route_tuning.py), the stage gate and the caller's
                     offline-metric gate against the live
                     version (training/publish/gates.py), a full load + smoke run through
                     service.artifacts, fsync and a rename into place
    set_current      CURRENT replaced atomically (temp file + os.replace), only after all that
                     (training/publish/versions.py)

Any failure removes the temp folder and leaves CURRENT as it was. publish_items never touches
other versions (pruning and rollback: training/publish/versions.py). Each step's wall time is printed on
stderr as `[step] 1.23s` and recorded in the `timings` dict the caller passes (Publisher.timings).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from training.checkpoints import RetrievalModel
from service.contract.blocks import Catalog, Data, Dims, Files, Index, Retrieval
from service.contract.layout import (
    CATALOG,
    CURRENT,
    INDEX_FAISS,
    MANIFEST,
    PAIR_ITEMS,
    PRERANK_FEATURES,
    PRERANK_ITEMS,
    PRERANK_MANIFEST,
    PRERANK_USER_ONNX,
    RERANK_ITEMS,
    RERANK_MANIFEST,
    RERANK_ONNX,
    TMP_PREFIX,
    VERSION_RE,
    onnx_data,
    valid_version,
)
from service.contract.manifest import FORMAT, Manifest, read_json
from service.contract.rerank_inputs import RerankServing
from service.contract.stage_blocks import Checks, Item2Item, Prerank, PrerankServing, Rerank
from service.index import index_params, save_index, set_faiss_threads
from service.index_build import IndexSpec, build_index, choose_kind
from service.pair_features import item_popularity
from training.stages.retrieval import item2item as i2i
from training.publish.checks import CHECK_ERRORS, check_rerank, measure_recall, prerank_parity
from training.publish.catalog import catalog_arrays
from training.stages.retrieval.encoders import served_vectors
from training.publish.sources import Sources
from training.publish.onnx.retrieval import PARITY_ATOL, export_retrieval, retrieval_parity
from training.publish.gates import Regression, serving_gate
from training.publish.route_tuning import tune_published
from training.report import timed
from training.eval.served_eval import ServingGate
from training.publish.versions import PublishError, fsync_dir, fsync_tree, set_current, smoke

log = logging.getLogger(__name__)

DEFAULT_MIN_RECALL = 0.9
RECALL_K = 100
# launcher vectors of at most this many real test histories are the recall queries
RECALL_QUERY_USERS = 1000


@dataclass(frozen=True)
class PublishResult:
    path: Path
    manifest: Manifest


@dataclass(eq=False)
class ItemSide:
    """What a version serves per item; row i of every array is internal item i (0 = padding).

    catalog: the catalog.npz arrays (`catalog_arrays` says which); retrieval: the encoder whose
    embedding table has exactly N + 1 rows; prerank_items (N + 1, G, d) float32;
    rerank_items (N + 1, F) float32 or None; info: the manifest's `catalog` block (without
    max_popularity, which the build adds).
    """

    catalog: dict[str, np.ndarray]
    retrieval: RetrievalModel
    prerank_items: np.ndarray
    rerank_items: np.ndarray | None
    info: Catalog
    # the item-to-item route (training/stages/retrieval/item2item.py): its table's settings (None: no route) and
    # rows (None: the data set's training part)
    item2item: i2i.Item2ItemConfig | None = None
    item2item_rows: i2i.Rows | None = None

    @property
    def num_items(self) -> int:
        return int(self.catalog["item_ids"].shape[0]) - 1


def check_gates(min_recall: float, max_regression: float | None) -> None:
    """ValueError for a gate threshold out of range."""
    if not 0.0 <= min_recall <= 1.0:
        raise ValueError(f"min_recall must be in [0, 1], got {min_recall}")
    if max_regression is not None and max_regression < 0:
        raise ValueError(f"max_regression must be >= 0 or None (no gate), got {max_regression}")


def dataset_items(src: Sources, item2item: i2i.Item2ItemConfig | None = None) -> ItemSide:
    """The item side `recsys export` publishes: the data set's items, the retrieval checkpoint
    as trained and the item arrays the pre-rank / re-rank training commands exported."""
    return ItemSide(
        catalog=catalog_arrays(src.ds, src.loo),
        retrieval=src.retrieval,
        prerank_items=np.load(src.pre_dir / PRERANK_ITEMS),
        rerank_items=np.load(src.re_dir / RERANK_ITEMS) if src.re_dir is not None else None,
        info=Catalog(popularity="training-part interaction counts"),
        item2item=item2item,
    )


def publish_items(src: Sources, items: ItemSide, artifacts_root: str | Path, version: str, min_recall: float,
                  index_spec: IndexSpec | None, regression: Regression,
                  timings: dict[str, float] | None = None, gate: ServingGate = ServingGate()) -> PublishResult:
    """Write, check and rename artifacts_root/<version>, then make it CURRENT (see the module doc).

    gate: the stage gate on the served path (serving_gate), which writes manifest `serving`
    before `regression` runs; a version with the item-to-item route first gets the route's
    request settings chosen on the gate's validation users (training/publish/route_tuning.py). Raises ValueError for a bad version name and PublishError when a
    check fails; on any error the temp folder is removed and CURRENT is unchanged.
    """
    timings = {} if timings is None else timings
    if not valid_version(version):
        raise ValueError(f"version must match {VERSION_RE.pattern} and not be {CURRENT!r}, got {version!r}")
    root = Path(artifacts_root)
    final = root / version
    if final.exists():
        raise PublishError(f"version {version} already exists at {final}")
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{TMP_PREFIX}{version}"
    if tmp.exists():
        shutil.rmtree(tmp)  # left over by a killed publish of the same version
    tmp.mkdir()
    try:
        manifest = _build(tmp, version, src, items, min_recall, index_spec, timings)
        with timed("gate", timings):
            if src.rerank is not None:
                manifest = check_rerank(tmp, src.rerank, manifest)
            manifest.write(tmp / MANIFEST)  # the service loads the folder from its manifest
            pair = manifest.prerank.serving.pair_prior if manifest.prerank.serving is not None else None
            cross = None
            if manifest.item2item is not None and pair is not None and pair.route:
                # the settings the rankers' lists were made with (tuned then, on the ranking fold's lists;
                # its prior starts from their beta, so the gate replays them as they are)
                manifest = manifest.with_(item2item=replace(manifest.item2item, serving=dict(pair.route), tuning={
                    "from": "prerank.serving.pair_prior.route: the rankers' training lists were made with it"}))
                manifest.write(tmp / MANIFEST)
            elif manifest.item2item is not None:  # the route's settings, before the gate measures with them
                with timed("route", timings):  # and, chosen on the gate's users, cross-fitted for the gate
                    cross, manifest = tune_published(tmp, src, gate, manifest)
                manifest.write(tmp / MANIFEST)
            with timed("served", timings):
                manifest = manifest.with_(serving=serving_gate(tmp, src, gate, cross))
            entry, manifest = regression(tmp, manifest)
            manifest = manifest.with_(checks=Checks(min_recall=min_recall, regression=entry))
            manifest.write(tmp / MANIFEST)
            smoke(tmp)
        with timed("write", timings):
            fsync_tree(tmp)
            os.rename(tmp, final)
            fsync_dir(root)
            set_current(root, version)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("published %s as CURRENT", final)
    return PublishResult(final, manifest)


# --- building ---


def _build(out: Path, version: str, src: Sources, items: ItemSide, min_recall: float,
           index_spec: IndexSpec | None, timings: dict[str, float]) -> Manifest:
    ds, loo, n = src.ds, src.loo, items.num_items
    retrieval = items.retrieval
    if retrieval.config.num_items != n:
        raise PublishError(f"the retrieval table has {retrieval.config.num_items} items, the catalog {n}")
    with open(out / CATALOG, "wb") as f:
        np.savez(f, **items.catalog)  # type: ignore[arg-type]  # no object arrays: loads with allow_pickle=False
    with timed("onnx", timings):
        onnx_path, items_path = export_retrieval(retrieval, out)
        try:
            parity = retrieval_parity(retrieval, onnx_path)
        except CHECK_ERRORS as exc:
            raise PublishError(f"{onnx_path.name} differs from eager PyTorch beyond atol={PARITY_ATOL}: {exc}") from None
    vectors = np.load(items_path)  # (N, D)
    users = np.arange(min(RECALL_QUERY_USERS, loo.eval_users.size))
    with torch.no_grad():
        queries = retrieval.encode_user(torch.from_numpy(
            loo.histories("test", users, maxlen=retrieval.config.maxlen))).numpy()  # (B, M, D)
    set_faiss_threads(max(1, torch.get_num_threads()))  # an offline build: the cores this command may use
    with timed("index", timings):
        spec = index_spec or IndexSpec(kind=choose_kind(n))
        index = build_index(vectors, spec)
    with timed("recall", timings):
        k = min(RECALL_K, n)
        recall, tuned = measure_recall(index, vectors, queries, k, min_recall, tune=index_spec is None)
    if recall < min_recall:
        raise PublishError(f"index recall@{k} = {recall:.4f} is below --min-recall {min_recall}")
    save_index(index, out / INDEX_FAISS)  # with the nprobe measured

    with timed("prerank", timings):
        for name in (PRERANK_USER_ONNX, PRERANK_MANIFEST, PRERANK_FEATURES):
            shutil.copy2(src.pre_dir / name, out / name)
        heads = items.prerank_items
        if heads.ndim != 3 or heads.shape[0] != n + 1:
            raise PublishError(f"pre-rank item heads have shape {heads.shape}, expected ({n + 1}, G, d)")
        np.save(out / PRERANK_ITEMS, heads.astype(np.float32, copy=False))
        pre_parity = prerank_parity(src.prerank, src.spec, out / PRERANK_USER_ONNX)
    pre_serving = PrerankServing.from_dict(read_json(src.pre_dir / PRERANK_MANIFEST), str(PRERANK_MANIFEST))

    cfg = retrieval.config
    data_file = onnx_data(onnx_path.name)
    files = Files(catalog=CATALOG, retrieval_onnx=onnx_path.name, items=items_path.name, index=INDEX_FAISS,
                  prerank_user_onnx=PRERANK_USER_ONNX, prerank_items=PRERANK_ITEMS, prerank_features=PRERANK_FEATURES,
                  retrieval_onnx_data=data_file if (out / data_file).is_file() else None)
    manifest = Manifest(
        format=FORMAT, version=version, created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        data=Data(spec=src.data_spec, name=ds.name, fingerprint=ds.fingerprint, num_users=ds.num_users,
                  num_items=ds.num_items, num_interactions=ds.num_interactions),
        item_count=n,
        dims=Dims(retrieval_dim=cfg.dim, num_launchers=served_vectors(cfg), maxlen=cfg.maxlen,
                  prerank_item_heads=list(heads.shape[1:]),
                  prerank_user_heads=pre_serving.user_heads[1:-1]),  # (L, H, d)
        files=files,
        catalog=replace(items.info, max_popularity=int(items.catalog["popularity"].max())),
        retrieval=Retrieval(source=str(src.ret_dir), model=type(retrieval).__name__, config=cfg.to_dict(),
                            metrics=src.ret_ckpt.extra.get("metrics", {}), parity_max_abs_diff=parity,
                            inputs={"item_seq": ["B", "L", "int64"]},
                            outputs={"user_vectors": ["B", served_vectors(cfg), cfg.dim, "float32"]}),
        index=Index(params=index_params(index), recall_k=f"recall@{k}", recall_at_k=recall, file=INDEX_FAISS,
                    min_recall=min_recall, recall=recall, queries=int(queries.shape[0] * queries.shape[1]),
                    nprobe_tuned=tuned or None),
        prerank=Prerank(source=str(src.pre_dir), model=src.pre_ckpt.name,
                        config=src.prerank.cfg.to_dict(), objective=src.pre_ckpt.extra.get("objective"),
                        train=src.pre_ckpt.extra.get("train"), metrics=src.pre_ckpt.extra.get("metrics", {}),
                        parity_max_abs_diff=pre_parity, serving=pre_serving),
    )
    i2i_rows = items.item2item_rows or i2i.dataset_rows(ds, loo.train_mask)
    if items.item2item is not None:
        table = Item2Item.from_dict(i2i.publish_table(out, n, i2i_rows, cfg=items.item2item))
        manifest = manifest.with_(item2item=table, files=replace(manifest.files, item2item=table.file))
    if pre_serving.pair_prior is not None and pre_serving.pair_prior.route and items.item2item is None:
        print("warning: the pre-ranker's lists were merged with the item-to-item route, which this version is "
              "published without: its pair features will see no route (train it with --no-pair-features to match)",
              file=sys.stderr)
    if pre_serving.pair_prior is not None:
        # the pair features' item columns, from the same interactions as the route's table
        np.save(out / PAIR_ITEMS, item_popularity(i2i_rows.items, i2i_rows.users, n))
        manifest = manifest.with_(files=replace(manifest.files, pair_items=PAIR_ITEMS))
    if src.re_dir is not None:
        assert src.rerank_ckpt is not None and items.rerank_items is not None
        shutil.copy2(src.re_dir / RERANK_ONNX, out / RERANK_ONNX)
        np.save(out / RERANK_ITEMS, items.rerank_items.astype(np.float32, copy=False))
        rerank = Rerank(source=str(src.re_dir), model=src.rerank_ckpt.name,
                        train=src.rerank_ckpt.extra.get("train"),
                        metrics=src.rerank_ckpt.extra.get("metrics", {}),
                        serving=RerankServing.from_dict(read_json(src.re_dir / RERANK_MANIFEST), RERANK_MANIFEST))
        manifest = manifest.with_(files=replace(manifest.files, rerank_onnx=RERANK_ONNX, rerank_items=RERANK_ITEMS),
                                  rerank=rerank)
    return manifest
