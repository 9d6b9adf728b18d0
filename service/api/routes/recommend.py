"""POST /v1/recommend and /v1/recommend/batch: history from the request, else the store.

A valid single request usually never reaches the route below: service/fast_path.py answers it
with the same recommend_one, and sends here whatever it cannot answer with a 200.

Store trouble never gives a 5xx: the request is served without the stored history and
`served_by` says so (`;store_unavailable`).

The handlers validate on the event loop and hand the work (store read + pipeline) to the
worker's one compute thread (service/compute.py), so the loop stays free to answer /healthz
while a long request computes; beyond RECSYS_COMPUTE_QUEUE waiting requests, a 503 at once. A
worker handles one recommendation at a time; throughput comes from more workers / pods. A hung
Redis costs one socket timeout on the compute thread, then the store fails fast for its cooldown.

Budgets: RECSYS_TIMEOUT_MS is per HTTP request, a batch included: each request of a batch gets
what is left of it, and once it is spent the rest are served from popularity (`;timeout`). A
batch is also capped in the sum of its k (RECSYS_BATCH_MAX_TOTAL_K) and in its total number of
history + exclude ids (RECSYS_BATCH_MAX_TOTAL_HISTORY): beyond either, a 422 naming the limit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
from fastapi import APIRouter, HTTPException, Response, status

from service.api.deps import (ApiKeyHeader, ComputeDep, MetricsDep, RecommenderDep, SettingsDep, StoreDep,
                              check_read_key)
from service.api.errors import BAD_BODY, NOT_LOADED, READ_AUTH, unprocessable
from service.pipeline import FilterError, Recommender, RecommendResult
from service.schemas import (RecommendBatchRequest, RecommendBatchResponse, RecommendRequest, RecommendResponse,
                             encode_json, recommend_json)
from service.compute import ComputeBusy, ComputeThread
from service.core.config import Settings
from service.metrics import Metrics
from service.stores import HistoryStore, StoreError

T = TypeVar("T")

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["recommend"])

STORE_FLAG = "store_unavailable"
RESPONSES = {**BAD_BODY, **READ_AUTH, **NOT_LOADED}
JSON = "application/json"


@router.post("/recommend", response_model=RecommendResponse, responses=RESPONSES)
async def recommend(body: RecommendRequest, rec: RecommenderDep, store: StoreDep, settings: SettingsDep,
                    metrics: MetricsDep, compute: ComputeDep, x_api_key: ApiKeyHeader = None) -> Response:
    """Top-k for the request history, else the stored history of user_id, else popularity.

    Answers with JSON bytes built on the compute thread (a Response skips FastAPI's response
    validation and serialisation; `response_model` keeps the OpenAPI schema)."""
    if body.history is None and body.user_id is not None:
        check_read_key(settings, x_api_key)
    return await _on_compute(compute, recommend_one, body, rec, store, settings, metrics)


@router.post("/recommend/batch", response_model=RecommendBatchResponse, responses=RESPONSES)
async def recommend_batch(body: RecommendBatchRequest, rec: RecommenderDep, store: StoreDep,
                          settings: SettingsDep, metrics: MetricsDep, compute: ComputeDep,
                          x_api_key: ApiKeyHeader = None) -> Response:
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
    return await _on_compute(compute, _recommend_batch, body, rec, store, settings, metrics, start)


async def _on_compute(compute: ComputeThread, fn: Callable[..., T], *args: object) -> T:
    try:
        return await compute.run(fn, *args)
    except ComputeBusy as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"busy, retry later: {exc}") from None


def recommend_one(body: RecommendRequest, rec: Recommender, store: HistoryStore, settings: Settings,
               metrics: Metrics) -> Response:
    """On the compute thread."""
    start = time.perf_counter()
    flags: list[str] = []
    history: list[str] = []
    if body.history is not None:
        history = body.history
    elif body.user_id is not None:
        try:
            history = store.get_history(body.user_id)
        except ValueError as exc:  # an id pydantic lets through but the store refuses
            raise unprocessable(("body", "user_id"), str(exc)) from None
        except StoreError as exc:
            logger.warning("history of %r unavailable, serving without it: %s", body.user_id, exc)
            flags.append(STORE_FLAG)
    store_ms = (time.perf_counter() - start) * 1000.0
    return Response(encode_json(_serve(rec, body, history, flags, store_ms, settings.timeout_ms, metrics, ("body",))),
                    media_type=JSON)


def _recommend_batch(body: RecommendBatchRequest, rec: Recommender, store: HistoryStore, settings: Settings,
                     metrics: Metrics, start: float) -> Response:
    """On the compute thread; `start` is when the HTTP request arrived (its budget began)."""
    for i, r in enumerate(body.requests):
        _check_filters(rec, r, ("body", "requests", i))
    t0 = time.perf_counter()
    histories, flags = _stored_histories(store, [r.user_id for r in body.requests if r.history is None and r.user_id])
    store_ms = (time.perf_counter() - t0) * 1000.0
    results = []
    for i, r in enumerate(body.requests):
        history = r.history if r.history is not None else histories.get(r.user_id or "", [])
        left_ms = settings.timeout_ms - (time.perf_counter() - start) * 1000.0
        results.append(_serve(rec, r, history, list(flags if r.history is None and r.user_id else []), store_ms,
                              settings.timeout_ms, metrics, ("body", "requests", i), budget_ms=left_ms))
    return Response(encode_json({"results": results}), media_type=JSON)  # RecommendBatchResponse


def _stored_histories(store: HistoryStore, user_ids: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    if not user_ids:
        return {}, []
    try:
        return store.get_histories(user_ids), []
    except ValueError as exc:
        raise unprocessable(("body", "requests"), str(exc)) from None
    except StoreError as exc:
        logger.warning("histories of %d users unavailable, serving without them: %s", len(user_ids), exc)
        return {}, [STORE_FLAG]


def _check_filters(rec: Recommender, body: RecommendRequest, loc: tuple[str | int, ...]) -> None:
    if body.filters:
        try:
            rec.filter_mask(body.filters)
        except FilterError as exc:
            raise unprocessable((*loc, "filters", exc.field), exc.message) from None


def _popularity_only(rec: Recommender, body: RecommendRequest, history: list[str]) -> RecommendResult:
    """The budget is spent: the cheapest answer (popularity without seen / excluded items)."""
    t0 = time.perf_counter()
    seen, unknown = rec.to_indices(history)
    excluded, _ = rec.to_indices(body.exclude or [])
    allowed = rec.filter_mask(body.filters) if body.filters else None
    items = rec.popularity(body.k, np.unique(np.concatenate([seen, excluded])), allowed)
    ms = round((time.perf_counter() - t0) * 1000.0, 3)
    return RecommendResult(items, rec.model_version, "popularity;timeout", {"popularity": ms, "total": ms}, unknown)


def _serve(rec: Recommender, body: RecommendRequest, history: list[str], flags: list[str], store_ms: float,
           timeout_ms: float, metrics: Metrics, loc: tuple[str | int, ...],
           budget_ms: float | None = None) -> dict[str, Any]:
    """RecommendResponse as a JSON-ready dict. budget_ms: what is left of the HTTP request's
    budget (a batch); None = timeout_ms - store_ms."""
    left = max(timeout_ms - store_ms, 0.0) if budget_ms is None else budget_ms
    try:
        if left <= 0.0 and budget_ms is not None:
            result = _popularity_only(rec, body, history)
        else:
            result = rec.recommend(history, body.k, body.exclude, explain=body.explain, filters=body.filters,
                                   timeout_ms=max(left, 0.0))
    except FilterError as exc:
        raise unprocessable((*loc, "filters", exc.field), exc.message) from None
    served_by = ";".join([result.served_by, *flags])
    timings = {"store": round(store_ms, 3), **result.timings_ms}
    timings["total"] = round(store_ms + result.timings_ms["total"], 3)
    metrics.observe_recommendation(served_by, timings, result.unknown_items)
    return recommend_json(result.items, result.model_version, served_by, timings, result.unknown_items, body.explain)
