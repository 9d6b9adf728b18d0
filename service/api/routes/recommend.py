"""POST /v1/recommend and /v1/recommend/batch: history from the request, else the store.

Store trouble never gives a 5xx: the request is served without the stored history and
`served_by` says so (`;store_unavailable`).

The handlers are `async def` and compute inline on the event loop: the work is CPU-bound
under the GIL, so a thread-pool hop only added cost (profiled: waking the loop from the worker
thread took a quarter of the server's samples). A worker handles one recommendation at a time;
throughput comes from more workers / pods. The store call blocks the loop for one Redis round
trip; a hung Redis costs one socket timeout, then the store fails fast for its cooldown.
"""

from __future__ import annotations

import logging
import time

from fastapi import APIRouter, HTTPException, status
from fastapi.exceptions import RequestValidationError

from service.api.deps import MetricsDep, RecommenderDep, SettingsDep, StoreDep
from service.pipeline import FilterError, Recommender
from service.schemas import (RecommendBatchRequest, RecommendBatchResponse, RecommendedItemOut, RecommendRequest,
                             RecommendResponse)
from service.stores import HistoryStore, StoreError

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["recommend"])

STORE_FLAG = "store_unavailable"


@router.post("/recommend", response_model=RecommendResponse)
async def recommend(body: RecommendRequest, rec: RecommenderDep, store: StoreDep, settings: SettingsDep,
                    metrics: MetricsDep) -> RecommendResponse:
    """Top-k for the request history, else the stored history of user_id, else popularity."""
    start = time.perf_counter()
    flags: list[str] = []
    history: list[str] = []
    if body.history is not None:
        history = body.history
    elif body.user_id is not None:
        try:
            history = store.get_history(body.user_id)
        except ValueError as exc:  # an id pydantic lets through but the store refuses (control chars)
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
        except StoreError as exc:
            logger.warning("history of %r unavailable, serving without it: %s", body.user_id, exc)
            flags.append(STORE_FLAG)
    store_ms = (time.perf_counter() - start) * 1000.0
    return _serve(rec, body, history, flags, store_ms, settings.timeout_ms, metrics, ("body",))


@router.post("/recommend/batch", response_model=RecommendBatchResponse)
async def recommend_batch(body: RecommendBatchRequest, rec: RecommenderDep, store: StoreDep,
                          settings: SettingsDep, metrics: MetricsDep) -> RecommendBatchResponse:
    """Up to 100 requests in one call; stored histories are fetched in one store round trip.
    Every request is validated (filters included) before any is served; the first bad one gives
    a 422 naming `body.requests.<i>.<field>`."""
    for i, r in enumerate(body.requests):
        _check_filters(rec, r, ("body", "requests", i))
    start = time.perf_counter()
    histories, flags = _stored_histories(store, [r.user_id for r in body.requests if r.history is None and r.user_id])
    store_ms = (time.perf_counter() - start) * 1000.0
    results = []
    for i, r in enumerate(body.requests):
        history = r.history if r.history is not None else histories.get(r.user_id or "", [])
        results.append(_serve(rec, r, history, list(flags if r.history is None and r.user_id else []), store_ms,
                              settings.timeout_ms, metrics, ("body", "requests", i)))
    return RecommendBatchResponse(results=results)


def _stored_histories(store: HistoryStore, user_ids: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    if not user_ids:
        return {}, []
    try:
        return store.get_histories(user_ids), []
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    except StoreError as exc:
        logger.warning("histories of %d users unavailable, serving without them: %s", len(user_ids), exc)
        return {}, [STORE_FLAG]


def _check_filters(rec: Recommender, body: RecommendRequest, loc: tuple[str | int, ...]) -> None:
    if body.filters:
        try:
            rec.filter_mask(body.filters)
        except FilterError as exc:
            raise _filter_422(exc, loc) from None


def _filter_422(exc: FilterError, loc: tuple[str | int, ...]) -> RequestValidationError:
    return RequestValidationError([{"type": "value_error", "loc": (*loc, "filters", exc.field),
                                    "msg": exc.message, "input": None}])


def _serve(rec: Recommender, body: RecommendRequest, history: list[str], flags: list[str], store_ms: float,
           timeout_ms: float, metrics: MetricsDep, loc: tuple[str | int, ...]) -> RecommendResponse:
    try:
        result = rec.recommend(history, body.k, body.exclude, explain=body.explain, filters=body.filters,
                               timeout_ms=max(timeout_ms - store_ms, 0.0))
    except FilterError as exc:
        raise _filter_422(exc, loc) from None
    served_by = ";".join([result.served_by, *flags])
    timings = {"store": round(store_ms, 3), **result.timings_ms}
    timings["total"] = round(store_ms + result.timings_ms["total"], 3)
    metrics.observe_recommendation(served_by, timings, result.unknown_items)
    items = [
        RecommendedItemOut(item_id=it.item_id, score=it.score, rank=r, launcher=it.launcher,
                           stages=it.stages if body.explain else None)
        for r, it in enumerate(result.items, start=1)
    ]
    return RecommendResponse(items=items, model_version=result.model_version, served_by=served_by,
                             timings_ms=timings, unknown_items=result.unknown_items)
