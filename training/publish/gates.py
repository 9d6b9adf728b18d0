"""The quality gates of a version being built, measured on the built artifact.

serving_gate     the stage gate: the version loaded as the service loads it, validation users
                 replayed through every served cut, a stage that hurts switched off, and the
                 served cut against the trivial baselines on the same users (manifest `serving`)
check_regression against the live version: on the same data, the served NDCG@10 recorded in
                 both manifests at most max_regression lower (a live version without a serving
                 block is compared on retrieval's training NDCG@10 (`recsys export`) or on
                 catalog NDCG@10 measured here on both versions (`recsys reindex`,
                 catalog=the split)); on other data (a retrain: the log's events give the data a
                 new fingerprint) both versions replayed here on this version's gate users,
                 paired (live_on_new_data)
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import cast

import numpy as np

from service.artifacts import ORT_ERRORS, session
from service.contract.layout import MANIFEST
from service.contract.manifest import Manifest
from service.contract.stage_blocks import RegressionCheck, Serving
from training.publish.sources import Sources
from training.data.splits import LeaveOneOut, Split
from training.eval.metrics import mask_seen, paired_gain, ranking_metrics, target_ranks
from training.eval.served_eval import STAGE_SE_FACTOR, ServingGate
from training.publish.route_tuning import CrossFit
from training.publish.versions import PublishError

log = logging.getLogger(__name__)

# Offline-metric gate against the live version (DESIGN §5): the new served NDCG@10 (the last
# served cut of the manifest's `serving` block; retrieval's when the live version has no such
# block) may be at most this much (absolute) below the live one, compared only on the same data
# fingerprint. 0.01 is about 2 standard errors of NDCG@10 on ml-100k's 943 users (SE ~0.006).
DEFAULT_MAX_REGRESSION = 0.01
REGRESSION_METRIC = "NDCG@10"
GATE_USERS = 1000  # the first test users of catalog_metrics (fixed, so live and new are measured on the same ones)
# Across data sets the live version's recorded figures were measured on other data, so both versions
# are replayed on this version's gate users (manifest `serving`: split, users, seed) and compared paired,
# with the rule of the stage gate and the baseline gate, which compare per-user NDCG@10 on the same users
# too: refused when mean_u(NDCG@10_u(new) - NDCG@10_u(live)) < -STAGE_SE_FACTOR * paired SE. The absolute
# max_regression (made for recorded means, no per-user figures) is no SE at 100 users and several at 10k.
LIVE_RULE = "new - live >= -paired SE (per-user NDCG@10, both served on this version's data)"
_SCORE_CHUNK = 1 << 25  # scores per chunk in the gate's exact ranking (float32: 128 MiB)


Regression = Callable[[Path, Manifest], tuple[RegressionCheck, Manifest]]
"""(temp version folder, its manifest) -> the manifest's checks.regression entry and the manifest
(reindex adds retrieval.catalog_metrics); raises PublishError when the new version is worse than
the live one beyond the tolerance."""


def serving_gate(tmp: Path, src: Sources, gate: ServingGate, cross: CrossFit | None = None) -> Serving:
    """The manifest's `serving` block: load the temp version as the service does, replay up to
    gate.users validation users through every served cut (training/eval/served_eval.py; with
    `cross`, each user with the route's settings chosen without that user's fold,
    training/publish/route_tuning.py cross_fit_route), switch
    off a stage whose cut is worse than the previous served cut (gate.rule), then replay the
    same users through the trivial baselines (training/eval/gate_baselines.py) and refuse the
    version when the served cut does not beat the best of them by more than the paired SE.

    A switched-off stage is printed on stderr; with gate.require_all_stages it is a PublishError.
    A served cut below the best baseline is a PublishError, or with gate.allow_below_baseline a
    banner on stderr and `serving.baselines.allowed_below` in the manifest.
    """
    from service.artifacts import ArtifactError, load_version
    from training.eval import gate_baselines as gb
    from training.eval import served_eval as se

    try:
        version = load_version(tmp)
    except ArtifactError as exc:
        raise PublishError(f"the new version does not load: {exc}") from None
    users = se.select_users(src.loo, gate.users, gate.seed)
    routes = None if cross is None or version.item2item is None else cross.route_folds(version.item2item)
    ev = se.evaluate_served(version, src.ds, src.loo, "valid", users, progress=sys.stderr.isatty(), routes=routes)
    choice = se.choose_stages(ev, gate.tolerance)
    bl = gb.evaluate_baselines(version, src.ds, src.loo, "valid", users)
    verdict = gb.baseline_verdict(ev, bl, choice.stages[-1])
    folds = "" if routes is None else f"; route settings cross-fitted over {len(routes.routes)} folds"
    print(f"served cuts and baselines, {ev.users} validation users (* = served; stage rule {gate.rule}{folds}):\n"
          f"{se.cut_table(ev.cuts, served=choice.stages, baselines=bl.rows)}\n{verdict.line(ev.users, ev.split)}",
          file=sys.stderr)
    banner = "!" * 78
    if choice.switched_off:
        off = ", ".join(choice.switched_off)
        if gate.require_all_stages:
            raise PublishError(f"--require-all-stages: the stage gate switched off {off}: {choice.reason}")
        print(f"{banner}\nSTAGE GATE: {off} SWITCHED OFF for version {version.version}; it serves "
              f"{' -> '.join(choice.stages)}.\n{choice.reason}\n{banner}", file=sys.stderr)
        log.warning("stage gate: %s switched off for %s (%s)", off, version.version, choice.reason)
    if not verdict.beats:
        if not gate.allow_below_baseline:
            raise PublishError(f"below baseline: {verdict.line(ev.users, ev.split)}; "
                               "--allow-below-baseline publishes it anyway")
        print(f"{banner}\nBELOW BASELINE: version {version.version} is published with --allow-below-baseline.\n"
              f"{verdict.line(ev.users, ev.split)}\n{banner}", file=sys.stderr)
        log.warning("baseline gate: %s published below baseline (%s)", version.version,
                    verdict.line(ev.users, ev.split))
    return se.serving_block(ev, choice, gate.tolerance, gate.seed,
                            baselines=gb.baselines_block(bl, verdict, gate.allow_below_baseline),
                            route_folds=None if routes is None else len(routes.routes))


def served_comparison(old: Manifest, new: Manifest) -> tuple[str, float, float] | None:
    """(what is compared, live value, new value) of the served NDCG@10 (each version's last served
    cut) when both manifests record one on the same split; None otherwise."""
    from training.eval.served_eval import served_metric

    before, after = served_metric(old), served_metric(new)
    if before is None or after is None or old.serving is None or new.serving is None:
        return None
    if old.serving.split != new.serving.split:
        return None
    return f"served {REGRESSION_METRIC} ({'+'.join(new.serving.stages or [])})", before, after


def catalog_metrics(folder: Path, loo: LeaveOneOut, users: np.ndarray,
                    manifest: Manifest | None = None) -> dict[str, float]:
    """HR@10 / NDCG@10 of the test item under full ranking over the version's whole catalog:
    its retrieval.onnx encodes the histories, max over launchers of the inner products with its
    items.npy, the user's history removed. Item indices of the data set must be the version's.
    `manifest`: the folder's, when not yet written."""
    m = manifest if manifest is not None else Manifest.load(folder / MANIFEST)
    items = np.load(folder / m.files.name("items"))  # (N, D)
    enc = session(folder / m.files.name("retrieval_onnx"))
    q = enc.run(None, {"item_seq": loo.histories("test", users, maxlen=m.dims.maxlen)})[0]  # (B, M, D)
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


def live_on_new_data(root: Path, live: str, tmp: Path, manifest: Manifest, src: Sources,
                     entry: RegressionCheck) -> RegressionCheck:
    """The live version (root/live, built on other data) and the new one (tmp, its manifest with
    the stage gate's `serving`) replayed through their served cuts on the same validation users of
    the new data set `src` (the stage gate's: serving.split / users / seed). The live version serves
    any user from their history; items it does not know are skipped in the history and never
    recommended (a target it does not know is its miss). Raises PublishError when the new served
    NDCG@10 is worse than the live one's by more than STAGE_SE_FACTOR paired SEs (LIVE_RULE);
    a live version that does not load or replay is recorded as skipped."""
    from service.artifacts import ArtifactError, load_version
    from service.pipeline import served_stages
    from training.eval import served_eval as se

    serving = manifest.serving
    if serving is None or not serving.stages or serving.users is None:
        return replace(entry, result="skipped: the live version was built on other data and this version has "
                                     "no serving block to compare on")
    split = cast(Split, serving.split or "valid")
    users = se.select_users(src.loo, serving.users, serving.seed or 0)
    new_cut = tuple(serving.stages)
    try:
        old = load_version(root / live)
        old_cut = served_stages(old)
        before = se.evaluate_served(old, src.ds, src.loo, split, users, cuts=[old_cut], progress=False,
                                    other_data=True).ndcg[old_cut[-1]]
    except (ArtifactError, OSError, KeyError, ValueError) + ORT_ERRORS as exc:
        return replace(entry, result=f"skipped: the live version does not replay on this data ({exc})")
    try:
        version = load_version(tmp)
    except ArtifactError as exc:
        raise PublishError(f"the new version does not load: {exc}") from None
    # the new version's route settings were chosen on these users: replayed cross-fitted, as its stage gate did
    cross = CrossFit.recorded(manifest)
    routes = None if cross is None or version.item2item is None else cross.route_folds(version.item2item)
    after = se.evaluate_served(version, src.ds, src.loo, split, users, cuts=[new_cut], progress=False,
                               routes=routes).ndcg[new_cut[-1]]
    gain, paired_se = paired_gain(after, before)
    entry = replace(entry, metric=REGRESSION_METRIC,
                    compared=f"served {REGRESSION_METRIC} on this version's data (new {'+'.join(new_cut)}, "
                             f"live {'+'.join(old_cut)})",
                    live=float(before.mean()), new=float(after.mean()), users=int(users.size), split=split,
                    paired_se=paired_se, rule=LIVE_RULE)
    if gain < -STAGE_SE_FACTOR * paired_se:
        raise PublishError(f"worse than the live version: {live_line(entry)}")
    entry = replace(entry, result="passed")
    print(f"live version: {live_line(entry)}", file=sys.stderr)
    return entry


def live_line(entry: RegressionCheck) -> str:
    """One sentence with both figures, their difference and its paired SE (a cross-data entry)."""
    new, live, se_ = entry.new or 0.0, entry.live or 0.0, entry.paired_se or 0.0
    verb = "is worse than" if new - live < -STAGE_SE_FACTOR * se_ else "is not worse than"
    return (f"{entry.compared}: new {new:.4f} {verb} the live version {entry.live_version} ({live:.4f}) by more "
            f"than its paired SE: new - live = {new - live:+.4f}, paired SE {se_:.4f} ({entry.users} {entry.split} "
            "users)")


def regression_line(entry: RegressionCheck) -> str:
    """The manifest's checks.regression as one line (`recsys export` / `recsys evaluate --artifacts`)."""
    what = entry.compared if entry.compared is not None else entry.metric
    if entry.paired_se is not None:
        return f"regression check vs live {entry.live_version}: {entry.result}: {live_line(entry)}"
    figures = (f" (new {entry.new:.4f}, live {entry.live:.4f}, max drop {entry.max_regression})"
               if entry.new is not None and entry.live is not None else "")
    return f"regression check ({what} vs live {entry.live_version}): {entry.result}{figures}"


def check_regression(root: Path, live: str | None, tmp: Path, manifest: Manifest,
                     max_regression: float | None, catalog: LeaveOneOut | None = None,
                     src: Sources | None = None) -> tuple[RegressionCheck, Manifest]:
    """The manifest's checks.regression entry: the new version's served NDCG@10 against the live
    version's (both manifests' `serving`, set by the stage gate before this runs); raises
    PublishError when it is more than max_regression lower.

    When the live version has no serving block the fallback differs, and `catalog` says which:
    None (`recsys export`): the retrieval NDCG@10 both checkpoints recorded in training;
    the data set's split (`recsys reindex`): catalog NDCG@10 of both versions' built artifacts,
    measured here on the same test users (catalog_metrics), the new one recorded in the manifest
    (retrieval.catalog_metrics, in the manifest returned) either way. The entry keeps each
    command's keys and wording.

    A live version built on other data is compared on this version's data `src` (live_on_new_data:
    paired, on the stage gate's validation users); without `src` it is recorded as skipped.
    """
    entry = RegressionCheck(metric=REGRESSION_METRIC if catalog is None else f"catalog {REGRESSION_METRIC}",
                            max_regression=max_regression, live_version=live)
    if catalog is not None:
        users = np.arange(min(GATE_USERS, catalog.eval_users.size))
        new = catalog_metrics(tmp, catalog, users, manifest)
        manifest = manifest.with_(retrieval=replace(manifest.retrieval,
                                                    catalog_metrics={**new, "users": int(users.size)}))
    if max_regression is None or live is None:
        return replace(entry, result="skipped: " + ("gate off" if max_regression is None else "no live version")), manifest
    # export reads only the live manifest; reindex also runs the live version's artifacts
    errors: tuple[type[Exception], ...] = ((OSError, ValueError) if catalog is None
                                           else (OSError, KeyError, ValueError, *ORT_ERRORS))
    try:
        old = Manifest.load(root / live / MANIFEST)
        if old.data.fingerprint != manifest.data.fingerprint:
            if src is None:
                return replace(entry, result="skipped: the live version was built on other data"), manifest
            return live_on_new_data(root, live, tmp, manifest, src, entry), manifest
        served = served_comparison(old, manifest)
        if served is None and catalog is not None:
            old_catalog = catalog_metrics(root / live, catalog, users, old)
    except errors as exc:
        why = "live manifest unreadable" if catalog is None else "the live version does not load"
        return replace(entry, result=f"skipped: {why} ({exc})"), manifest
    if catalog is None:
        what, before, after = served or (
            f"retrieval {REGRESSION_METRIC}", old.retrieval.metrics.get(REGRESSION_METRIC),
            manifest.retrieval.metrics.get(REGRESSION_METRIC))
        entry = replace(entry, compared=what)
        if before is None or after is None:
            return replace(entry, result=f"skipped: {REGRESSION_METRIC} not recorded"), manifest
        users_note, n = "", None
    else:
        if served is not None:
            assert manifest.serving is not None  # served_comparison found it
            what, before, after = served
            n, split = manifest.serving.users, manifest.serving.split
        else:
            what, before, after = entry.metric or "", old_catalog[REGRESSION_METRIC], new[REGRESSION_METRIC]
            n, split = int(users.size), "test"
        entry = replace(entry, metric=what)
        users_note = f" ({n} {split} users)"
    if after < before - max_regression:
        raise PublishError(f"{what} {after:.4f} is worse than the live version {live} "
                           f"({before:.4f}) by more than {max_regression}{users_note}")
    return replace(entry, result="passed", live=before, new=after, users=None if n is None else int(n)), manifest
