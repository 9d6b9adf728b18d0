"""GET /healthz (the process answers), GET /readyz (artifacts loaded: 503 until then; the version CURRENT names beside the served one) and
GET /metrics (Prometheus exposition)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response, status

from service import experiments
from service.api.deps import MetricsDep
from service.connection_limits import closed_counts

router = APIRouter(tags=["health"])


# healthz and metrics do no I/O: async, so they skip the thread-pool hop (healthz in-process
# 0.59 -> 0.16 ms). readyz pings the store, which may block for its socket timeout: it stays
# a plain def, run on the thread pool, off the event loop.
@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "no artifact version loaded yet: {\"status\": \"loading\"}"}})
def readyz(request: Request, response: Response) -> dict[str, Any]:
    """Ready once a version is loaded; a store that does not answer is reported, not fatal
    (recommend falls back without it)."""
    rec = getattr(request.app.state, "recommender", None)
    store = getattr(request.app.state, "store", None)
    watcher = getattr(request.app.state, "watcher", None)
    if rec is None:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        return {"status": "loading"}
    # current / drift: the version CURRENT names, and whether this worker serves another one
    return {"status": "ready", "model_version": rec.model_version,
            "store": "ok" if store is not None and store.ping() else "unavailable",
            **(watcher.drift() if watcher is not None else {})}


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request, m: MetricsDep) -> Response:
    """Prometheus text; a plain def (thread pool): with Redis it asks INFO for evicted_keys."""
    stats = getattr(getattr(request.app.state, "store", None), "stats", None)
    if stats is not None:
        m.observe_store(*stats())
    m.observe_connections(closed_counts())
    watcher = getattr(request.app.state, "watcher", None)
    if watcher is not None:
        watcher.drift()  # recsys_current_version_info / recsys_version_drift as of now
    m.observe_process_memory()
    rec = getattr(request.app.state, "recommender", None)
    if rec is not None:
        experiments.report(m, rec, getattr(request.app.state, "experiment", None))
    online = getattr(request.app.state, "online", None)
    if online is not None:
        online.refresh()
        m.observe_online(online.snapshot())
    body, content_type = m.render()
    return Response(body, media_type=content_type)
