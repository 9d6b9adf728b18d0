"""POST /v1/admin/reload: load the version artifacts/CURRENT names now (API key when set)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status

from service.api.deps import ApiKeyDep, WatcherDep
from service.api.errors import AUTH, CONFLICT, NOT_LOADED
from service.reloader import ReloadError
from service.schemas import ReloadOut

router = APIRouter(prefix="/v1/admin", tags=["admin"])


@router.post("/reload", response_model=ReloadOut, responses={**AUTH, **CONFLICT, **NOT_LOADED})
async def reload(watcher: WatcherDep, _auth: ApiKeyDep) -> ReloadOut:
    """Swap to CURRENT's version once it has loaded; 409 (old version kept) when it does not load.
    Also retries a version that failed to load before."""
    try:
        res = await watcher.reload(force=True)
    except ReloadError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, exc.public) from None  # no absolute path, no file content
    return ReloadOut(previous=res.previous, model_version=res.current, changed=res.changed)
