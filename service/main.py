"""FastAPI app factory; the lifespan loads the CURRENT artifact version and the history store.

Importing this module loads nothing: `app = create_app()` only builds the routes; settings are
read and artifacts loaded when the server starts (lifespan).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.api.routes import catalog, events, health, recommend
from service.artifacts import load_current
from service.core.config import Settings
from service.pipeline import Recommender
from service.stores import make_store

logger = logging.getLogger(__name__)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings or Settings()  # ValidationError here names the bad RECSYS_* value
    app.state.settings = settings
    version = load_current(settings.artifacts)  # ArtifactError names the file: the server does not start
    store = make_store(settings.redis_url, settings.max_history)
    app.state.store = store
    app.state.recommender = Recommender(version, settings.retrieval_k, settings.prerank_n)
    logger.info("serving version %s (retrieval_k=%d, prerank_n=%d)", version.version, settings.retrieval_k,
                settings.prerank_n)
    try:
        yield
    finally:
        app.state.recommender = None
        app.state.store = None
        store.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API; `settings=None` reads RECSYS_* at start-up."""
    app = FastAPI(title="recsys", version="1", lifespan=lifespan)
    app.state.settings = settings
    app.state.recommender = None
    app.state.store = None
    for module in (health, recommend, events, catalog):
        app.include_router(module.router)
    return app


app = create_app()
