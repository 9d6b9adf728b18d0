"""The Publisher of one artifacts root: what `recsys export`, `recsys reindex` and `recsys rollback`
do to it, with every step's wall time kept.

    load     the data set and the checkpoints, each loaded once and checked against the data set,
             and the item arrays training exported recomputed from them (training/checkpoints.py);
             the recomputation (training.stages.rerank.upstream.Pipeline) is kept as `upstream`, so reindex
             takes the data set's items' pre-rank heads from it instead of computing them again
    publish  the item side -> catalog, retrieval.onnx + parity, items.npy, index + recall,
             pre-rank / re-rank files + parity -> the item-to-item route's request settings
             (training/publish/route_tuning.py) -> the stage gate and the regression gate against
             the live version (training/publish/gates.py) -> load + smoke run -> rename -> CURRENT
             (training/artifacts.publish_items)
    rollback CURRENT back to an older version once it loads and passes a smoke run

Export is a publish of the data set's items (artifacts.dataset_items); reindex
(training/publish/reindex.py) a publish of a grown catalog (training/publish/item_side.py). `timings` holds
each step's seconds (load, catalog, embeddings, onnx, index, recall, prerank, gate, served, write,
prune, rollback); each is also printed on stderr as `[step] 1.23s` (training/report.timed), and
the export / reindex commands print them as one `timings:` line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.contract.manifest import Manifest
from service.contract.stage_blocks import RegressionCheck
from service.index_build import IndexSpec
from training.stages.retrieval import item2item as i2i
from training.publish.build import DEFAULT_MIN_RECALL, ItemSide, PublishResult, check_gates, dataset_items, publish_items
from training.publish.sources import Sources, check_upstream, load_sources
from training.data.splits import LeaveOneOut
from training.publish.gates import DEFAULT_MAX_REGRESSION, check_regression
from training.report import timed
from training.eval.served_eval import ServingGate
from training.publish.versions import RollbackResult, default_version, read_current, rollback


class Publisher:
    """Builds, checks and publishes versions into `root` (see the module doc)."""

    def __init__(self, root: str | Path, min_recall: float = DEFAULT_MIN_RECALL,
                 max_regression: float | None = DEFAULT_MAX_REGRESSION, index_spec: IndexSpec | None = None,
                 gate: ServingGate = ServingGate(), timings: dict[str, float] | None = None) -> None:
        """ValueError for a gate threshold out of range (check_gates)."""
        check_gates(min_recall, max_regression)
        self.root = Path(root)
        self.min_recall, self.max_regression = min_recall, max_regression
        self.index_spec, self.gate = index_spec, gate
        self.timings: dict[str, float] = {} if timings is None else timings
        self.upstream: Any = None  # training.stages.rerank.upstream.Pipeline of the loaded checkpoints (None: CTR pre-ranker)

    def load(self, data_spec: str, retrieval_dir: str | Path, prerank_dir: str | Path,
             rerank_dir: str | Path | None) -> Sources:
        """The data set and the checkpoints, each loaded once and checked (load_sources,
        check_upstream); FileNotFoundError / DataError / PublishError as load_sources says. The
        root exists once the checkpoints have loaded."""
        with timed("load", self.timings):
            src = load_sources(data_spec, retrieval_dir, prerank_dir, rerank_dir)
            self.root.mkdir(parents=True, exist_ok=True)
            self.upstream = check_upstream(src)
        return src

    def publish(self, src: Sources, items: ItemSide, version: str, *, live: str | None = None,
                catalog: LeaveOneOut | None = None) -> PublishResult:
        """Build, check and publish `items` as `version`, then make it CURRENT (publish_items).

        The regression gate compares with `live` (read by a caller that holds the artifacts lock)
        on catalog NDCG@10 of `catalog`'s test users when the live version has no serving block
        (reindex); with catalog=None (export) it compares with CURRENT as the gate runs, on the
        checkpoints' training NDCG@10 (training/gates.check_regression). A live version built on
        other data (a retrain) is replayed on `src`'s validation users beside the new one, paired.
        """
        def regression(tmp: Path, manifest: Manifest) -> tuple[RegressionCheck, Manifest]:
            current = read_current(self.root) if catalog is None else live
            return check_regression(self.root, current, tmp, manifest, self.max_regression, catalog, src)

        return publish_items(src, items, self.root, version, self.min_recall, self.index_spec, regression,
                             self.timings, self.gate)

    def export(self, data_spec: str, retrieval_dir: str | Path, prerank_dir: str | Path,
               rerank_dir: str | Path | None, version: str | None = None,
               item2item: i2i.Item2ItemConfig | None = i2i.Item2ItemConfig()) -> PublishResult:
        """`recsys export`: publish the data set's items from trained checkpoints, with the
        item-to-item route's table built with `item2item` (None: no route)."""
        src = self.load(data_spec, retrieval_dir, prerank_dir, rerank_dir)
        version = version or default_version(src.ds.fingerprint, src.checkpoints)
        with timed("arrays", self.timings):
            items = dataset_items(src, item2item)
        return self.publish(src, items, version)

    def rollback(self, to: str | None = None, redis_url: str | None = None) -> RollbackResult:
        """`recsys rollback`: CURRENT back to `to` (default: the version before the live one)."""
        with timed("rollback", self.timings):
            return rollback(self.root, to, redis_url)


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
    item2item: i2i.Item2ItemConfig | None = i2i.Item2ItemConfig(),
) -> PublishResult:
    """Build, check and publish a version (now CURRENT); fills `timings` with each step's seconds.

    Checks: ONNX parity of the three graphs against their checkpoints, index recall@100 (k
    capped at N) >= min_recall, the exported pre-rank item heads and re-rank item features
    recomputed from these checkpoints, the stage gate on validation users (`gate`: a stage
    worse than the previous served cut by more than its paired SE, or an absolute tolerance, is
    switched off, or refused with require_all_stages; a served cut that does not beat the best
    trivial baseline by more than the paired SE is refused unless allow_below_baseline), served NDCG@10 at most max_regression below the live version's (same
    data only; None turns that check off), and a load + smoke run through service.artifacts.
    item2item: build the item-to-item route's table with these settings (default: the defaults of
    training/stages/retrieval/item2item.py; None: no route); its request settings are then chosen on
    the gate's validation users (training/publish/route_tuning.py).
    index_spec=None picks the kind from the catalog size (service.index) and, for IVF, the
    smallest doubling of nprobe that reaches min_recall.

    Raises FileNotFoundError for a missing checkpoint folder, DataError when a checkpoint was
    trained on another data set, ValueError for a bad argument and PublishError when a
    check fails. On any error the temp folder is removed and CURRENT is unchanged.
    """
    publisher = Publisher(artifacts_root, min_recall, max_regression, index_spec, gate, timings)
    return publisher.export(data_spec, retrieval_dir, prerank_dir, rerank_dir, version, item2item)
