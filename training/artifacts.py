"""Publish one self-describing artifact version (DESIGN.md §5) from trained checkpoints.

artifacts_root/<version>/ holds manifest.json, catalog.npz, retrieval.onnx, items.npy,
index.faiss, prerank_user.onnx, prerank_items.npy, prerank_features.json and, with a
re-ranker, rerank.onnx + rerank_items.npy. The version is written to
artifacts_root/.tmp-<version>, checked (ONNX parity against eager PyTorch, index recall
against exact search, upstream consistency, offline metrics against the live version, then a
full load + smoke run through service.artifacts), fsynced and renamed into place; only then is artifacts_root/CURRENT
replaced (temp file + os.replace). Any failure removes the temp folder and leaves CURRENT
as it was. Old versions are never touched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from models.layers import Fields
from service.artifacts import ORT_ERRORS
from service.index import IndexSpec
from training import prerank as pr
from training import retrieval as rt
from training.data.dataset import DataError, Dataset
from training.data.sources import load
from training.data.splits import LeaveOneOut
from training.export import PARITY_ATOL, PARITY_RTOL, build_item_index, export_retrieval, retrieval_parity

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CATALOG = "catalog.npz"
CURRENT = "CURRENT"
FORMAT = 1
DEFAULT_MIN_RECALL = 0.9
RECALL_K = 100
# Offline-metric gate against the live version (DESIGN §5): the new retrieval NDCG@10 may be
# at most this much (absolute) below the live one, compared only on the same data fingerprint.
# 0.01 is about 2 standard errors of NDCG@10 on ml-100k's 943 test users (SE ~0.006).
DEFAULT_MAX_REGRESSION = 0.01
REGRESSION_METRIC = "NDCG@10"
# launcher vectors of at most this many real test histories are the recall queries
RECALL_QUERY_USERS = 1000
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


def default_version(fingerprint: str, sources: list[Path]) -> str:
    """UTC timestamp plus a 6-hex hash of the data fingerprint and checkpoint contents."""
    h = hashlib.sha256(fingerprint.encode())
    for src in sources:
        h.update(src.read_bytes())
    return f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{h.hexdigest()[:6]}"


def read_current(artifacts_root: str | Path) -> str | None:
    """Name of the live version, or None when artifacts_root/CURRENT does not exist."""
    path = Path(artifacts_root) / CURRENT
    return path.read_text().strip() if path.is_file() else None


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
) -> Path:
    """Build, check and publish a version; return artifacts_root/<version> (now CURRENT).

    Checks: ONNX parity of the three graphs against their checkpoints, index recall@100 (k
    capped at N) >= min_recall, the exported pre-rank item heads and re-rank item features
    recomputed from these checkpoints, retrieval NDCG@10 at most max_regression below the live
    version's (same data only; None turns the gate off), and a load + smoke run through
    service.artifacts. index_spec=None picks the kind from the catalog size (service.index).

    Raises FileNotFoundError for a missing checkpoint folder, DataError when a checkpoint was
    trained on another data set, ValueError for a bad argument and PublishError when a
    check fails. On any error the temp folder is removed and CURRENT is unchanged.
    """
    return publish(data_spec, retrieval_dir, prerank_dir, rerank_dir, artifacts_root, version, min_recall,
                   max_regression, index_spec).path


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
) -> PublishResult:
    """publish_version that also returns the manifest written."""
    if not 0.0 <= min_recall <= 1.0:
        raise ValueError(f"min_recall must be in [0, 1], got {min_recall}")
    if max_regression is not None and max_regression < 0:
        raise ValueError(f"max_regression must be >= 0 or None (no gate), got {max_regression}")
    ret_dir, pre_dir = Path(retrieval_dir), Path(prerank_dir)
    re_dir = Path(rerank_dir) if rerank_dir is not None else None
    _require(ret_dir / rt.CHECKPOINT, "retrieval")
    for name in (pr.CHECKPOINT, *PRERANK_FILES):
        _require(pre_dir / name, "pre-rank")
    if re_dir is not None:
        for name in (RERANK_CHECKPOINT, *RERANK_FILES):
            _require(re_dir / name, "re-rank")
    root = Path(artifacts_root)

    ds = load(data_spec)
    loo = LeaveOneOut(ds)
    retrieval, payload = _load_checkpoint(rt.load_checkpoint, ret_dir / rt.CHECKPOINT, ret_dir)
    _check_data("retrieval", ret_dir, payload.get("fingerprint"), ds)
    if retrieval.config.num_items != ds.num_items:
        raise DataError(f"{ret_dir}: retrieval checkpoint has {retrieval.config.num_items} items, "
                        f"the data set {ds.num_items}")
    prerank, spec, pre_ckpt = _load_checkpoint(pr.load_checkpoint, pre_dir / pr.CHECKPOINT, pre_dir)
    _check_data("pre-rank", pre_dir, pre_ckpt.get("fingerprint"), ds)
    rerank_ckpt: dict[str, Any] | None = None
    if re_dir is not None:
        from training.impressions import load_reranker

        path = re_dir / RERANK_CHECKPOINT
        rerank_model, rerank_ckpt = _load_checkpoint(load_reranker, path, path)
        _check_data("re-rank", re_dir, rerank_ckpt.get("fingerprint"), ds)

    sources = [ret_dir / rt.CHECKPOINT, pre_dir / pr.CHECKPOINT] + ([re_dir / RERANK_CHECKPOINT] if re_dir else [])
    version = version or default_version(ds.fingerprint, sources)
    if not _VERSION_RE.match(version) or version == CURRENT:
        raise ValueError(f"version must match {_VERSION_RE.pattern} and not be {CURRENT!r}, got {version!r}")
    final = root / version
    if final.exists():
        raise PublishError(f"version {version} already exists at {final}")
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{version}"
    if tmp.exists():
        shutil.rmtree(tmp)  # left over by a killed publish of the same version
    tmp.mkdir()
    try:
        manifest = _build(tmp, version, data_spec, ds, loo, retrieval, payload, ret_dir, prerank, spec, pre_ckpt,
                          pre_dir, re_dir, rerank_ckpt, min_recall, index_spec)
        if re_dir is not None:
            _check_rerank(tmp, rerank_model, manifest)
        _check_upstream(tmp, ds, loo, ret_dir, pre_dir, pre_ckpt, re_dir)
        manifest["checks"] = {"min_recall": min_recall,
                              "regression": _check_regression(root, manifest, max_regression)}
        _write_json(tmp / MANIFEST, manifest)
        _smoke(tmp)
        _fsync_tree(tmp)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    set_current(root, version)
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


def _build(out: Path, version: str, data_spec: str, ds: Dataset, loo: LeaveOneOut, retrieval: Any,
           payload: dict[str, Any], ret_dir: Path, prerank: Any, spec: Any, pre_ckpt: dict[str, Any],
           pre_dir: Path, re_dir: Path | None, rerank_ckpt: dict[str, Any] | None,
           min_recall: float, index_spec: IndexSpec | None) -> dict[str, Any]:
    popularity = _write_catalog(out / CATALOG, ds, loo)

    onnx_path, items_path = export_retrieval(retrieval, out)
    try:
        parity = retrieval_parity(retrieval, onnx_path)
    except _CHECK_ERRORS as exc:
        raise PublishError(f"retrieval.onnx differs from eager PyTorch beyond atol={PARITY_ATOL}: {exc}") from None
    items = np.load(items_path)  # (N, D)
    users = np.arange(min(RECALL_QUERY_USERS, loo.eval_users.size))
    with torch.no_grad():
        queries = retrieval.encode_user(torch.from_numpy(
            loo.histories("test", users, maxlen=retrieval.config.maxlen))).numpy()  # (B, M, D)
    index_entry = build_item_index(items, queries, out, spec=index_spec, k=RECALL_K)
    recall_key = next(k for k in index_entry if k.startswith("recall@"))
    recall = float(index_entry[recall_key])  # type: ignore[arg-type]
    if recall < min_recall:
        raise PublishError(f"index {recall_key} = {recall:.4f} is below --min-recall {min_recall}")

    for name in PRERANK_FILES:
        shutil.copy2(pre_dir / name, out / name)
    pre_parity = _prerank_parity(prerank, spec, out / pr.USER_ONNX)
    pre_manifest = json.loads((pre_dir / pr.MANIFEST).read_text())
    heads = np.load(out / pr.ITEMS_NPY, mmap_mode="r")
    if heads.ndim != 3 or heads.shape[0] != ds.num_items + 1:
        raise PublishError(f"{pre_dir / pr.ITEMS_NPY}: shape {heads.shape}, expected ({ds.num_items + 1}, G, d)")

    cfg = retrieval.config
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "version": version,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "data": {"spec": data_spec, "name": ds.name, "fingerprint": ds.fingerprint, "num_users": ds.num_users,
                 "num_items": ds.num_items, "num_interactions": ds.num_interactions},
        "item_count": ds.num_items,
        "dims": {"retrieval_dim": cfg.dim, "num_launchers": cfg.num_launchers, "maxlen": cfg.maxlen,
                 "prerank_item_heads": list(heads.shape[1:]),
                 "prerank_user_heads": pre_manifest["outputs"]["user_heads"][1:-1]},  # (L, H, d)
        "files": {"catalog": CATALOG, "retrieval_onnx": onnx_path.name, "items": items_path.name,
                  "index": index_entry["file"], "prerank_user_onnx": pr.USER_ONNX, "prerank_items": pr.ITEMS_NPY,
                  "prerank_features": pr.FEATURES},
        "catalog": {"popularity": "training-part interaction counts", "max_popularity": int(popularity.max())},
        "retrieval": {"source": str(ret_dir), "model": "MultiLauncherSASRec", "config": cfg.to_dict(),
                      "metrics": payload.get("metrics", {}), "parity_max_abs_diff": parity,
                      "inputs": {"item_seq": ["B", "L", "int64"]},
                      "outputs": {"user_vectors": ["B", cfg.num_launchers, cfg.dim, "float32"]}},
        "index": {**index_entry, "min_recall": min_recall, "recall_k": recall_key, "recall": recall,
                  "queries": int(queries.shape[0] * queries.shape[1])},
        "prerank": {"source": str(pre_dir), "model": pre_ckpt.get("model"), "config": prerank.cfg.to_dict(),
                    "objective": pre_ckpt.get("objective"), "train": pre_ckpt.get("train"),
                    "metrics": pre_ckpt.get("metrics", {}), "parity_max_abs_diff": pre_parity,
                    "serving": pre_manifest},
        "rerank": None,
    }
    if re_dir is not None:
        assert rerank_ckpt is not None
        for name in RERANK_FILES[:2]:
            shutil.copy2(re_dir / name, out / name)
        manifest["files"].update(rerank_onnx=RERANK_FILES[0], rerank_items=RERANK_FILES[1])
        manifest["rerank"] = {"source": str(re_dir), "model": rerank_ckpt.get("name"),
                              "train": rerank_ckpt.get("train"), "metrics": rerank_ckpt.get("metrics", {}),
                              "serving": json.loads((re_dir / RERANK_FILES[2]).read_text())}
    return manifest


def _write_catalog(path: Path, ds: Dataset, loo: LeaveOneOut) -> np.ndarray:
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
    with open(path, "wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]  # no object arrays: loads with allow_pickle=False
    return popularity


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


def _check_upstream(out: Path, ds: Dataset, loo: LeaveOneOut, ret_dir: Path, pre_dir: Path,
                    pre_ckpt: dict[str, Any], re_dir: Path | None) -> None:
    """The exported item heads (and re-rank item features) come from these very checkpoints.

    Recomputed as training.impressions.Pipeline does; only for the next-item pre-ranker, whose
    catalog features need no labels (a CTR pre-ranker cannot feed the re-ranker anyway).
    """
    if pre_ckpt.get("objective") not in (None, "next-item"):
        if re_dir is not None:
            raise PublishError(f"{pre_dir}: the re-ranker needs a next-item pre-ranker, "
                               f"this one was trained on {pre_ckpt['objective']!r}")
        return
    from training.impressions import Pipeline

    pipe = Pipeline.load(ds, loo, ret_dir, pre_dir)
    heads = np.load(out / pr.ITEMS_NPY)
    if not np.allclose(heads[1:], pipe.item_heads.numpy()[1:], atol=UPSTREAM_ATOL):
        raise PublishError(f"{pre_dir / pr.ITEMS_NPY} was not exported from {pre_dir / pr.CHECKPOINT}")
    if re_dir is not None:
        feats = np.load(out / RERANK_FILES[1])
        if not np.allclose(feats, pipe.item_feats, atol=UPSTREAM_ATOL):
            raise PublishError(f"{re_dir}: the re-ranker was trained on other retrieval / pre-rank checkpoints "
                               f"(its rerank_items.npy differs from the features of {ret_dir} + {pre_dir})")


def _check_regression(root: Path, manifest: dict[str, Any], max_regression: float | None) -> dict[str, Any]:
    """Compare retrieval NDCG@10 with the live version's; raise PublishError beyond the tolerance."""
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
    before = old.get("retrieval", {}).get("metrics", {}).get(REGRESSION_METRIC)
    after = manifest["retrieval"]["metrics"].get(REGRESSION_METRIC)
    if before is None or after is None:
        return {**entry, "result": f"skipped: {REGRESSION_METRIC} not recorded"}
    if after < before - max_regression:
        raise PublishError(f"retrieval {REGRESSION_METRIC} {after:.4f} is worse than the live version {live} "
                           f"({before:.4f}) by more than {max_regression}")
    return {**entry, "result": "passed", "live": before, "new": after}


def _smoke(path: Path) -> None:
    """Load the folder as the service will and run every stage once."""
    from service.artifacts import ArtifactError, load_version, smoke_run

    try:
        smoke_run(load_version(path))
    except ArtifactError as exc:
        raise PublishError(f"the new version does not load: {exc}") from None


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
