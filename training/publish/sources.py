"""The checkpoints a version is built from (`recsys export` / `recsys reindex`): the data set and
the three stages' checkpoints, each loaded and checked once (load_sources, through
training/checkpoints.py), and the item arrays training exported checked against them (check_upstream)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.prm import RerankModel
from service.contract.layout import (
    PRERANK_CHECKPOINT,
    PRERANK_FEATURES,
    PRERANK_ITEMS,
    PRERANK_MANIFEST,
    PRERANK_USER_ONNX,
    RERANK_CHECKPOINT,
    RERANK_ITEMS,
    RERANK_MANIFEST,
    RERANK_ONNX,
    RETRIEVAL_CHECKPOINT,
)
from training.checkpoints import Checkpoint, CheckpointError, RetrievalModel, load_prerank, load_reranker, load_retrieval
from training.data.dataset import Dataset
from training.data.features import FeatureSpec
from training.data.sources import load
from training.data.splits import LeaveOneOut
from training.publish.versions import PublishError
from training.stages.rerank.upstream import Pipeline

PRERANK_FILES = (PRERANK_CHECKPOINT, PRERANK_USER_ONNX, PRERANK_ITEMS, PRERANK_MANIFEST, PRERANK_FEATURES)
RERANK_FILES = (RERANK_CHECKPOINT, RERANK_ONNX, RERANK_ITEMS, RERANK_MANIFEST)
# Item heads / re-rank features recomputed here from the checkpoints must equal the files the
# training command exported: same float32 ops on the same weights, so only summation-order
# rounding (~1e-6 on z-scored O(1) values) separates them; 1e-4 still catches another model.
UPSTREAM_ATOL = 1e-4


@dataclass(eq=False)
class Sources:
    """One data set and the checkpoints trained on it, loaded and checked once (load_sources)."""

    data_spec: str
    ds: Dataset
    loo: LeaveOneOut
    ret_dir: Path
    pre_dir: Path
    re_dir: Path | None
    retrieval: RetrievalModel
    ret_ckpt: Checkpoint
    prerank: Any  # a pre-rank tower (IntTower, TwoTower, DCN-v2)
    spec: FeatureSpec
    pre_ckpt: Checkpoint
    rerank: RerankModel | None = None
    rerank_ckpt: Checkpoint | None = None

    @property
    def checkpoints(self) -> list[Path]:
        """The checkpoint files (their bytes go into the default version name)."""
        paths = [self.ret_ckpt.path, self.pre_ckpt.path]
        return paths + ([self.rerank_ckpt.path] if self.rerank_ckpt is not None else [])


def load_sources(data_spec: str, retrieval_dir: str | Path, prerank_dir: str | Path,
                 rerank_dir: str | Path | None) -> Sources:
    """Load the data set and the checkpoints; FileNotFoundError for a missing file, DataError
    for a checkpoint of another data set, PublishError for an unreadable checkpoint."""
    ret_dir, pre_dir = Path(retrieval_dir), Path(prerank_dir)
    re_dir = Path(rerank_dir) if rerank_dir is not None else None
    require_file(ret_dir / RETRIEVAL_CHECKPOINT, "retrieval")
    for name in PRERANK_FILES:
        require_file(pre_dir / name, "pre-rank")
    if re_dir is not None:
        for name in RERANK_FILES:
            require_file(re_dir / name, "re-rank")

    ds = load(data_spec)
    try:
        retrieval, ret_ckpt = load_retrieval(ret_dir, ds, data_spec)
        prerank, spec, pre_ckpt = load_prerank(pre_dir, ds, data_spec)
        rerank = load_reranker(re_dir / RERANK_CHECKPOINT, ds, data_spec) if re_dir is not None else None
    except CheckpointError as exc:  # an export that cannot read its input: exit 1, as the other publish checks
        raise PublishError(str(exc)) from None
    src = Sources(data_spec, ds, LeaveOneOut(ds), ret_dir, pre_dir, re_dir, retrieval, ret_ckpt, prerank, spec,
                  pre_ckpt)
    if rerank is not None:
        src.rerank, src.rerank_ckpt = rerank
    return src


def check_upstream(src: Sources) -> Pipeline | None:
    """The pre-rank item heads (and re-rank item features) that training exported come from these
    checkpoints. Returns the training.stages.rerank.upstream.Pipeline that recomputed them.

    Recomputed as Pipeline does; only for the next-item pre-ranker, whose catalog features need
    no labels (a CTR pre-ranker cannot feed the re-ranker anyway): None for a CTR pre-ranker.
    """
    objective = src.pre_ckpt.extra.get("objective")
    if objective not in (None, "next-item"):
        if src.re_dir is not None:
            raise PublishError(f"{src.pre_dir}: the re-ranker needs a next-item pre-ranker, "
                               f"this one was trained on {objective!r}")
        return None
    pipe = Pipeline.from_models(src.ds, src.loo, src.retrieval, src.prerank, src.spec, src.pre_ckpt)
    heads, want = np.load(src.pre_dir / PRERANK_ITEMS), pipe.item_heads.numpy()
    if heads.shape != want.shape or not np.allclose(heads[1:], want[1:], atol=UPSTREAM_ATOL):
        raise PublishError(f"{src.pre_dir / PRERANK_ITEMS} was not exported from {src.pre_ckpt.path}")
    if src.re_dir is not None:
        feats = np.load(src.re_dir / RERANK_ITEMS)
        if feats.shape != pipe.item_feats.shape or not np.allclose(feats, pipe.item_feats, atol=UPSTREAM_ATOL):
            raise PublishError(f"{src.re_dir}: the re-ranker was trained on other retrieval / pre-rank checkpoints "
                               f"(its {RERANK_ITEMS} differs from the features of {src.ret_dir} + {src.pre_dir})")
    return pipe


def require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent}: no {what} {path.name} there")
