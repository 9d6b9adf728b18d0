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

from fastapi import APIRouter, Body, HTTPException, status
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, WithJsonSchema

from service.api.deps import ApiKeyDep, CatalogUpdatesDep, ItemSchemaDep, one_or_many, one_or_many_body
from service.api.strict import StrictJSONRoute
from service.api.errors import AUTH, BAD_BODY, NOT_LOADED
from service.catalog_updates import MAX_FEATURES, MAX_VALUES, ItemError, validate_item
from service.contract.catalog import ItemUpdate
from service.schemas import ID_SCHEMA, Id
from service.stores import StoreError

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["items"], route_class=StrictJSONRoute)

MAX_ITEMS_PER_REQUEST = 1000


class ItemIn(BaseModel):
    """One item's complete features: name -> string (categorical), list of strings or number."""

    model_config = ConfigDict(extra="forbid")

    item_id: Id
    features: Annotated[dict[str, Any], WithJsonSchema({
        "type": "object", "maxProperties": MAX_FEATURES, "propertyNames": ID_SCHEMA,
        "additionalProperties": {"anyOf": [ID_SCHEMA, {"type": "array", "items": ID_SCHEMA, "maxItems": MAX_VALUES},
                                           {"type": "number"}]}})] = Field(
        default_factory=dict, description='e.g. {"genre": ["a", "b"], "category": "x", "price": 1.5}; once a '
                                          'version is served, only its feature names and kinds')


class ItemsAccepted(BaseModel):
    accepted: int
    pending: int


_ITEMS = TypeAdapter(Annotated[list[ItemIn], Field(min_length=1, max_length=MAX_ITEMS_PER_REQUEST)])


@router.put("/items", response_model=ItemsAccepted, status_code=status.HTTP_202_ACCEPTED,
            openapi_extra=one_or_many_body(ItemIn, MAX_ITEMS_PER_REQUEST), responses={**BAD_BODY, **AUTH, **NOT_LOADED})
def put_items(body: Annotated[Any, Body()], updates: CatalogUpdatesDep, schema: ItemSchemaDep,
              _auth: ApiKeyDep) -> ItemsAccepted:
    many = isinstance(body, list)
    items: list[ItemUpdate] = []
    for i, item in enumerate(one_or_many(body, ItemIn, _ITEMS)):
        raw = item.model_dump()
        try:
            items.append(validate_item(raw, schema))
        except ItemError as exc:
            loc = ("body", i, *exc.loc) if many else ("body", *exc.loc)
            raise RequestValidationError([{"type": "value_error", "loc": loc, "msg": exc.reason,
                                           "input": raw}]) from None
    try:
        pending = updates.put(items)
    except StoreError as exc:
        logger.warning("could not record %d catalog updates: %s", len(items), exc)
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "catalog updates unavailable; retry later") from None
    return ItemsAccepted(accepted=len(items), pending=pending)
