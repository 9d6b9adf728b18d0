"""PUT /v1/items: record new or changed catalog items; they are served after the next `recsys reindex`.

The body is one item or a list of at most MAX_ITEMS_PER_REQUEST:
``{"item_id": "i42", "features": {"genre": ["a", "b"], "category": "x", "price": 1.5}}``.
An update replaces the item's features (service/catalog_updates.py). When a version is loaded,
feature names and kinds are checked against its catalog, so a typo is a 422 now rather than a
skipped update at re-index time. Every item is validated before any is written (all or none).
Answers 202 ``{"accepted": n, "pending": items now waiting for a re-index}``.

The request and response models live here (not in service/schemas.py) to keep this route in
one file; the updates object is ``app.state.catalog_updates``, set by the lifespan.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from service.api.deps import ApiKeyDep
from service.catalog_updates import CatalogUpdates, ItemError, ItemUpdate, Schema, schema_from_catalog, validate_item
from service.stores import MAX_ID_LEN, StoreError

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["items"])

MAX_ITEMS_PER_REQUEST = 1000


class ItemIn(BaseModel):
    """One item's complete features: name -> string (categorical), list of strings or number."""

    model_config = ConfigDict(extra="forbid")

    item_id: str = Field(min_length=1, max_length=MAX_ID_LEN)
    features: dict[str, Any] = Field(
        default_factory=dict, description='e.g. {"genre": ["a", "b"], "category": "x", "price": 1.5}')


class ItemsAccepted(BaseModel):
    accepted: int
    pending: int


_ITEMS = TypeAdapter(Annotated[list[ItemIn], Field(min_length=1, max_length=MAX_ITEMS_PER_REQUEST)])


def get_catalog_updates(request: Request) -> CatalogUpdates:
    updates: CatalogUpdates | None = getattr(request.app.state, "catalog_updates", None)
    if updates is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "catalog updates are not configured")
    return updates


def get_item_schema(request: Request) -> Schema | None:
    """Feature names and kinds of the loaded version's catalog; None when nothing is loaded."""
    rec = getattr(request.app.state, "recommender", None)
    return None if rec is None else schema_from_catalog(rec.v.item_features)


CatalogUpdatesDep = Annotated[CatalogUpdates, Depends(get_catalog_updates)]
ItemSchemaDep = Annotated[Schema | None, Depends(get_item_schema)]


@router.put("/items", response_model=ItemsAccepted, status_code=status.HTTP_202_ACCEPTED,
            openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {
                "anyOf": [{"$ref": "#/components/schemas/ItemIn"},
                          {"type": "array", "items": {"$ref": "#/components/schemas/ItemIn"},
                           "maxItems": MAX_ITEMS_PER_REQUEST}]}}}}})
def put_items(body: Annotated[Any, Body()], updates: CatalogUpdatesDep, schema: ItemSchemaDep,
              _auth: ApiKeyDep) -> ItemsAccepted:
    many = isinstance(body, list)
    parsed = _parse(body, many)
    items: list[ItemUpdate] = []
    for i, item in enumerate(parsed):
        try:
            items.append(validate_item(item.model_dump(), schema))
        except ItemError as exc:
            loc = ("body", i, *exc.loc) if many else ("body", *exc.loc)
            raise RequestValidationError([{"type": "value_error", "loc": loc, "msg": exc.reason,
                                           "input": item.model_dump()}]) from None
    try:
        pending = updates.put(items)
    except StoreError as exc:
        logger.warning("could not record %d catalog updates: %s", len(items), exc)
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "catalog updates unavailable; retry later") from None
    return ItemsAccepted(accepted=len(items), pending=pending)


def _parse(body: Any, many: bool) -> list[ItemIn]:
    """Validate as a list when it is one, else as one item, so a 422's loc is the real field
    (body.1.item_id), not one entry per union member."""
    try:
        return _ITEMS.validate_python(body) if many else [ItemIn.model_validate(body)]
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]) from None
