"""GET /v1/online-metrics: impressions, click-through per position and @k, hit rate and coverage
per experiment, arm and version, each rate with its 95 % Wilson interval, from the joined
impression and event logs (service/online_metrics.py). Experiments' own route can answer with
:func:`online_metrics_json` for one experiment."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from service.api.deps import OnlineDep, ReadKeyDep
from service.api.errors import NOT_LOADED, READ_AUTH
from service.online_metrics import OnlineMetrics

router = APIRouter(prefix="/v1", tags=["online"])


def catalog_sizes(request: Request) -> dict[str, int]:
    """Catalog size of every version this process has loaded (for coverage shares)."""
    rec = getattr(request.app.state, "recommender", None)
    if rec is None:
        return {}
    exp = getattr(request.app.state, "experiment", None)
    held = exp.loaded(rec) if exp is not None else [rec]  # every experiment arm's version too
    return {r.v.version: r.v.num_items for r in held}


async def online_metrics_json(online: OnlineMetrics, sizes: dict[str, int], experiment: str | None = None,
                              only_experiment: bool = False) -> dict[str, Any]:
    """Refresh from the logs (off the event loop: a first read may be long) and snapshot."""
    await asyncio.to_thread(online.refresh, True)
    return online.snapshot(sizes, experiment, only_experiment)


@router.get("/online-metrics", responses={**READ_AUTH, **NOT_LOADED})
async def online_metrics(request: Request, online: OnlineDep, _read: ReadKeyDep,
                         experiment: Annotated[str | None, Query(max_length=256)] = None) -> dict[str, Any]:
    """Every group, or those of `experiment` alone."""
    return await online_metrics_json(online, catalog_sizes(request), experiment, experiment is not None)
