"""The item-to-item route's request settings, chosen per version at publish (issue 22).

The route's table is built from the version's training part (training/stages/retrieval/item2item.py);
how much it should weigh against the encoder (beta), how many recent items it reads (recent,
decay) and how many candidates it adds (candidates) depend on the data and on how well that
version's encoder was trained, so they are measured on the version itself, not fixed once:

    for settings s in GRID (coordinate search, below):
        NDCG@10(s) = the served retrieval cut, service.pipeline.Recommender(version with the
                     route's settings replaced by s, stages=("retrieval",)), replayed over the
                     validation users the stage gate uses (served_eval.select_users, gate.users,
                     gate.seed), each user's whole history removed as the service does
    chosen = argmax NDCG@10; ties -> the cheaper setting: the smaller beta, then the fewer
             candidates, the fewer recent items, then no decay (the larger decay)

beta = 0 orders the retrieval cut by the encoder alone (with an exact index, FAISS's own top-10),
so the route must earn its weight on the version's own validation users. The chosen settings go
into the manifest's item2item.serving; item2item.tuning records the grid, every setting tried
with its NDCG@10, the users and the seed. The stage gate (training/publish/gates.serving_gate)
then runs with the chosen settings.

Coordinate search: from START, sweep one setting at a time over its GRID values with the others
fixed and move to the best, until no single setting improves on it (at most MAX_PASSES passes).
Typically 10 to 25 of the 84 settings are measured, each measured once; each costs one retrieval
request per validation user, the encoder run once per user for the whole grid (its output does
not depend on the route's settings).

Cross-fitting for the stage gate (`cross_fit_route`): the gate replays the validation users the
settings were chosen on here. (Settings the pre-ranker's lists were made with are served as they
are: chosen on the ranking fold's lists, not on these users, training/stages/prerank/lists.py.)
On those users the merged retrieval cut is the best of the
10 to 25 settings measured, so its NDCG@10 is biased upward against the later cuts it is
compared with, and the gate can switch off a pre-ranker that helps on new users (issue 22:
ml-100k seed 0, validation users prerank - retrieval -0.0054, paired SE 0.0045; test users
+0.0045). So the gate's users are dealt into GATE_FOLDS folds (folds.assign_folds, seeded with
the gate's seed) and each fold's users are replayed with the settings the same search chooses on
the other folds' users only: every cut is then measured on users its settings were not chosen
on. The version still serves the settings chosen on all of them; the folds' settings are
recorded in item2item.tuning.cross_fit. Cost: each distinct setting the folds' searches measure
is replayed once over all the gate's users (UserGains), the encoder run once per user.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnxruntime as ort

from service.artifacts import LoadedVersion
from service.contract.manifest import STAGES, Manifest
from service.pipeline import Recommender
from training.data.dataset import Dataset
from training.data.splits import LeaveOneOut, Split
from service.item2item import Item2ItemRoute
from training.eval.served_eval import METRIC, RETRIEVAL_K, RouteFolds, ServingGate, select_users, served_requests
from training.publish.sources import Sources
from training.publish.versions import PublishError
from training.stages.prerank.folds import assign_folds
from training.stages.retrieval.route_search import (  # noqa: F401  (GRID, ORDER, ... are this module's too)
    GRID,
    MAX_PASSES,
    ORDER,
    START,
    TOP,
    Measure,
    Setting,
    check_grid,
    coordinate_search,
)

# Folds of the gate's users for the cross-fitted settings (module doc). 5, as the pair prior's check
# (training/stages/prerank/train.py PRIOR_FOLDS): each fold's settings are chosen on 4/5 of the users,
# close to the search the version's own settings come from; with 2 each would see half of them.
GATE_FOLDS = 5


@dataclass(frozen=True)
class RouteTuning:
    """What the tuning chose (`serving`: the manifest's item2item.serving) and its record."""

    serving: Setting
    tried: list[dict[str, float]]  # each setting measured, in order, with its NDCG@10
    users: int
    seed: int
    split: str
    grid: dict[str, tuple[float, ...]]
    seconds: float  # wall time of the search

    def record(self) -> dict[str, Any]:
        """The manifest's item2item.tuning."""
        return {"metric": METRIC, "cut": STAGES[0], "split": self.split, "users": self.users, "seed": self.seed,
                "search": "coordinate", "grid": {k: list(v) for k, v in self.grid.items()},
                "chosen": dict(self.serving), "tried": self.tried, "seconds": round(self.seconds, 2)}


class _EncodeOnce:
    """The version's retrieval session, each distinct item_seq run once (the grid replays the
    same histories once per setting; the user vectors (1, M, D) do not depend on the route)."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.seen: dict[bytes, list[Any]] = {}

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[Any]:
        seq = np.ascontiguousarray(feeds["item_seq"])
        key = f"{seq.shape}{output_names}".encode() + seq.tobytes()
        if key not in self.seen:
            self.seen[key] = self.session.run(output_names, feeds)
        return self.seen[key]


class UserGains:
    """Each validation user's NDCG@10 on the served retrieval cut of `version` with the route's
    settings replaced, each setting replayed once over all `users` (positions into
    loo.eval_users) and kept: the cross-fit's searches measure mostly the same settings on
    overlapping users, so each costs only the settings no earlier search measured."""

    def __init__(self, version: LoadedVersion, ds: Dataset, loo: LeaveOneOut, users: np.ndarray,
                 split: Split = "valid") -> None:
        if version.item2item is None:
            raise ValueError(f"version {version.version} has no item-to-item route to tune")
        self.version, self.route, self.split = version, version.item2item, split
        self.histories, self.targets = served_requests(ds, loo, users, split)
        self.session = cast(ort.InferenceSession, _EncodeOnce(version.retrieval))
        self.seen: dict[tuple[float, ...], np.ndarray] = {}

    def __call__(self, s: Setting) -> np.ndarray:
        """(U,) NDCG@10 of each user's target in the retrieval cut served with settings `s`."""
        key = tuple(float(s[k]) for k in ORDER)
        if key not in self.seen:
            rec = Recommender(replace(self.version, item2item=self.route.with_serving(s), retrieval=self.session),
                              retrieval_k=RETRIEVAL_K, stages=STAGES[:1])
            gains = np.zeros(len(self.histories))
            for u, (history, target) in enumerate(zip(self.histories, self.targets)):
                got = [it.item_id for it in rec.recommend(history, k=TOP, explain=False).items]
                if target in got:
                    gains[u] = 1.0 / np.log2(got.index(target) + 2.0)
            self.seen[key] = gains
        return self.seen[key]

    def measure(self, rows: np.ndarray | None = None) -> Measure:
        """The Measure the search maximises: mean NDCG@10 over the users at `rows` (default all)."""
        return lambda s: float(self(s)[slice(None) if rows is None else rows].mean()) if self.targets else 0.0


def served_retrieval_ndcg(version: LoadedVersion, ds: Dataset, loo: LeaveOneOut, users: np.ndarray,
                          split: Split = "valid") -> Measure:
    """A Measure over the served retrieval cut: each call builds a Recommender on `version` with
    the route's settings replaced and replays `users` (positions into loo.eval_users) on `split`."""
    return UserGains(version, ds, loo, users, split).measure()


def tune_route(gains: UserGains, seed: int, grid: Mapping[str, Sequence[float]] = GRID,
               rows: np.ndarray | None = None) -> RouteTuning:
    """Choose the route's request settings of `gains`' version on its users (see the module doc),
    or on those at `rows` only (a boolean mask or positions into them)."""
    t0 = time.perf_counter()
    best, tried = coordinate_search(gains.measure(rows), grid)
    serving = {name: (int(best[name]) if name in ("recent", "candidates") else float(best[name]))
               for name in ("recent", "decay", "candidates", "beta")}  # the key order of DEFAULT_SERVING
    users = len(gains.targets) if rows is None else int(np.arange(len(gains.targets))[rows].size)
    return RouteTuning(serving, tried, users, seed, gains.split, {k: tuple(grid[k]) for k in ORDER},
                       time.perf_counter() - t0)


@dataclass(frozen=True)
class CrossFit:
    """The route's settings cross-fitted over the gate's users (module doc): fold (U,) the fold of
    each user (in the order of served_eval.select_users), settings[k] chosen without fold k's users."""

    fold: np.ndarray
    settings: list[Setting]
    seed: int
    seconds: float  # wall time of the searches

    def record(self) -> dict[str, Any]:
        """The manifest's item2item.tuning.cross_fit."""
        return {"folds": len(self.settings), "seed": self.seed, "users": int(self.fold.size),
                "chosen": [dict(s) for s in self.settings], "seconds": round(self.seconds, 2)}

    @classmethod
    def recorded(cls, manifest: Manifest) -> CrossFit | None:
        """The cross-fit a manifest's item2item.tuning.cross_fit records (None without one): the
        folds dealt again from its users, folds and seed, as cross_fit_route dealt them."""
        tuning = manifest.item2item.tuning if manifest.item2item is not None else None
        record = (tuning or {}).get("cross_fit")
        if record is None:
            return None
        fold = assign_folds(int(record["users"]), int(record["folds"]), int(record["seed"]))
        return cls(fold, [dict(c) for c in record["chosen"]], int(record["seed"]), float(record["seconds"]))

    def route_folds(self, route: Item2ItemRoute) -> RouteFolds:
        """What served_eval.evaluate_served replays: `route`'s table with each fold's settings."""
        return RouteFolds(self.fold, [route.with_serving(s) for s in self.settings])


def cross_fit_route(version: LoadedVersion, ds: Dataset, loo: LeaveOneOut, users: np.ndarray, seed: int,
                    folds: int = GATE_FOLDS, grid: Mapping[str, Sequence[float]] = GRID,
                    gains: UserGains | None = None) -> CrossFit:
    """Deal `users` (positions into loo.eval_users) into `folds` seeded folds and choose the route's
    settings for each fold on the validation targets of the other folds' users (tune_route);
    `gains`: the same users' UserGains, to share what an earlier search measured."""
    t0 = time.perf_counter()
    fold = assign_folds(int(users.size), folds, seed)
    gains = UserGains(version, ds, loo, users) if gains is None else gains
    settings = [tune_route(gains, seed, grid, rows=fold != k).serving
                for k in range(folds)]
    return CrossFit(fold, settings, seed, time.perf_counter() - t0)


def tune_published(tmp: Path, src: Sources, gate: ServingGate, manifest: Manifest) -> tuple[CrossFit | None, Manifest]:
    """`manifest` (already written in the temp version folder `tmp`, with an item2item block) with
    the route's settings chosen on the stage gate's validation users (tune_route) and the record in
    item2item.tuning; and, for the gate, the settings cross-fitted over the same users
    (cross_fit_route, recorded in item2item.tuning.cross_fit), None when the gate has fewer than
    2 * GATE_FOLDS users (the gate then replays the chosen settings). Both are printed on stderr."""
    from service.artifacts import ArtifactError, load_version

    assert manifest.item2item is not None  # called only for a version with the route
    try:
        version = load_version(tmp)
    except ArtifactError as exc:
        raise PublishError(f"the new version does not load: {exc}") from None
    users = select_users(src.loo, gate.users, gate.seed)
    gains = UserGains(version, src.ds, src.loo, users)
    tuning = tune_route(gains, gate.seed)
    best = next(t[METRIC] for t in tuning.tried if all(t[k] == v for k, v in tuning.serving.items()))
    off = next((t[METRIC] for t in tuning.tried if t["beta"] == 0.0), None)
    print(f"item-to-item route: {len(tuning.tried)} settings on {tuning.users} validation users; chosen "
          + " ".join(f"{k}={v}" for k, v in tuning.serving.items())
          + f", retrieval {METRIC} {best:.4f}" + ("" if off is None else f" (beta 0: {off:.4f})"), file=sys.stderr)
    record = tuning.record()
    cross = None
    if users.size >= 2 * GATE_FOLDS:
        cross = cross_fit_route(version, src.ds, src.loo, users, gate.seed, gains=gains)
        distinct = {tuple(sorted(c.items())) for c in cross.settings}
        print(f"item-to-item route for the stage gate: {len(cross.settings)} folds of the {users.size} validation "
              f"users, each replayed with the settings chosen on the others ({len(distinct)} distinct; "
              f"{cross.seconds:.0f} s)", file=sys.stderr)
        record["cross_fit"] = cross.record()
    return cross, manifest.with_(item2item=replace(manifest.item2item, serving=tuning.serving, tuning=record))
