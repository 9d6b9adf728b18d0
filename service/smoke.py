"""The one smoke check of a version, shared by `recsys export` / `reindex` / `rollback`
(training/publish/versions.py `smoke`), `recsys serve` and the service's hot swap (service/reloader.py).

It does what serving does: load the folder with service.artifacts.load_version, build the
`Recommender` (its pre-rank feature encoder included), then run one request per stage through
it: a request without history (popularity) and one with a history that must come out of the last
stage the version serves with no fallback flag (`;prerank_failed`, ...), at the largest k a
request may ask for (so every candidate the service can rank is scored once) and with every
score finite. Anything that goes wrong,
of any kind, is an ArtifactError naming the folder; a version that passes is served as built.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

from service.artifacts import ArtifactError, LoadedVersion, load_version, smoke_run
from service.pipeline import Recommender
from service.schemas import MAX_K

logger = logging.getLogger(__name__)

SMOKE_K = 5
SMOKE_HISTORY = 3  # items 1..3 of the catalog


def check_version(version: LoadedVersion,
                  make_recommender: Callable[[LoadedVersion], Recommender] = Recommender) -> Recommender:
    """Build the Recommender over a loaded version and run one request per stage; return it."""
    try:
        smoke_run(version, k=MAX_K)  # per-graph shape and finiteness checks with precise messages
        rec = make_recommender(version)
        popular = rec.recommend([], k=SMOKE_K, explain=False)
        if popular.served_by != "popularity" or not popular.items:
            raise ArtifactError(f"popularity request served by {popular.served_by!r} with {len(popular.items)} items")
        history = [str(x) for x in version.item_ids[1:1 + min(SMOKE_HISTORY, version.num_items)].tolist()]
        # no timeout: every stage the version serves must run
        out = rec.recommend(history, k=MAX_K, explain=True)
        if out.served_by == "popularity" or ";" in out.served_by:
            raise ArtifactError(f"a request with history was served by {out.served_by!r}: a stage failed (see the log)")
        # an item the ordering stage did not score has score None (pipeline.py "Scores")
        bad = next((it for it in out.items if not all(map(math.isfinite, (
            *(() if it.score is None else (it.score,)), *it.stages.values(), *it.routes.values())))), None)
        if bad is not None:
            raise ArtifactError(f"item {bad.item_id!r} was served with a non-finite score at k={MAX_K}")
    except ArtifactError as exc:
        raise ArtifactError(f"{version.path}: smoke run failed: {exc}") from None
    except Exception as exc:  # noqa: BLE001  e.g. a feature spec the encoder cannot use (KeyError)
        raise ArtifactError(f"{version.path}: smoke run failed: {type(exc).__name__}: {exc}") from exc
    logger.info("version %s passed the smoke run (served by %s)", version.version, out.served_by)
    return rec


def load_checked(path: str | Path,
                 make_recommender: Callable[[LoadedVersion], Recommender] = Recommender) -> Recommender:
    """load_version + check_version: the Recommender a service would serve, or ArtifactError."""
    return check_version(load_version(path), make_recommender)
