"""The running experiment (service/experiments.py): GET, PUT (start or replace) and DELETE (end)
/v1/admin/experiment. PUT and DELETE need the write key.

PUT loads every pinned arm's version in this worker before anything changes (a version that is
not published or does not load is a 422 naming `arms.<i>.version`), then writes
artifacts/EXPERIMENT.json, which every other worker and replica picks up at its next CURRENT
poll or version notice (a notice is sent on Redis when it is configured).
"""

from __future__ import annotations

import asyncio
import logging
import redis
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.api.deps import ApiKeyDep, ExperimentDep, ExperimentsDep, RecommenderDep, SettingsDep
from service.api.errors import AUTH, INVALID, NOT_LOADED, unprocessable
from service.experiments import Experiment, ExperimentConfig, ExperimentError, share_summary
from service.pipeline import Recommender
from service.schemas import ArmOut, ExperimentOut
from service.notify import notify_version

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/admin", tags=["admin"])

def _describe(exp: Experiment | None, live: Recommender | None) -> JSONResponse:
    """ExperimentOut with absent fields left out (`experiment` is always there, null when none runs)."""
    if exp is None or live is None:
        return JSONResponse({"experiment": None})
    out = ExperimentOut(experiment=exp.name, mode=exp.config.mode, seed=exp.config.seed,
                        arms=[ArmOut(**a) for a in share_summary(exp, live)],
                        config=exp.config.model_dump(exclude_none=True))
    return JSONResponse(out.model_dump(mode="json", exclude_none=True))


@router.get("/experiment", response_model=ExperimentOut, responses=NOT_LOADED)
async def get_experiment(exp: ExperimentDep, live: RecommenderDep) -> JSONResponse:
    """The running experiment: its arms, the version each serves now and its share; {"experiment": null}
    when none runs."""
    return _describe(exp, live)


@router.put("/experiment", response_model=ExperimentOut,
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


@router.delete("/experiment", response_model=ExperimentOut, responses={**AUTH, **NOT_LOADED})
async def delete_experiment(holder: ExperimentsDep, settings: SettingsDep, _auth: ApiKeyDep) -> JSONResponse:
    """End the running experiment: every request is served by the live version again."""
    await holder.apply(None)
    await asyncio.to_thread(_announce, settings.redis_url, "experiment ended")
    return _describe(None, None)


def _announce(redis_url: str | None, what: str) -> None:
    """Tell the other workers now (they would see the file at their next poll anyway)."""
    if redis_url:
        try:
            notify_version(redis_url, f"experiment: {what}")
        except (redis.RedisError, OSError) as exc:
            logger.warning("experiment notice not sent (workers will see it at their next poll): %s", exc)
