"""POST /v1/recommend: history from the request, else the store; store trouble never gives a 5xx."""

from __future__ import annotations

import logging
import time

from fastapi import APIRouter, HTTPException, status

from service.api.deps import RecommenderDep, StoreDep
from service.schemas import RecommendedItemOut, RecommendRequest, RecommendResponse
from service.stores import StoreError

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["recommend"])

STORE_FLAG = "store_unavailable"


@router.post("/recommend", response_model=RecommendResponse)
def recommend(body: RecommendRequest, rec: RecommenderDep, store: StoreDep) -> RecommendResponse:
    """Top-k for the request history, else the stored history of user_id, else popularity."""
    flags: list[str] = []
    start = time.perf_counter()
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
    store_ms = round((time.perf_counter() - start) * 1000.0, 3)

    result = rec.recommend(history, body.k, body.exclude, explain=body.explain)
    items = [
        RecommendedItemOut(item_id=it.item_id, score=it.score, rank=r, launcher=it.launcher,
                           stages=it.stages if body.explain else None)
        for r, it in enumerate(result.items, start=1)
    ]
    return RecommendResponse(items=items, model_version=result.model_version,
                             served_by=";".join([result.served_by, *flags]),
                             timings_ms={"store": store_ms, **result.timings_ms},
                             unknown_items=result.unknown_items)
