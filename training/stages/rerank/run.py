"""`recsys train rerank` as a library call: the upstream stages loaded once (open_upstream), then
PRM, PRM-BASE and the pointwise MLP trained on their impressions, saved, exported and reported
(train_rerank).

Files written in the output folder: {prm,prm_base,mlp}.pt (training/checkpoints.py's format),
rerank_items.npy (N + 1, F) item features, rerank_manifest.json (RerankServing: how the service
builds the other inputs) and rerank.onnx (the PRM, checked against eager PyTorch on random and on
real test lists).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from models.cascade import PairPrior
from models.prm import RerankModel
from service.contract.layout import CHECKPOINT_SUFFIX, RERANK_ITEMS, RERANK_MANIFEST
from service.contract.rerank_inputs import RerankServing
from training.checkpoints import load_prerank, load_retrieval, read_checkpoint
from training.data.dataset import Dataset
from training.data.sources import load
from training.data.splits import LeaveOneOut
from training.eval.metrics import evaluate_retrieval
from training.report import timed
from training.stages.rerank import models as rr
from training.stages.rerank.end_to_end import E2E_KS, end_to_end
from training.stages.prerank.data import ranking_split
from training.stages.prerank.upstreams import load_upstreams
from training.stages.rerank.impressions import FoldLists, Impressions, build_impressions, leave_one_out_lists
from training.stages.rerank.sampling import ImpressionConfig
from training.stages.rerank.train import RerankTrainConfig, evaluate_lists, score_lists, unchanged_scores
from training.stages.rerank.upstream import Pipeline
from training.stages.retrieval.train import model_scorer
from training.warm_start import WarmStart, attempt, warm_rerank

log = logging.getLogger(__name__)
Progress = Callable[[str], None]


@dataclass(eq=False)
class Upstream:
    """The stages the re-ranker sits on, loaded and checked once: `served` (the served retriever +
    the pre-ranker) and `lists` (the retriever that makes the training lists: the upstream of a
    ranking fold, training/stages/prerank/folds.py, else the served one), or with a K-fold
    upstream `folds` (one pipeline per fold retriever)."""

    data_spec: str
    ds: Dataset
    loo: LeaveOneOut
    served: Pipeline
    lists: Pipeline
    source: str  # the retriever folder the training lists came from (the manifest's `upstream`)
    holdout: int  # that retriever's ranking fold (0: in-sample lists)
    folds: FoldLists | None = None  # K-fold lists: each user's from their fold's retriever (`lists` = `served`)

    def impression_config(self, cfg: ImpressionConfig, window: int | None = None) -> ImpressionConfig:
        """`cfg` with the re-rank window of H = `window` (default: the upstream's scheme: its holdout,
        or the K-fold window); ValueError for H < 0."""
        if window is not None and window < 0:
            raise ValueError(f"--window must be >= 0, got {window}")
        if window is None and self.folds is not None:
            return replace(cfg, holdout=0, folds=len(self.folds.pipes))
        return replace(cfg, holdout=self.holdout if window is None else window, folds=0)


def open_upstream(data_spec: str, retrieval_dir: str | Path, prerank_dir: str | Path,
                  upstream_dir: str | Path | None = None) -> Upstream:
    """Load the data set and each checkpoint once; FileNotFoundError / DataError / CheckpointError /
    ValueError (a pre-ranker that cannot feed the re-ranker) name the bad input."""
    ds = load(data_spec)
    loo = LeaveOneOut(ds)
    retrieval, _ = load_retrieval(retrieval_dir, ds, data_spec)
    prerank, spec, pre_ckpt = load_prerank(prerank_dir, ds, data_spec)
    served = Pipeline.from_models(ds, loo, retrieval, prerank, spec, pre_ckpt)
    if upstream_dir is None:
        return Upstream(data_spec, ds, loo, served, served, str(retrieval_dir), 0)
    ups = load_upstreams(upstream_dir, ds, data_spec, retrieval)
    if ups.ranking == "kfold":
        pipes = [Pipeline.from_models(ds, loo, m, prerank, spec, pre_ckpt) for m in ups.models]
        return Upstream(data_spec, ds, loo, served, served, str(upstream_dir), 0, FoldLists(pipes, ups.fold_of_user))
    # the route and pair tables of the training lists: the upstream's own rows (prerank/data.py ranking_split)
    lists = Pipeline.from_models(ds, ranking_split(ds, ups.holdout, loo), ups.models[0], prerank, spec, pre_ckpt)
    return Upstream(data_spec, ds, loo, served, lists, str(upstream_dir), ups.holdout)


@dataclass
class RerankRun:
    """What `recsys train rerank` reports: test-list metrics per order ("before" = the pre-rank
    order, then each re-ranker), the same on the validation lists, each fit's history, the eager
    end-to-end table, the export's parity figures and the wall time of each step."""

    config: ImpressionConfig
    impressions: dict[str, Any]
    results: dict[str, dict[str, float]]
    valid: dict[str, dict[str, float]]
    fits: dict[str, Any]
    end_to_end: dict[str, dict[str, float]]
    artifacts: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def train_rerank(up: Upstream, out_dir: str | Path, imp_cfg: ImpressionConfig, hp: rr.RerankerHParams,
                 train_cfg: RerankTrainConfig, *, export: bool = True, progress: Progress | None = None,
                 warm_from: str | Path | None = None, notice: Progress = log.info) -> RerankRun:
    """Impressions from `up.lists` (imp_cfg: see Upstream.impression_config), early stopping on the
    lists the service re-ranks for the leave-one-out validation users (their next item is the
    label), each re-ranker saved; then the serving files and the eager end-to-end table of `up.served`.
    warm_from: a re-rank folder of another data set whose models start these (all three or none;
    the one line saying which goes to `notice`)."""
    out = Path(out_dir)
    timings: dict[str, float] = {}
    with timed("impressions", timings):
        # the training lists come from the upstream retriever (out of sample with a holdout); the
        # exported item features and the end-to-end check use the served one
        imp = build_impressions(up.lists, up.loo, imp_cfg, progress, up.folds)
    with timed("validation lists", timings):
        stop_on = leave_one_out_lists(up.served, up.loo, "valid", imp.pv_stats, imp_cfg)
    results = {"before": evaluate_lists(unchanged_scores(imp.test), imp.test)}
    valid = {"before": evaluate_lists(unchanged_scores(imp.valid), imp.valid)}
    fits: dict[str, Any] = {}
    models: dict[str, RerankModel] = {}
    starts: dict[str, RerankModel] = {}
    warm: dict[str, Any] | None = None
    if warm_from is not None:
        warm, line = attempt("train rerank", warm_from, lambda: _warm_all(warm_from, imp, hp, train_cfg, starts))
        notice(line)
        if "skipped" in warm:
            starts.clear()
    for name in rr.RERANKERS:
        with timed(f"train {name}", timings):
            fit = rr.fit_reranker(name, imp, hp, train_cfg, valid=stop_on, model=starts.get(name))
        models[name] = fit.model
        results[name] = evaluate_lists(score_lists(fit.model, imp.test), imp.test)
        valid[name] = evaluate_lists(score_lists(fit.model, imp.valid), imp.valid)
        fits[name] = fit.describe()
        if progress:
            progress(f"{name}: best epoch {fit.best_epoch}, valid NDCG@10 {fit.best_valid_ndcg10:.4f}, "
                     f"test NDCG@10 {results[name]['NDCG@10']:.4f}")
        rr.save_reranker(out / f"{name}{CHECKPOINT_SUFFIX}", name, fit.model, imp.pv_stats, imp_cfg, up.ds.fingerprint,
                         train=asdict(train_cfg), warm_start=warm)
    artifacts: dict[str, Any] = {}
    with timed("save", timings):
        save_serving_files(out, up, imp, models["prm"])
        if export:
            artifacts = export_served(out, models["prm"], imp)
    with timed("end-to-end", timings):
        e2e = {"retrieval": evaluate_retrieval(model_scorer(up.served.retrieval), up.loo, "test", ks=E2E_KS,
                                               progress=False)}
        e2e.update(end_to_end(up.served, up.loo, models, imp.pv_stats, imp_cfg, progress=progress))
    return RerankRun(imp_cfg, imp.describe(), results, valid, fits, e2e, artifacts, timings)


def _warm_all(folder: str | Path, imp: Impressions, hp: rr.RerankerHParams, train_cfg: RerankTrainConfig,
              starts: dict[str, RerankModel]) -> WarmStart:
    """Each re-ranker's fresh model (as fit_reranker seeds it) started from folder/<name>.pt, into
    `starts`; Incompatible (or a missing file) for any one stops them all."""
    for name in rr.RERANKERS:
        model = rr.new_reranker(name, imp, hp, train_cfg)
        warm_rerank(model, read_checkpoint(Path(folder) / f"{name}{CHECKPOINT_SUFFIX}"))
        starts[name] = model
    return WarmStart()


def save_serving_files(out: Path, up: Upstream, imp: Impressions, model: RerankModel) -> RerankServing:
    """rerank_items.npy (the served pipeline's item features) and rerank_manifest.json."""
    np.save(out / RERANK_ITEMS, up.served.item_feats)
    cfg = imp.config
    serving = RerankServing(imp.pv_stats, num_scores=2 if cfg.retrieval_score else 1, upstream=up.source,
                            holdout=cfg.holdout, list_len=cfg.list_len, config=model.config.to_dict(),
                            pair_features=isinstance(up.served.prior, PairPrior))
    (out / RERANK_MANIFEST).write_text(serving.to_json())
    return serving


def export_served(out: Path, model: RerankModel, imp: Impressions) -> dict[str, Any]:
    """rerank.onnx of `model`, with its parity against eager PyTorch on random and on real test lists."""
    from training.publish.onnx.rerank import export_rerank, list_parity, rerank_parity

    path = export_rerank(model, out)
    return {"onnx": str(path), "parity_max_abs_diff": rerank_parity(model, path),
            "real_lists_max_abs_diff": list_parity(model, path, imp.test)}
