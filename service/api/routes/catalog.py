"""GET /v1/items/{item_id} and GET /v1/version: what the loaded version knows."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, status

from service.api.deps import RecommenderDep
from service.api.errors import INVALID, NOT_FOUND, NOT_LOADED
from service.schemas import ID_PATTERN, ItemOut, VersionOut
from service.stores import MAX_ID_LEN

router = APIRouter(prefix="/v1", tags=["catalog"])


@router.get("/items/{item_id}", response_model=ItemOut, responses={**INVALID, **NOT_FOUND, **NOT_LOADED})
def get_item(item_id: Annotated[str, Path(min_length=1, max_length=MAX_ID_LEN, pattern=ID_PATTERN)],
             rec: RecommenderDep) -> ItemOut:
    v = rec.v
    idx = v.id_to_index.get(item_id)
    if idx is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"item_id {item_id!r} is not in version {v.version}")
    return ItemOut(item_id=item_id, index=idx, popularity=int(v.popularity[idx]),
                   features=v.item_features.item(idx))


@router.get("/version", response_model=VersionOut, responses=NOT_LOADED)
def get_version(rec: RecommenderDep) -> VersionOut:
    m = rec.v.manifest
    serving = m.serving.to_dict() if m.serving is not None else None  # the gate's record as written
    baselines = m.serving.baselines if m.serving is not None else None
    if serving and isinstance(serving.get("baselines"), dict):  # its rows are `baselines` below, as cuts
        serving["baselines"] = {k: v for k, v in serving["baselines"].items() if k != "rows"}
    return VersionOut(model_version=rec.v.version, created_at=str(m.created_at), item_count=rec.v.num_items,
                      data=m.data.to_dict(), rerank=rec.v.rerank is not None, stages=list(rec.stages),
                      serving={k: v for k, v in serving.items() if k != "cuts"} if serving else None,
                      cuts=dict(m.serving.cuts) if m.serving is not None and serving else {},
                      baselines=dict(baselines.rows) if baselines is not None else {},
                      regression=m.checks.regression.to_dict() if m.checks is not None else None)
