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
from typing import Annotated, Any

import redis
from fastapi import APIRouter, Body

from service.api.deps import ApiKeyDep, ExperimentDep, ExperimentsDep, RecommenderDep, SettingsDep
from service.api.errors import AUTH, INVALID, NOT_LOADED, unprocessable
from service.experiments import ExperimentConfig, ExperimentError, share_summary
from service.notify import notify_version

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/admin", tags=["admin"])

EXAMPLE = {"name": "exp1", "mode": "ab", "seed": 0,
           "arms": [{"name": "control", "share": 0.5}, {"name": "candidate", "version": "v2", "share": 0.5}]}


def _describe(exp: Any, live: Any) -> dict[str, Any]:
    if exp is None:
        return {"experiment": None}
    return {"experiment": exp.name, "mode": exp.config.mode, "seed": exp.config.seed,
            "arms": share_summary(exp, live), "config": exp.config.model_dump(exclude_none=True)}


@router.get("/experiment", responses=NOT_LOADED)
async def get_experiment(exp: ExperimentDep, live: RecommenderDep) -> dict[str, Any]:
    """The running experiment: its arms, the version each serves now and its share; {"experiment": null}
    when none runs."""
    return _describe(exp, live)


@router.put("/experiment", responses={**AUTH, **INVALID, **NOT_LOADED})
async def put_experiment(holder: ExperimentsDep, live: RecommenderDep, settings: SettingsDep, _auth: ApiKeyDep,
                         config: Annotated[ExperimentConfig, Body(openapi_examples={"ab": {"value": EXAMPLE}})],
                         ) -> dict[str, Any]:
    """Start the experiment (replacing a running one) once every arm's version has loaded."""
    try:
        exp = await holder.apply(config)
    except ExperimentError as exc:
        raise unprocessable(("body", *exc.loc), exc.message) from None
    await asyncio.to_thread(_announce, settings.redis_url, config.name)
    return _describe(exp, live)


@router.delete("/experiment", responses={**AUTH, **NOT_LOADED})
async def delete_experiment(holder: ExperimentsDep, settings: SettingsDep, _auth: ApiKeyDep) -> dict[str, Any]:
    """End the running experiment: every request is served by the live version again."""
    await holder.apply(None)
    await asyncio.to_thread(_announce, settings.redis_url, "experiment ended")
    return {"experiment": None}


def _announce(redis_url: str | None, what: str) -> None:
    """Tell the other workers now (they would see the file at their next poll anyway)."""
    if redis_url:
        try:
            notify_version(redis_url, f"experiment: {what}")
        except (redis.RedisError, OSError) as exc:
            logger.warning("experiment notice not sent (workers will see it at their next poll): %s", exc)
