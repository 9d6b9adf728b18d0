"""FastAPI app factory; the lifespan loads the CURRENT artifact version and the history store.

Importing this module loads nothing: `app = create_app()` only builds the routes; settings are
read and artifacts loaded when the server starts (lifespan), and a VersionWatcher then swaps in
new versions as they are published (service/reloader.py).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from threadpoolctl import threadpool_limits

from service.api import openapi
from service.api.routes import admin, catalog, events, experiment_admin, health, items, online, recommend
from service.api.strict import ServerErrorLog, method_not_allowed, validation_error
from service.artifacts import current_version, version_folder
from service.catalog_updates import make_catalog_updates
from service.compute import ComputeThread
from service.core.config import Settings
from service.experiments import ExperimentHolder
from service.fast_path import RecommendFastPath
from service.feedback import build_feedback
from service.metrics import Metrics
from service.middleware import BodyLimitMiddleware, CorsMiddleware, MetricsMiddleware, RequestIdMiddleware
from service.pipeline import Recommender
from service.reloader import VersionWatcher
from service.schemas import EventIn
from service.smoke import load_checked
from service.redis_store import make_store

logger = logging.getLogger(__name__)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings or Settings()  # ValidationError here names the bad RECSYS_* value
    app.state.settings = settings
    # One recommendation runs at a time per worker, on its compute thread (service/compute.py),
    # whose NumPy BLAS and FAISS OpenMP math stay on compute_threads cores, so workers and
    # replicas sharing a machine do not oversubscribe it; the event loop stays free for
    # /healthz. The loop thread gets the same limits for anything else it computes.
    threadpool_limits(settings.compute_threads)
    compute = ComputeThread(settings.compute_threads, settings.compute_queue)
    make_recommender = partial(Recommender, retrieval_k=settings.retrieval_k, prerank_n=settings.prerank_n)
    # the same load + smoke check as a hot swap and `recsys rollback`: ArtifactError names the file
    recommender = load_checked(version_folder(settings.artifacts, current_version(settings.artifacts)),
                               make_recommender)
    version = recommender.v
    metrics: Metrics = app.state.metrics
    feedback = build_feedback(settings, lambda reason, n: metrics.child(metrics.log_errors, reason).inc(n))
    store = make_store(settings.redis_url, settings.max_history, settings.store_cooldown_s, settings.max_users,
                       settings.history_ttl_s, settings.max_store_bytes, feedback.stream_bound, feedback.event_log)
    app.state.impressions = feedback.impressions
    app.state.online = feedback.online
    if settings.api_key is None:
        if settings.allow_anonymous_writes:
            logger.warning("!!! RECSYS_ALLOW_ANONYMOUS_WRITES is set and RECSYS_API_KEY is not: ANYONE who reaches "
                           "this port can write events, catalog updates and reload versions !!!")
        else:
            logger.warning("no RECSYS_API_KEY: write and admin routes answer 403 (set RECSYS_API_KEY, or "
                           "RECSYS_ALLOW_ANONYMOUS_WRITES=1 for a closed network)")
    app.state.store = store
    app.state.compute = compute
    updates = make_catalog_updates(settings.redis_url, settings.artifacts)  # PUT /v1/items, for the next re-index
    app.state.catalog_updates = updates
    app.state.recommender = recommender
    app.state.metrics.set_version(version.version)
    experiments = ExperimentHolder(app.state, settings.artifacts, make_recommender)
    experiments.start_sync()  # artifacts/EXPERIMENT.json, when there is one: every arm's version loaded
    app.state.experiments = experiments
    watcher = VersionWatcher(app.state, settings.artifacts, make_recommender, app.state.metrics,
                             settings.reload_poll_s, settings.redis_url, experiments)
    app.state.watcher = watcher
    watcher.start()
    logger.info("serving version %s (retrieval_k=%d, prerank_n=%d)", version.version, settings.retrieval_k,
                settings.prerank_n)
    try:
        yield
    finally:
        await watcher.stop()
        app.state.watcher = None
        app.state.experiments = None
        app.state.experiment = None
        app.state.recommender = None
        app.state.store = None
        store.close()
        app.state.impressions = None
        app.state.online = None
        feedback.close()
        app.state.compute = None
        compute.close()
        app.state.catalog_updates = None
        updates.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API; `settings=None` reads RECSYS_* at start-up."""
    # operation ids are the route functions' names (recommend, post_events...): what a client
    # generated from /openapi.json names its calls
    app = FastAPI(title="recsys", version="1", lifespan=lifespan,
                  generate_unique_id_function=lambda route: route.name)
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.recommender = None
    app.state.store = None
    app.state.compute = None
    app.state.watcher = None
    app.state.experiments = None
    app.state.experiment = None  # the running Experiment (service/experiments.py), None when none
    app.state.catalog_updates = None
    app.state.impressions = None
    app.state.online = None
    for module in (health, recommend, events, catalog, items, admin, online, experiment_admin):
        app.include_router(module.router)
    app.add_exception_handler(RequestValidationError, validation_error)  # a 422 that always renders
    app.add_exception_handler(StarletteHTTPException, method_not_allowed)  # a 405's Allow: every method of the path
    openapi.install(app, [EventIn, items.ItemIn],
                    lambda: None if app.state.recommender is None else app.state.recommender.v)
    default_limit = Settings.model_fields["max_body_bytes"].default

    def body_limit() -> int:  # settings may only be known once the lifespan has run
        s: Settings | None = app.state.settings
        return default_limit if s is None else s.max_body_bytes

    # innermost: inside the body limit and the metrics
    app.add_middleware(RecommendFastPath, api=app, router=recommend.router)
    app.add_middleware(BodyLimitMiddleware, max_bytes=body_limit)
    app.add_middleware(ServerErrorLog)  # an escaping exception: a 500 and one bounded log record
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)  # 413s are counted too

    def cors_origins() -> tuple[str, ...]:
        s: Settings | None = app.state.settings
        return () if s is None else s.cors_origins

    app.add_middleware(CorsMiddleware, origins=cors_origins)  # preflights answered before anything else
    app.add_middleware(RequestIdMiddleware)  # outermost: every response and log line has the id
    return app


app = create_app()
