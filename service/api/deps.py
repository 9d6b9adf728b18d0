"""Request dependencies: the loaded pipeline, the history store, settings and the API key check.

Everything lives on `app.state` (set by the lifespan in service/main.py); tests override these
functions with `app.dependency_overrides`. They are `async def` so that FastAPI calls them on
the event loop: a plain `def` dependency is run in the thread pool, one hop per dependency.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any, TypeVar

from fastapi import Depends, HTTPException, Request, Security, status
from fastapi.exceptions import RequestValidationError
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, TypeAdapter, ValidationError

from service.catalog_updates import CatalogUpdates, Schema
from service.compute import ComputeThread
from service.core.config import Settings
from service.experiments import Experiment, ExperimentHolder
from service.metrics import Metrics
from service.online_log import ImpressionLog
from service.online_metrics import OnlineMetrics
from service.pipeline import Recommender
from service.reloader import VersionWatcher
from service.stores import HistoryStore


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _loaded(request: Request, name: str, missing: str) -> Any:
    """app.state.<name>, or 503 `missing` while the lifespan has not set it."""
    value = getattr(request.app.state, name, None)
    if value is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, missing)
    return value


async def get_recommender(request: Request) -> Recommender:
    rec: Recommender = _loaded(request, "recommender", "artifacts are not loaded yet")
    return rec


async def get_store(request: Request) -> HistoryStore:
    store: HistoryStore = _loaded(request, "store", "history store is not ready yet")
    return store


async def get_compute(request: Request) -> ComputeThread:
    compute: ComputeThread = _loaded(request, "compute", "artifacts are not loaded yet")
    return compute


async def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


async def get_impressions(request: Request) -> ImpressionLog | None:
    """The impression log; None when the service logs no impressions."""
    log: ImpressionLog | None = getattr(request.app.state, "impressions", None)
    return log


async def get_online(request: Request) -> OnlineMetrics:
    online: OnlineMetrics = _loaded(request, "online", "no online log: set RECSYS_REDIS_URL or RECSYS_LOG_DIR")
    return online


async def get_watcher(request: Request) -> VersionWatcher:
    watcher: VersionWatcher = _loaded(request, "watcher", "artifacts are not loaded yet")
    return watcher


async def get_experiment(request: Request) -> Experiment | None:
    """The running experiment, None when there is none."""
    exp: Experiment | None = getattr(request.app.state, "experiment", None)
    return exp


async def get_experiments(request: Request) -> ExperimentHolder:
    holder: ExperimentHolder = _loaded(request, "experiments", "artifacts are not loaded yet")
    return holder


async def get_catalog_updates(request: Request) -> CatalogUpdates:
    updates: CatalogUpdates = _loaded(request, "catalog_updates", "catalog updates are not configured")
    return updates


async def get_item_schema(request: Request) -> Schema | None:
    """Feature names and kinds of the loaded version's catalog; None when nothing is loaded."""
    rec: Recommender | None = getattr(request.app.state, "recommender", None)
    return None if rec is None else rec.v.item_features.schema()


# The two keys as OpenAPI security schemes (one header, X-API-Key): FastAPI lists them under
# components.securitySchemes and on each operation; auto_error=False because the checks below
# decide (a key is only needed when the service has one configured).
WRITE_KEY = APIKeyHeader(name="X-API-Key", scheme_name="ApiKey", auto_error=False,
                         description="The service's write key (RECSYS_API_KEY): needed to send events, update "
                                     "items and reload the model.")
READ_KEY = APIKeyHeader(name="X-API-Key", scheme_name="ReadKey", auto_error=False,
                        description="The read key (RECSYS_READ_KEY) or the write key: needed to read a user's "
                                    "stored history (their history, or a recommendation by user_id alone) when "
                                    "the service has a read key; otherwise not needed.")


def _key_matches(given: str | None, *keys: str | None) -> bool:
    return given is not None and any(k is not None and secrets.compare_digest(given.encode(), k.encode()) for k in keys)


async def require_api_key(settings: Annotated[Settings, Depends(get_settings)],
                          x_api_key: Annotated[str | None, Security(WRITE_KEY)]) -> None:
    """Writes and admin: 401 unless X-API-Key matches RECSYS_API_KEY; without a key configured,
    403 (writes disabled) unless RECSYS_ALLOW_ANONYMOUS_WRITES is set."""
    check_api_key(settings, x_api_key)


def check_api_key(settings: Settings, x_api_key: str | None) -> None:
    """require_api_key's check, for a caller that is not a dependency (service/api/strict.py)."""
    if settings.api_key is None:
        if settings.allow_anonymous_writes:
            return
        raise HTTPException(status.HTTP_403_FORBIDDEN, "writes are disabled: the service has no RECSYS_API_KEY "
                                                       "(or set RECSYS_ALLOW_ANONYMOUS_WRITES=1)")
    if not _key_matches(x_api_key, settings.api_key):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or wrong X-API-Key header",
                            headers={"WWW-Authenticate": "ApiKey"})


def check_read_key(settings: Settings, x_api_key: str | None) -> None:
    """Per-user reads: 401 unless X-API-Key matches RECSYS_READ_KEY or RECSYS_API_KEY (no check
    when no read key is configured)."""
    if settings.read_key is not None and not _key_matches(x_api_key, settings.read_key, settings.api_key):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "per-user reads need X-API-Key (RECSYS_READ_KEY)",
                            headers={"WWW-Authenticate": "ApiKey"})


async def require_read_key(settings: Annotated[Settings, Depends(get_settings)],
                           x_api_key: Annotated[str | None, Security(READ_KEY)]) -> None:
    check_read_key(settings, x_api_key)


SettingsDep = Annotated[Settings, Depends(get_settings)]
RecommenderDep = Annotated[Recommender, Depends(get_recommender)]
StoreDep = Annotated[HistoryStore, Depends(get_store)]
ApiKeyDep = Annotated[None, Depends(require_api_key)]
ReadKeyDep = Annotated[None, Depends(require_read_key)]
ComputeDep = Annotated[ComputeThread, Depends(get_compute)]
ReadKeyHeader = Annotated[str | None, Security(READ_KEY)]  # the X-API-Key a route checks itself
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
ImpressionsDep = Annotated[ImpressionLog | None, Depends(get_impressions)]
OnlineDep = Annotated[OnlineMetrics, Depends(get_online)]
WatcherDep = Annotated[VersionWatcher, Depends(get_watcher)]
ExperimentDep = Annotated[Experiment | None, Depends(get_experiment)]
ExperimentsDep = Annotated[ExperimentHolder, Depends(get_experiments)]
CatalogUpdatesDep = Annotated[CatalogUpdates, Depends(get_catalog_updates)]
ItemSchemaDep = Annotated[Schema | None, Depends(get_item_schema)]

M = TypeVar("M", bound=BaseModel)


def one_or_many(body: Any, model: type[M], many: TypeAdapter[list[M]]) -> list[M]:
    """A body that is one `model` or a list of them (validated by `many`, which holds the length
    limits): validated as a list when it is one, else as one, so a 422's loc is the real field
    (body.1.item_id), not one entry per union member."""
    try:
        return many.validate_python(body) if isinstance(body, list) else [model.model_validate(body)]
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]) from None


def one_or_many_body(model: type[BaseModel], max_items: int) -> dict[str, Any]:
    """openapi_extra for a route whose JSON body is one `model` or a list of at most max_items."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "anyOf": [ref, {"type": "array", "items": ref, "minItems": 1, "maxItems": max_items}]}}}}}
