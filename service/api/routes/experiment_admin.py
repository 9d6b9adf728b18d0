"""The running experiment (service/experiments.py): GET, PUT (start or replace) and DELETE (end)
/v1/admin/experiment (PUT and DELETE need the write key); GET /v1/experiments/{name}: its arms and
online metrics (read key when one is set).

PUT loads every pinned arm's version in this worker before anything changes (a version that is
not published or does not load is a 422 naming `arms.<i>.version`), then writes
artifacts/EXPERIMENT.json, which every other worker and replica picks up at its next CURRENT
poll or version notice (a notice is sent on Redis when it is configured).
"""

from __future__ import annotations

import asyncio
import logging
import redis
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Request, status
from fastapi.responses import JSONResponse

from service.api.strict import StrictJSONRoute
from service.api.deps import ApiKeyDep, ExperimentDep, ExperimentsDep, ReadKeyDep, RecommenderDep, SettingsDep
from service.api.errors import AUTH, INVALID, NOT_FOUND, NOT_LOADED, READ_AUTH, unprocessable
from service.api.routes.online import catalog_sizes, online_metrics_json
from service.experiments import Experiment, ExperimentConfig, ExperimentError, share_summary
from service.online_metrics import OnlineMetrics
from service.pipeline import Recommender
from service.schemas import ArmOut, ExperimentOut
from service.notify import notify_version

logger = logging.getLogger(__name__)

router = APIRouter(tags=["admin"], route_class=StrictJSONRoute)  # bad JSON: a 422 naming the field

def _describe(exp: Experiment | None, live: Recommender | None) -> JSONResponse:
    """ExperimentOut with absent fields left out (`experiment` is always there, null when none runs)."""
    if exp is None or live is None:
        return JSONResponse({"experiment": None})
    out = ExperimentOut(experiment=exp.name, mode=exp.config.mode, seed=exp.config.seed,
                        arms=[ArmOut(**a) for a in share_summary(exp, live)],
                        config=exp.config.model_dump(exclude_none=True))
    return JSONResponse(out.model_dump(mode="json", exclude_none=True))


@router.get("/v1/admin/experiment", response_model=ExperimentOut, responses=NOT_LOADED)
async def get_experiment(exp: ExperimentDep, live: RecommenderDep) -> JSONResponse:
    """The running experiment: its arms, the version each serves now and its share; {"experiment": null}
    when none runs."""
    return _describe(exp, live)


@router.put("/v1/admin/experiment", response_model=ExperimentOut,
            responses={**AUTH, **INVALID, **NOT_LOADED})
async def put_experiment(config: ExperimentConfig, holder: ExperimentsDep, live: RecommenderDep,
                         settings: SettingsDep, _auth: ApiKeyDep) -> JSONResponse:
    """Start the experiment (replacing a running one) once every arm's version has loaded."""
    try:
        exp = await holder.apply(config)
    except ExperimentError as exc:
        raise unprocessable(("body", *exc.loc), exc.message) from None
    await asyncio.to_thread(_announce, settings.redis_url, config.name)
    return _describe(exp, live)


@router.delete("/v1/admin/experiment", response_model=ExperimentOut, responses={**AUTH, **NOT_LOADED})
async def delete_experiment(holder: ExperimentsDep, settings: SettingsDep, _auth: ApiKeyDep) -> JSONResponse:
    """End the running experiment: every request is served by the live version again."""
    await holder.apply(None)
    await asyncio.to_thread(_announce, settings.redis_url, "experiment ended")
    return _describe(None, None)


@router.get("/v1/experiments/{name}", tags=["online"], responses={**READ_AUTH, **NOT_FOUND, **NOT_LOADED})
async def experiment_results(name: Annotated[str, Path(max_length=64)], request: Request, exp: ExperimentDep,
                             live: RecommenderDep, _read: ReadKeyDep) -> dict[str, Any]:
    """The experiment's arms (while it runs) and its online metrics per arm with 95% intervals, from
    the impression and event logs (interleaving: clicks and wins per contributing arm); 404 when
    it neither runs nor has logged impressions."""
    running = exp is not None and exp.name == name
    online: OnlineMetrics | None = getattr(request.app.state, "online", None)
    metrics = None
    if online is not None:
        metrics = await online_metrics_json(online, catalog_sizes(request), name, True)
        if not metrics["groups"]:
            metrics = None
    if not running and metrics is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no experiment {name!r} runs or has logged impressions")
    out: dict[str, Any] = {"name": name, "running": running, "online": metrics}
    if running and exp is not None:
        out["mode"], out["arms"] = exp.config.mode, share_summary(exp, live)
    return out


def _announce(redis_url: str | None, what: str) -> None:
    """Tell the other workers now (they would see the file at their next poll anyway)."""
    if redis_url:
        try:
            notify_version(redis_url, f"experiment: {what}")
        except (redis.RedisError, OSError) as exc:
            logger.warning("experiment notice not sent (workers will see it at their next poll): %s", exc)
