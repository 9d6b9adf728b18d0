"""POST /v1/recommend and /v1/recommend/batch: parse, run the use case (service/recommend.py)
on the compute thread, map its errors to HTTP codes.

A valid single request usually never reaches the route below: service/fast_path.py answers it
with the same use case, and sends here whatever it cannot answer with a 200.

The handlers validate on the event loop and hand the work (store read + pipeline) to the
worker's one compute thread (service/compute.py), so the loop stays free to answer /healthz
while a long request computes; beyond RECSYS_COMPUTE_QUEUE waiting requests, a 503 at once. A
worker handles one recommendation at a time; throughput comes from more workers / pods. A hung
Redis costs one socket timeout on the compute thread, then the store fails fast for its cooldown.

Errors: a field the store or the loaded version refuses (InvalidRequest) is a 422 naming it. A
batch is capped in the sum of its k (RECSYS_BATCH_MAX_TOTAL_K) and in its total number of
history + exclude ids (RECSYS_BATCH_MAX_TOTAL_HISTORY): beyond either, a 422 naming the limit.
Budgets (RECSYS_TIMEOUT_MS) and store fallbacks: service/recommend.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, HTTPException, Response, status

from service.api.deps import (ReadKeyHeader, ComputeDep, ExperimentDep, ImpressionsDep, MetricsDep, RecommenderDep,
                              SettingsDep, StoreDep, check_read_key)
from service.api.strict import StrictJSONRoute
from service.api.errors import BAD_BODY, NOT_LOADED, READ_AUTH, unprocessable
from service.compute import ComputeBusy, ComputeThread
from service import recommend as usecase
from service.schemas import RecommendBatchRequest, RecommendBatchResponse, RecommendRequest, RecommendResponse

router = APIRouter(prefix="/v1", tags=["recommend"], route_class=StrictJSONRoute)

RESPONSES = {**BAD_BODY, **READ_AUTH, **NOT_LOADED}
JSON = "application/json"


@router.post("/recommend", response_model=RecommendResponse, responses=RESPONSES)
async def recommend(body: RecommendRequest, rec: RecommenderDep, store: StoreDep, settings: SettingsDep,
                    metrics: MetricsDep, compute: ComputeDep, x_api_key: ReadKeyHeader,
                    impressions: ImpressionsDep, experiment: ExperimentDep) -> Response:
    """Top-k for the request history, else the stored history of user_id, else popularity."""
    if body.history is None and body.user_id is not None:
        check_read_key(settings, x_api_key)
    ctx = usecase.RecommendContext(rec, store, metrics, settings.timeout_ms, impressions, experiment)
    return await _on_compute(compute, usecase.recommend, ctx, body)


@router.post("/recommend/batch", response_model=RecommendBatchResponse, responses=RESPONSES)
async def recommend_batch(body: RecommendBatchRequest, rec: RecommenderDep, store: StoreDep,
                          settings: SettingsDep, metrics: MetricsDep, compute: ComputeDep,
                          x_api_key: ReadKeyHeader, impressions: ImpressionsDep,
                          experiment: ExperimentDep) -> Response:
    """Up to 100 requests in one call; stored histories are fetched in one store round trip.
    Every request is validated (filters and batch limits included) before any is served; the
    first bad one gives a 422 naming `body.requests.<i>.<field>`. RECSYS_TIMEOUT_MS covers the
    whole batch."""
    start = time.perf_counter()
    total_k = sum(r.k for r in body.requests)
    if total_k > settings.batch_max_total_k:
        raise unprocessable(("body", "requests"), f"the sum of k over the batch is {total_k}, above the limit "
                            f"{settings.batch_max_total_k} (RECSYS_BATCH_MAX_TOTAL_K)")
    total_ids = sum(len(r.history or ()) + len(r.exclude or ()) for r in body.requests)
    if total_ids > settings.batch_max_total_history:
        raise unprocessable(("body", "requests"), f"the batch holds {total_ids} history + exclude ids, above the limit "
                            f"{settings.batch_max_total_history} (RECSYS_BATCH_MAX_TOTAL_HISTORY)")
    if any(r.history is None and r.user_id for r in body.requests):
        check_read_key(settings, x_api_key)
    ctx = usecase.RecommendContext(rec, store, metrics, settings.timeout_ms, impressions, experiment)
    return await _on_compute(compute, usecase.recommend_batch, ctx, body.requests, start)


async def _on_compute(compute: ComputeThread, use_case: Callable[..., dict[str, Any]], *args: object) -> Response:
    """use_case(*args) on the compute thread, answered as JSON bytes built there (a Response skips
    FastAPI's response validation and serialisation; `response_model` keeps the OpenAPI schema)."""
    try:
        return Response(await compute.run(usecase.as_json, use_case, *args), media_type=JSON)
    except ComputeBusy as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"busy, retry later: {exc}") from None
    except usecase.InvalidRequest as exc:
        raise unprocessable(("body", *exc.loc), exc.message) from None
