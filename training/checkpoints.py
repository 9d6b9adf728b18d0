"""The checkpoints a version is built from: loaded once, each checked against the data set
(load_sources), and the item arrays training exported checked against them (check_upstream)."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.sasrec import MultiLauncherSASRec
from training.stages.prerank import train as pr
from training.stages.retrieval import train as rt
from training.data.dataset import DataError, Dataset
from training.data.sources import load
from training.data.splits import LeaveOneOut
from training.data.features import FeatureSpec
from training.publish.versions import PublishError

RERANK_CHECKPOINT = "prm.pt"
RERANK_FILES = ("rerank.onnx", "rerank_items.npy", "rerank_manifest.json")
PRERANK_FILES = (pr.USER_ONNX, pr.ITEMS_NPY, pr.MANIFEST, pr.FEATURES)
# Item heads / re-rank features recomputed here from the checkpoints must equal the files the
# training command exported: same float32 ops on the same weights, so only summation-order
# rounding (~1e-6 on z-scored O(1) values) separates them; 1e-4 still catches another model.
UPSTREAM_ATOL = 1e-4


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


def load_sources(data_spec: str, retrieval_dir: str | Path, prerank_dir: str | Path,
                 rerank_dir: str | Path | None) -> Sources:
    """Load the data set and the checkpoints; FileNotFoundError for a missing file, DataError
    for a checkpoint of another data set, PublishError for an unreadable checkpoint."""
    ret_dir, pre_dir = Path(retrieval_dir), Path(prerank_dir)
    re_dir = Path(rerank_dir) if rerank_dir is not None else None
    require_file(ret_dir / rt.CHECKPOINT, "retrieval")
    for name in (pr.CHECKPOINT, *PRERANK_FILES):
        require_file(pre_dir / name, "pre-rank")
    if re_dir is not None:
        for name in (RERANK_CHECKPOINT, *RERANK_FILES):
            require_file(re_dir / name, "re-rank")

    ds = load(data_spec)
    retrieval, payload = load_checked_checkpoint(rt.load_checkpoint, ret_dir / rt.CHECKPOINT, ret_dir)
    check_data("retrieval", ret_dir, payload.get("fingerprint"), ds)
    if retrieval.config.num_items != ds.num_items:
        raise DataError(f"{ret_dir}: retrieval checkpoint has {retrieval.config.num_items} items, "
                        f"the data set {ds.num_items}")
    prerank, spec, pre_ckpt = load_checked_checkpoint(pr.load_checkpoint, pre_dir / pr.CHECKPOINT, pre_dir)
    check_data("pre-rank", pre_dir, pre_ckpt.get("fingerprint"), ds)
    src = Sources(data_spec, ds, LeaveOneOut(ds), ret_dir, pre_dir, re_dir, retrieval, payload, prerank, spec,
                  pre_ckpt)
    if re_dir is not None:
        from training.stages.rerank.models import load_reranker

        path = re_dir / RERANK_CHECKPOINT
        src.rerank, src.rerank_ckpt = load_checked_checkpoint(load_reranker, path, path)
        check_data("re-rank", re_dir, src.rerank_ckpt.get("fingerprint"), ds)
    return src


def check_upstream(src: Sources) -> Any:
    """The pre-rank item heads (and re-rank item features) that training exported come from these
    checkpoints. Returns the training.stages.rerank.impressions.Pipeline that recomputed them.

    Recomputed as Pipeline does; only for the next-item pre-ranker, whose catalog features need
    no labels (a CTR pre-ranker cannot feed the re-ranker anyway): None for a CTR pre-ranker.
    """
    if src.pre_ckpt.get("objective") not in (None, "next-item"):
        if src.re_dir is not None:
            raise PublishError(f"{src.pre_dir}: the re-ranker needs a next-item pre-ranker, "
                               f"this one was trained on {src.pre_ckpt['objective']!r}")
        return None
    from training.stages.rerank.impressions import Pipeline

    pipe = Pipeline.from_models(src.ds, src.loo, src.retrieval, src.prerank, src.spec, src.pre_ckpt, src.pre_dir)
    heads, want = np.load(src.pre_dir / pr.ITEMS_NPY), pipe.item_heads.numpy()
    if heads.shape != want.shape or not np.allclose(heads[1:], want[1:], atol=UPSTREAM_ATOL):
        raise PublishError(f"{src.pre_dir / pr.ITEMS_NPY} was not exported from {src.pre_dir / pr.CHECKPOINT}")
    if src.re_dir is not None:
        feats = np.load(src.re_dir / RERANK_FILES[1])
        if feats.shape != pipe.item_feats.shape or not np.allclose(feats, pipe.item_feats, atol=UPSTREAM_ATOL):
            raise PublishError(f"{src.re_dir}: the re-ranker was trained on other retrieval / pre-rank checkpoints "
                               f"(its rerank_items.npy differs from the features of {src.ret_dir} + {src.pre_dir})")
    return pipe


def load_checked_checkpoint(loader: Any, path: Path, arg: Path) -> Any:
    """loader(arg), with an unreadable or mismatched file reported as a PublishError naming `path`."""
    try:
        return loader(arg)
    except (pickle.UnpicklingError, EOFError, OSError, RuntimeError, KeyError, TypeError, ValueError) as exc:
        # torch.load on a truncated / foreign file, or a state dict that does not fit the config
        raise PublishError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None


def require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent}: no {what} {path.name} there")


def check_data(what: str, path: Path, fingerprint: str | None, ds: Dataset) -> None:
    if fingerprint is None:
        raise DataError(f"{path}: the {what} checkpoint records no data fingerprint")
    if fingerprint != ds.fingerprint:
        raise DataError(f"{path}: the {what} checkpoint was trained on another data set "
                        f"(fingerprint {fingerprint}, data {ds.fingerprint})")
