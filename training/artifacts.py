"""Publish one self-describing artifact version (DESIGN.md §5) from trained checkpoints.

artifacts_root/<version>/ holds manifest.json, catalog.npz, retrieval.onnx, items.npy,
index.faiss, prerank_user.onnx, prerank_items.npy, prerank_features.json and, with a
re-ranker, rerank.onnx + rerank_items.npy. `recsys export` and `recsys reindex` share every step:

    load_sources     the data set and the checkpoints, each checked against the data set
    check_upstream   the pre-rank item heads and re-rank item features exported by training
                     are the ones these checkpoints give (the re-ranker fits its upstream)
    ItemSide         the catalog a version serves and its per-item arrays: for export the data
                     set's items and the files training exported (dataset_items); reindex
                     builds a grown catalog (training/reindex.py)
    publish_items    writes artifacts_root/.tmp-<version>: catalog, retrieval.onnx + ONNX
                     parity against eager PyTorch, items.npy, index.faiss + recall against
                     exact search (an IVF chosen by size gets the nprobe that reaches the
                     threshold), pre-rank / re-rank files + parity; then the stage gate
                     (serving_gate: the version loaded as the service loads it, validation
                     users replayed through every served cut, a stage that hurts switched
                     off in manifest `serving`), the caller's offline-metric gate against the
                     live version (served NDCG@10), a full load + smoke run through
                     service.artifacts, fsync and a rename into place
    set_current      CURRENT replaced atomically (temp file + os.replace), only after all that

Any failure removes the temp folder and leaves CURRENT as it was. publish_items never touches
other versions (pruning is reindex's, training/reindex.py). Each step's wall time is printed on
stderr as `[step] 1.23s` and recorded in the `timings` dict the caller passes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from collections.abc import Callable
from typing import Any

import faiss
import numpy as np
import onnxruntime as ort
import torch

from models.layers import Fields
from models.sasrec import MultiLauncherSASRec
from service.artifacts import ORT_ERRORS
from service.index import IndexSpec, ann_recall, build_index, choose_kind, index_params, save_index, set_faiss_threads
from training import prerank as pr
from training import retrieval as rt
from training.data.dataset import DataError, Dataset
from training.data.sources import load
from training.data.splits import LeaveOneOut
from training.report import timed
from training.export import INDEX_FAISS, PARITY_ATOL, PARITY_RTOL, export_retrieval, retrieval_parity
from training.features import FeatureSpec
from training.served_eval import ServingGate

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CATALOG = "catalog.npz"
CURRENT = "CURRENT"
FORMAT = 1
DEFAULT_MIN_RECALL = 0.9
RECALL_K = 100
# Offline-metric gate against the live version (DESIGN §5): the new served NDCG@10 (the last
# served cut of the manifest's `serving` block; retrieval's when the live version has no such
# block) may be at most this much (absolute) below the live one, compared only on the same data
# fingerprint. 0.01 is about 2 standard errors of NDCG@10 on ml-100k's 943 users (SE ~0.006).
DEFAULT_MAX_REGRESSION = 0.01
REGRESSION_METRIC = "NDCG@10"
# launcher vectors of at most this many real test histories are the recall queries
RECALL_QUERY_USERS = 1000
# queries per recall estimate while tuning an automatically chosen IVF's nprobe (the recall
# reported is then measured on up to 1000): ~1/4 of the exact-search cost per step
TUNE_QUERIES = 250
RERANK_CHECKPOINT = "prm.pt"
RERANK_FILES = ("rerank.onnx", "rerank_items.npy", "rerank_manifest.json")
PRERANK_FILES = (pr.USER_ONNX, pr.ITEMS_NPY, pr.MANIFEST, pr.FEATURES)
# Item heads / re-rank features recomputed here from the checkpoints must equal the files the
# training command exported: same float32 ops on the same weights, so only summation-order
# rounding (~1e-6 on z-scored O(1) values) separates them; 1e-4 still catches another model.
UPSTREAM_ATOL = 1e-4
_CHECK_ERRORS: tuple[type[Exception], ...] = (AssertionError, *ORT_ERRORS)  # parity off, or graph fails
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class PublishError(RuntimeError):
    """A version could not be published; the message says which step failed and why."""


@dataclass(frozen=True)
class PublishResult:
    path: Path
    manifest: dict[str, Any]


@dataclass(eq=False)
class Sources:
    """One data set and the checkpoints trained on it, loaded and checked (load_sources)."""

    data_spec: str
    ds: Dataset
    loo: LeaveOneOut
    ret_dir: Path
    pre_dir: Path
    re_dir: Path | None
    retrieval: MultiLauncherSASRec
    payload: dict[str, Any]  # the retrieval checkpoint's payload (metrics, fingerprint, ...)
    prerank: Any  # a pre-rank tower (IntTower, TwoTower, DCN-v2)
    spec: FeatureSpec
    pre_ckpt: dict[str, Any]
    rerank: Any = None  # RerankModel or None
    rerank_ckpt: dict[str, Any] | None = None

    @property
    def checkpoints(self) -> list[Path]:
        """The checkpoint files (their bytes go into the default version name)."""
        paths = [self.ret_dir / rt.CHECKPOINT, self.pre_dir / pr.CHECKPOINT]
        return paths + ([self.re_dir / RERANK_CHECKPOINT] if self.re_dir is not None else [])


@dataclass(eq=False)
class ItemSide:
    """What a version serves per item; row i of every array is internal item i (0 = padding).

    catalog: the catalog.npz arrays (`catalog_arrays` says which); retrieval: the encoder whose
    embedding table has exactly N + 1 rows; prerank_items (N + 1, G, d) float32;
    rerank_items (N + 1, F) float32 or None; info: the manifest's "catalog" entry.
    """

    catalog: dict[str, np.ndarray]
    retrieval: MultiLauncherSASRec
    prerank_items: np.ndarray
    rerank_items: np.ndarray | None
    info: dict[str, Any]

    @property
    def num_items(self) -> int:
        return int(self.catalog["item_ids"].shape[0]) - 1


Regression = Callable[[Path, dict[str, Any]], dict[str, Any]]
"""(temp version folder, its manifest) -> the manifest's checks.regression entry; raises
PublishError when the new version is worse than the live one beyond the tolerance."""


def default_version(fingerprint: str, sources: list[Path]) -> str:
    """UTC timestamp plus a 6-hex hash of the data fingerprint and checkpoint contents."""
    h = hashlib.sha256(fingerprint.encode())
    for src in sources:
        h.update(src.read_bytes())
    return f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{h.hexdigest()[:6]}"


def read_current(artifacts_root: str | Path) -> str | None:
    """Name of the live version, or None when artifacts_root/CURRENT does not exist; PublishError
    when CURRENT holds something that is not a version name (e.g. a path out of the root)."""
    path = Path(artifacts_root) / CURRENT
    if not path.is_file():
        return None
    try:
        name = path.read_bytes()[:256].decode("utf-8").strip()
    except UnicodeDecodeError:
        name = "<not UTF-8>"
    if not _VERSION_RE.match(name) or name == CURRENT:
        raise PublishError(f"{path}: invalid version name {name!r} (must match {_VERSION_RE.pattern})")
    return name


def publish_version(
    data_spec: str,
    retrieval_dir: str | Path,
    prerank_dir: str | Path,
    rerank_dir: str | Path | None,
    artifacts_root: str | Path,
    version: str | None = None,
    min_recall: float = DEFAULT_MIN_RECALL,
    max_regression: float | None = DEFAULT_MAX_REGRESSION,
    index_spec: IndexSpec | None = None,
    gate: ServingGate = ServingGate(),
) -> Path:
    """Build, check and publish a version; return artifacts_root/<version> (now CURRENT).

    Checks: ONNX parity of the three graphs against their checkpoints, index recall@100 (k
    capped at N) >= min_recall, the exported pre-rank item heads and re-rank item features
    recomputed from these checkpoints, the stage gate on validation users (`gate`: a stage
    worse than the previous served cut beyond its tolerance is switched off, or refused with
    require_all_stages), served NDCG@10 at most max_regression below the live version's (same
    data only; None turns that check off), and a load + smoke run through service.artifacts. index_spec=None picks the kind from the catalog size (service.index)
    and, for IVF, the smallest doubling of nprobe that reaches min_recall.

    Raises FileNotFoundError for a missing checkpoint folder, DataError when a checkpoint was
    trained on another data set, ValueError for a bad argument and PublishError when a
    check fails. On any error the temp folder is removed and CURRENT is unchanged.
    """
    return publish(data_spec, retrieval_dir, prerank_dir, rerank_dir, artifacts_root, version, min_recall,
                   max_regression, index_spec, gate=gate).path


def publish(
    data_spec: str,
    retrieval_dir: str | Path,
    prerank_dir: str | Path,
    rerank_dir: str | Path | None,
    artifacts_root: str | Path,
    version: str | None = None,
    min_recall: float = DEFAULT_MIN_RECALL,
    max_regression: float | None = DEFAULT_MAX_REGRESSION,
    index_spec: IndexSpec | None = None,
    timings: dict[str, float] | None = None,
    gate: ServingGate = ServingGate(),
) -> PublishResult:
    """publish_version that also returns the manifest written (and fills `timings`)."""
    check_gates(min_recall, max_regression)
    root = Path(artifacts_root)
    src = load_sources(data_spec, retrieval_dir, prerank_dir, rerank_dir)
    root.mkdir(parents=True, exist_ok=True)
    check_upstream(src)
    version = version or default_version(src.ds.fingerprint, src.checkpoints)
    return publish_items(src, dataset_items(src), root, version, min_recall, index_spec,
                         lambda tmp, manifest: _check_regression(root, manifest, max_regression), timings, gate)


def check_gates(min_recall: float, max_regression: float | None) -> None:
    """ValueError for a gate threshold out of range."""
    if not 0.0 <= min_recall <= 1.0:
        raise ValueError(f"min_recall must be in [0, 1], got {min_recall}")
    if max_regression is not None and max_regression < 0:
        raise ValueError(f"max_regression must be >= 0 or None (no gate), got {max_regression}")


def load_sources(data_spec: str, retrieval_dir: str | Path, prerank_dir: str | Path,
                 rerank_dir: str | Path | None) -> Sources:
    """Load the data set and the checkpoints; FileNotFoundError for a missing file, DataError
    for a checkpoint of another data set, PublishError for an unreadable checkpoint."""
    ret_dir, pre_dir = Path(retrieval_dir), Path(prerank_dir)
    re_dir = Path(rerank_dir) if rerank_dir is not None else None
    _require(ret_dir / rt.CHECKPOINT, "retrieval")
    for name in (pr.CHECKPOINT, *PRERANK_FILES):
        _require(pre_dir / name, "pre-rank")
    if re_dir is not None:
        for name in (RERANK_CHECKPOINT, *RERANK_FILES):
            _require(re_dir / name, "re-rank")

    ds = load(data_spec)
    retrieval, payload = _load_checkpoint(rt.load_checkpoint, ret_dir / rt.CHECKPOINT, ret_dir)
    _check_data("retrieval", ret_dir, payload.get("fingerprint"), ds)
    if retrieval.config.num_items != ds.num_items:
        raise DataError(f"{ret_dir}: retrieval checkpoint has {retrieval.config.num_items} items, "
                        f"the data set {ds.num_items}")
    prerank, spec, pre_ckpt = _load_checkpoint(pr.load_checkpoint, pre_dir / pr.CHECKPOINT, pre_dir)
    _check_data("pre-rank", pre_dir, pre_ckpt.get("fingerprint"), ds)
    src = Sources(data_spec, ds, LeaveOneOut(ds), ret_dir, pre_dir, re_dir, retrieval, payload, prerank, spec,
                  pre_ckpt)
    if re_dir is not None:
        from training.impressions import load_reranker

        path = re_dir / RERANK_CHECKPOINT
        src.rerank, src.rerank_ckpt = _load_checkpoint(load_reranker, path, path)
        _check_data("re-rank", re_dir, src.rerank_ckpt.get("fingerprint"), ds)
    return src


def dataset_items(src: Sources) -> ItemSide:
    """The item side `recsys export` publishes: the data set's items, the retrieval checkpoint
    as trained and the item arrays the pre-rank / re-rank training commands exported."""
    return ItemSide(
        catalog=catalog_arrays(src.ds, src.loo),
        retrieval=src.retrieval,
        prerank_items=np.load(src.pre_dir / pr.ITEMS_NPY),
        rerank_items=np.load(src.re_dir / RERANK_FILES[1]) if src.re_dir is not None else None,
        info={"popularity": "training-part interaction counts"},
    )


def publish_items(src: Sources, items: ItemSide, artifacts_root: str | Path, version: str, min_recall: float,
                  index_spec: IndexSpec | None, regression: Regression,
                  timings: dict[str, float] | None = None, gate: ServingGate = ServingGate()) -> PublishResult:
    """Write, check and rename artifacts_root/<version>, then make it CURRENT (see the module doc).

    gate: the stage gate on the served path (serving_gate), which writes manifest `serving`
    before `regression` runs. Raises ValueError for a bad version name and PublishError when a
    check fails; on any error the temp folder is removed and CURRENT is unchanged.
    """
    timings = {} if timings is None else timings
    if not _VERSION_RE.match(version) or version == CURRENT:
        raise ValueError(f"version must match {_VERSION_RE.pattern} and not be {CURRENT!r}, got {version!r}")
    root = Path(artifacts_root)
    final = root / version
    if final.exists():
        raise PublishError(f"version {version} already exists at {final}")
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{version}"
    if tmp.exists():
        shutil.rmtree(tmp)  # left over by a killed publish of the same version
    tmp.mkdir()
    try:
        manifest = _build(tmp, version, src, items, min_recall, index_spec, timings)
        with timed("gate", timings):
            if src.rerank is not None:
                _check_rerank(tmp, src.rerank, manifest)
            _write_json(tmp / MANIFEST, manifest)  # the service loads the folder from its manifest
            with timed("served", timings):
                manifest["serving"] = serving_gate(tmp, src, gate)
            manifest["checks"] = {"min_recall": min_recall, "regression": regression(tmp, manifest)}
            _write_json(tmp / MANIFEST, manifest)
            smoke(tmp)
        with timed("write", timings):
            _fsync_tree(tmp)
            os.rename(tmp, final)
            _fsync_dir(root)
            set_current(root, version)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("published %s as CURRENT", final)
    return PublishResult(final, manifest)


def set_current(artifacts_root: str | Path, version: str) -> None:
    """Point artifacts_root/CURRENT at an existing version atomically (temp file + os.replace)."""
    root = Path(artifacts_root)
    if not (root / version / MANIFEST).is_file():
        raise PublishError(f"cannot point CURRENT at {version}: no {MANIFEST} in {root / version}")
    tmp = root / f".{CURRENT}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(version + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / CURRENT)
    _fsync_dir(root)


# --- building ---


def _build(out: Path, version: str, src: Sources, items: ItemSide, min_recall: float,
           index_spec: IndexSpec | None, timings: dict[str, float]) -> dict[str, Any]:
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
        except _CHECK_ERRORS as exc:
            raise PublishError(f"retrieval.onnx differs from eager PyTorch beyond atol={PARITY_ATOL}: {exc}") from None
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
        recall, tuned = _measure_recall(index, vectors, queries, k, min_recall, tune=index_spec is None)
    if recall < min_recall:
        raise PublishError(f"index recall@{k} = {recall:.4f} is below --min-recall {min_recall}")
    save_index(index, out / INDEX_FAISS)  # with the nprobe measured

    with timed("prerank", timings):
        for name in (pr.USER_ONNX, pr.MANIFEST, pr.FEATURES):
            shutil.copy2(src.pre_dir / name, out / name)
        heads = items.prerank_items
        if heads.ndim != 3 or heads.shape[0] != n + 1:
            raise PublishError(f"pre-rank item heads have shape {heads.shape}, expected ({n + 1}, G, d)")
        np.save(out / pr.ITEMS_NPY, heads.astype(np.float32, copy=False))
        pre_parity = _prerank_parity(src.prerank, src.spec, out / pr.USER_ONNX)
    pre_manifest = json.loads((src.pre_dir / pr.MANIFEST).read_text())

    cfg = retrieval.config
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "version": version,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "data": {"spec": src.data_spec, "name": ds.name, "fingerprint": ds.fingerprint, "num_users": ds.num_users,
                 "num_items": ds.num_items, "num_interactions": ds.num_interactions},
        "item_count": n,
        "dims": {"retrieval_dim": cfg.dim, "num_launchers": cfg.num_launchers, "maxlen": cfg.maxlen,
                 "prerank_item_heads": list(heads.shape[1:]),
                 "prerank_user_heads": pre_manifest["outputs"]["user_heads"][1:-1]},  # (L, H, d)
        "files": {"catalog": CATALOG, "retrieval_onnx": onnx_path.name, "items": items_path.name,
                  "index": INDEX_FAISS, "prerank_user_onnx": pr.USER_ONNX, "prerank_items": pr.ITEMS_NPY,
                  "prerank_features": pr.FEATURES},
        "catalog": {**items.info, "max_popularity": int(items.catalog["popularity"].max())},
        "retrieval": {"source": str(src.ret_dir), "model": "MultiLauncherSASRec", "config": cfg.to_dict(),
                      "metrics": src.payload.get("metrics", {}), "parity_max_abs_diff": parity,
                      "inputs": {"item_seq": ["B", "L", "int64"]},
                      "outputs": {"user_vectors": ["B", cfg.num_launchers, cfg.dim, "float32"]}},
        "index": {**index_params(index), f"recall@{k}": recall, "file": INDEX_FAISS, "min_recall": min_recall,
                  "recall_k": f"recall@{k}", "recall": recall, "queries": int(queries.shape[0] * queries.shape[1]),
                  **({"nprobe_tuned": tuned} if tuned else {})},
        "prerank": {"source": str(src.pre_dir), "model": src.pre_ckpt.get("model"),
                    "config": src.prerank.cfg.to_dict(), "objective": src.pre_ckpt.get("objective"),
                    "train": src.pre_ckpt.get("train"), "metrics": src.pre_ckpt.get("metrics", {}),
                    "parity_max_abs_diff": pre_parity, "serving": pre_manifest},
        "rerank": None,
    }
    if src.re_dir is not None:
        assert src.rerank_ckpt is not None and items.rerank_items is not None
        shutil.copy2(src.re_dir / RERANK_FILES[0], out / RERANK_FILES[0])
        np.save(out / RERANK_FILES[1], items.rerank_items.astype(np.float32, copy=False))
        manifest["files"].update(rerank_onnx=RERANK_FILES[0], rerank_items=RERANK_FILES[1])
        manifest["rerank"] = {"source": str(src.re_dir), "model": src.rerank_ckpt.get("name"),
                              "train": src.rerank_ckpt.get("train"), "metrics": src.rerank_ckpt.get("metrics", {}),
                              "serving": json.loads((src.re_dir / RERANK_FILES[2]).read_text())}
    return manifest


def _measure_recall(index: faiss.Index, vectors: np.ndarray, queries: np.ndarray, k: int, min_recall: float,
                    tune: bool) -> tuple[float, dict[str, int] | None]:
    """Index recall@k against exact search; with `tune` (an index chosen by size) an IVF's nprobe
    is doubled until recall reaches min_recall (or nprobe = nlist), estimated on TUNE_QUERIES
    queries first. Returns the recall and {"from", "to"} when nprobe changed.

    Why tune: IVF recall depends on the catalog. When cold-start items (small norms, a few dense
    clusters) outnumber the trained ones, the coarse lists follow the cold items and a query's
    best trained items can spread over many lists: 1k trained + 999k cold items from a 1-epoch
    SASRec gave recall@100 0.61 at the default nprobe 64 of 2000 lists, 0.92 at 256 (the 3-epoch
    model of benchmarks/results/reindex_time.txt keeps 0.9999 at 64).
    """
    ivf = tune and isinstance(index, faiss.IndexIVF)
    start = int(index.nprobe) if ivf else 0
    while ivf and index.nprobe < index.nlist and ann_recall(index, vectors, queries, k=k,
                                                            sample=TUNE_QUERIES) < min_recall:
        index.nprobe = min(2 * int(index.nprobe), int(index.nlist))
    recall = ann_recall(index, vectors, queries, k=k)
    while ivf and recall < min_recall and index.nprobe < index.nlist:  # the estimate was optimistic
        index.nprobe = min(2 * int(index.nprobe), int(index.nlist))
        recall = ann_recall(index, vectors, queries, k=k)
    if not ivf or index.nprobe == start:
        return recall, None
    log.info("IVF nprobe %d -> %d for recall@%d >= %s", start, index.nprobe, k, min_recall)
    return recall, {"from": start, "to": int(index.nprobe)}


def catalog_arrays(ds: Dataset, loo: LeaveOneOut) -> dict[str, np.ndarray]:
    """catalog.npz: item_ids (N + 1,) str, popularity (N + 1,) int64 (training part), and per item
    feature `cat:<name>` (N + 1,) / `multi:<name>` (N + 1, K) int64 codes with `vocab:<name>`
    (code c >= 1 is vocab[c - 1]; 0 = unknown / padding), `num:<name>` (N + 1,) float32."""
    popularity = np.bincount(ds.items[loo.train_mask], minlength=ds.num_items + 1).astype(np.int64)
    popularity[0] = 0
    arrays: dict[str, np.ndarray] = {"item_ids": ds.item_ids.astype(str), "popularity": popularity}
    table = ds.item_features
    if table is not None:
        for name, col in table.categorical.items():
            arrays[f"cat:{name}"] = col.astype(np.int64)
        for name, col in table.multi.items():
            arrays[f"multi:{name}"] = col.astype(np.int64)
        for name, col in table.numeric.items():
            arrays[f"num:{name}"] = col.astype(np.float32)
        for name, vocab in table.vocab.items():
            arrays[f"vocab:{name}"] = np.array(vocab, dtype=str)
    return arrays


# --- checks ---


def _prerank_parity(model: Any, spec: Any, onnx_path: Path, batch: int = 7, seed: int = 0) -> float:
    """Max |ONNX - eager| of the pre-rank user heads on random in-vocabulary inputs."""
    cfg = spec.user.fields_config()
    rng = np.random.default_rng(seed)
    sparse = np.stack([rng.integers(0, v, size=batch) for v in cfg.sparse_vocab], axis=1).reshape(batch, -1)
    multi = [rng.integers(0, v, size=(batch, w)) for v, w in zip(cfg.multi_vocab, cfg.multi_width)]
    feeds = {
        "user_sparse": sparse.astype(np.int64),
        "user_dense": rng.standard_normal((batch, cfg.num_dense)).astype(np.float32),
        "user_multi": (np.concatenate(multi, axis=1) if multi else np.zeros((batch, 0))).astype(np.int64),
    }
    try:
        got = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    except ORT_ERRORS as exc:
        raise PublishError(f"{onnx_path.name} does not run: {exc}") from None
    with torch.no_grad():
        want = model.user_heads(Fields(*(torch.from_numpy(feeds[n]) for n in feeds))).numpy()
    try:
        # same tolerance and reason as the retrieval encoder (training/export.py)
        np.testing.assert_allclose(got, want, atol=PARITY_ATOL, rtol=PARITY_RTOL)
    except AssertionError as exc:
        raise PublishError(f"{onnx_path.name} does not match the pre-rank checkpoint: {exc}") from None
    return float(np.abs(got - want).max())


def _check_rerank(out: Path, model: Any, manifest: dict[str, Any]) -> None:
    from training.export_rerank import rerank_parity

    feats = np.load(out / RERANK_FILES[1], mmap_mode="r")
    n = manifest["item_count"] + 1
    if feats.shape != (n, model.config.item_dim):
        raise PublishError(f"rerank_items.npy has shape {feats.shape}, expected ({n}, {model.config.item_dim})")
    layers, heads, _ = manifest["dims"]["prerank_user_heads"]
    pv = layers * heads  # one PV column per (layer, user head)
    if model.config.pv_dim not in (0, pv):
        raise PublishError(f"the re-ranker takes pv_dim={model.config.pv_dim} but the pre-ranker gives "
                           f"{pv} (layer, head) interactions")
    try:
        manifest["rerank"]["parity_max_abs_diff"] = rerank_parity(model, out / RERANK_FILES[0])
    except _CHECK_ERRORS as exc:
        raise PublishError(f"rerank.onnx does not match {RERANK_CHECKPOINT}: {exc}") from None
    manifest["rerank"]["config"] = model.config.to_dict()
    manifest["dims"]["rerank_item_dim"] = model.config.item_dim


def check_upstream(src: Sources) -> Any:
    """The pre-rank item heads (and re-rank item features) that training exported come from these
    checkpoints. Returns the training.impressions.Pipeline that recomputed them.

    Recomputed as Pipeline does; only for the next-item pre-ranker, whose catalog features need
    no labels (a CTR pre-ranker cannot feed the re-ranker anyway): None for a CTR pre-ranker.
    """
    if src.pre_ckpt.get("objective") not in (None, "next-item"):
        if src.re_dir is not None:
            raise PublishError(f"{src.pre_dir}: the re-ranker needs a next-item pre-ranker, "
                               f"this one was trained on {src.pre_ckpt['objective']!r}")
        return None
    from training.impressions import Pipeline

    pipe = Pipeline.load(src.ds, src.loo, src.ret_dir, src.pre_dir)
    heads, want = np.load(src.pre_dir / pr.ITEMS_NPY), pipe.item_heads.numpy()
    if heads.shape != want.shape or not np.allclose(heads[1:], want[1:], atol=UPSTREAM_ATOL):
        raise PublishError(f"{src.pre_dir / pr.ITEMS_NPY} was not exported from {src.pre_dir / pr.CHECKPOINT}")
    if src.re_dir is not None:
        feats = np.load(src.re_dir / RERANK_FILES[1])
        if feats.shape != pipe.item_feats.shape or not np.allclose(feats, pipe.item_feats, atol=UPSTREAM_ATOL):
            raise PublishError(f"{src.re_dir}: the re-ranker was trained on other retrieval / pre-rank checkpoints "
                               f"(its rerank_items.npy differs from the features of {src.ret_dir} + {src.pre_dir})")
    return pipe


def serving_gate(tmp: Path, src: Sources, gate: ServingGate) -> dict[str, Any]:
    """The manifest's `serving` block: load the temp version as the service does, replay up to
    gate.users validation users through every served cut (training/served_eval.py) and switch
    off a stage whose cut is worse than the previous served cut beyond gate.tolerance.

    A switched-off stage is printed on stderr; with gate.require_all_stages it is a PublishError.
    """
    from service.artifacts import ArtifactError, load_version
    from training import served_eval as se

    try:
        version = load_version(tmp)
    except ArtifactError as exc:
        raise PublishError(f"the new version does not load: {exc}") from None
    users = se.select_users(src.loo, gate.users, gate.seed)
    ev = se.evaluate_served(version, src.ds, src.loo, "valid", users, progress=sys.stderr.isatty())
    choice = se.choose_stages(ev, gate.tolerance)
    print(f"served cuts, {ev.users} validation users (* = served):\n"
          f"{se.cut_table(ev.cuts, served=choice.stages)}", file=sys.stderr)
    if choice.switched_off:
        off = ", ".join(choice.switched_off)
        if gate.require_all_stages:
            raise PublishError(f"--require-all-stages: the stage gate switched off {off}: {choice.reason}")
        banner = "!" * 78
        print(f"{banner}\nSTAGE GATE: {off} SWITCHED OFF for version {version.version}; it serves "
              f"{' -> '.join(choice.stages)}.\n{choice.reason}\n{banner}", file=sys.stderr)
        log.warning("stage gate: %s switched off for %s (%s)", off, version.version, choice.reason)
    return se.serving_block(ev, choice, gate.tolerance, gate.seed)


def served_comparison(old: dict[str, Any], new: dict[str, Any]) -> tuple[str, float, float] | None:
    """(what is compared, live value, new value) of the served NDCG@10 (each version's last served
    cut) when both manifests record one on the same split; None otherwise."""
    from training.served_eval import served_metric

    before, after = served_metric(old), served_metric(new)
    if before is None or after is None or old["serving"].get("split") != new["serving"].get("split"):
        return None
    return f"served {REGRESSION_METRIC} ({'+'.join(new['serving']['stages'])})", before, after


def _check_regression(root: Path, manifest: dict[str, Any], max_regression: float | None) -> dict[str, Any]:
    """Compare the served NDCG@10 with the live version's (retrieval's when the live version has
    no serving block); raise PublishError beyond the tolerance."""
    live = read_current(root)
    entry: dict[str, Any] = {"metric": REGRESSION_METRIC, "max_regression": max_regression, "live_version": live}
    if max_regression is None or live is None:
        return {**entry, "result": "skipped: " + ("gate off" if max_regression is None else "no live version")}
    try:
        old = json.loads((root / live / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return {**entry, "result": f"skipped: live manifest unreadable ({exc})"}
    if old.get("data", {}).get("fingerprint") != manifest["data"]["fingerprint"]:
        return {**entry, "result": "skipped: the live version was built on other data"}
    what, before, after = served_comparison(old, manifest) or (
        f"retrieval {REGRESSION_METRIC}", old.get("retrieval", {}).get("metrics", {}).get(REGRESSION_METRIC),
        manifest["retrieval"]["metrics"].get(REGRESSION_METRIC))
    entry["compared"] = what
    if before is None or after is None:
        return {**entry, "result": f"skipped: {REGRESSION_METRIC} not recorded"}
    if after < before - max_regression:
        raise PublishError(f"{what} {after:.4f} is worse than the live version {live} "
                           f"({before:.4f}) by more than {max_regression}")
    return {**entry, "result": "passed", "live": before, "new": after}


def smoke(path: Path, failure: str = "the new version does not load") -> None:
    """Load the folder as the service will, build its Recommender and run one request per stage
    (service/smoke.py, the check the service's hot swap runs); PublishError(failure: why)."""
    from service.artifacts import ArtifactError
    from service.smoke import load_checked

    try:
        load_checked(path)
    except ArtifactError as exc:
        raise PublishError(f"{failure}: {exc}") from None


# --- files ---


def _load_checkpoint(loader: Any, path: Path, arg: Path) -> Any:
    """loader(arg), with an unreadable or mismatched file reported as a PublishError naming `path`."""
    try:
        return loader(arg)
    except (pickle.UnpicklingError, EOFError, OSError, RuntimeError, KeyError, TypeError, ValueError) as exc:
        # torch.load on a truncated / foreign file, or a state dict that does not fit the config
        raise PublishError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None


def _require(path: Path, what: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent}: no {what} {path.name} there")


def _check_data(what: str, path: Path, fingerprint: str | None, ds: Dataset) -> None:
    if fingerprint is None:
        raise DataError(f"{path}: the {what} checkpoint records no data fingerprint")
    if fingerprint != ds.fingerprint:
        raise DataError(f"{path}: the {what} checkpoint was trained on another data set "
                        f"(fingerprint {fingerprint}, data {ds.fingerprint})")


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, default=_jsonable) + "\n")


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    if isinstance(x, (tuple, np.ndarray)):
        return list(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _fsync_tree(path: Path) -> None:
    for p in path.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
