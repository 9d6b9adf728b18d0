"""Checks of a version being built: index recall against exact search (and the nprobe an
automatically chosen IVF needs), ONNX parity of the pre-rank and re-rank graphs."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import onnxruntime as ort
import torch

from models.layers import Fields
from service.artifacts import ORT_ERRORS
from service.contract.layout import RERANK_ITEMS, RERANK_ONNX
from service.contract.manifest import Manifest
from service.contract.pair_features import PAIR_FEATURES
from service.index_build import ann_recall
from service.contract.layout import RERANK_CHECKPOINT
from training.publish.onnx.retrieval import PARITY_ATOL, PARITY_RTOL
from training.publish.versions import PublishError

log = logging.getLogger(__name__)

# queries per recall estimate while tuning an automatically chosen IVF's nprobe (the recall
# reported is then measured on up to 1000): ~1/4 of the exact-search cost per step
TUNE_QUERIES = 250
# the recall@k an automatically tuned IVF aims for (when min_recall is lower): the cheapest nprobe
# that keeps 95 % of the exact top-k
TUNED_RECALL = 0.95
CHECK_ERRORS: tuple[type[Exception], ...] = (AssertionError, *ORT_ERRORS)  # parity off, or graph fails


def measure_recall(index: faiss.Index, vectors: np.ndarray, queries: np.ndarray, k: int, min_recall: float,
                   tune: bool) -> tuple[float, dict[str, int] | None]:
    """Index recall@k against exact search; with `tune` (an index chosen by size) an IVF's nprobe
    becomes the smallest power-of-two multiple or fraction of its value whose recall reaches
    max(min_recall, TUNED_RECALL), estimated on TUNE_QUERIES queries first (doubled again if the
    full measurement falls short). Returns the recall and {"from", "to"} when nprobe changed.

    Why tune upwards: IVF recall depends on the catalog. When cold-start items (small norms, a
    few dense clusters) outnumber the trained ones, the coarse lists follow the cold items and a
    query's best trained items can spread over many lists: 1k trained + 999k cold items from a
    1-epoch SASRec gave recall@100 0.61 at the default nprobe 64 of 2000 lists, 0.92 at 256.
    Why downwards: nprobe is most of a request's search cost, and lists trained on lifted items
    (service/index_build.py) often reach the target at a few probes (100k items: nprobe 4).
    """
    if not tune or not isinstance(index, faiss.IndexIVF):
        return ann_recall(index, vectors, queries, k=k), None
    target = max(min_recall, TUNED_RECALL)
    start, nlist = int(index.nprobe), int(index.nlist)

    def estimate(nprobe: int) -> float:
        index.nprobe = nprobe
        return ann_recall(index, vectors, queries, k=k, sample=TUNE_QUERIES)

    nprobe = start
    if estimate(nprobe) >= target:
        while nprobe > 1 and estimate(max(nprobe // 2, 1)) >= target:
            nprobe = max(nprobe // 2, 1)
    else:
        while nprobe < nlist and estimate(min(2 * nprobe, nlist)) < target:
            nprobe = min(2 * nprobe, nlist)
        nprobe = min(2 * nprobe, nlist)
    index.nprobe = nprobe
    recall = ann_recall(index, vectors, queries, k=k)
    while recall < target and index.nprobe < nlist:  # the estimate was optimistic
        index.nprobe = min(2 * int(index.nprobe), nlist)
        recall = ann_recall(index, vectors, queries, k=k)
    if index.nprobe == start:
        return recall, None
    log.info("IVF nprobe %d -> %d for recall@%d >= %s", start, index.nprobe, k, target)
    return recall, {"from": start, "to": int(index.nprobe)}


def prerank_parity(model: Any, spec: Any, onnx_path: Path, batch: int = 7, seed: int = 0) -> float:
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
        # same tolerance and reason as the retrieval encoder (training/publish/onnx/retrieval.py)
        np.testing.assert_allclose(got, want, atol=PARITY_ATOL, rtol=PARITY_RTOL)
    except AssertionError as exc:
        raise PublishError(f"{onnx_path.name} does not match the pre-rank checkpoint: {exc}") from None
    return float(np.abs(got - want).max())


def check_rerank(out: Path, model: Any, manifest: Manifest) -> Manifest:
    """The re-rank files of the version being built against the re-ranker; the manifest with the
    re-rank parity, config and item feature width filled in."""
    from training.publish.onnx.rerank import rerank_parity

    assert manifest.rerank is not None and manifest.dims.prerank_user_heads is not None
    feats = np.load(out / RERANK_ITEMS, mmap_mode="r")
    n = manifest.item_count + 1
    serving = manifest.rerank.serving
    pair = len(PAIR_FEATURES) if serving is not None and serving.pair_features else 0  # appended per request
    if pair and (manifest.prerank.serving is None or manifest.prerank.serving.pair_prior is None):
        raise PublishError("the re-ranker reads pair features but the pre-ranker has no pair prior")
    item_dim = model.config.item_dim - pair
    if feats.shape != (n, item_dim):
        raise PublishError(f"{RERANK_ITEMS} has shape {feats.shape}, expected ({n}, {item_dim})")
    layers, heads, _ = manifest.dims.prerank_user_heads
    pv = layers * heads  # one PV column per (layer, user head)
    if model.config.pv_dim not in (0, pv):
        raise PublishError(f"the re-ranker takes pv_dim={model.config.pv_dim} but the pre-ranker gives "
                           f"{pv} (layer, head) interactions")
    try:
        parity = rerank_parity(model, out / RERANK_ONNX)
    except CHECK_ERRORS as exc:
        raise PublishError(f"{RERANK_ONNX} does not match {RERANK_CHECKPOINT}: {exc}") from None
    return manifest.with_(rerank=replace(manifest.rerank, parity_max_abs_diff=parity, config=model.config.to_dict()),
                          dims=replace(manifest.dims, rerank_item_dim=item_dim))
