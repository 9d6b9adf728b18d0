"""The OpenAPI document: FastAPI's, completed with what it cannot see.

- POST /v1/events and PUT /v1/items take "one object or a list" (validated by hand for clean
  422 locations, service/api/deps.one_or_many): their EventIn / ItemIn schemas are added to
  components here (FastAPI only lists models that a route declares).
- What a caller reads: summaries, descriptions, request and response examples, and that a read
  key is needed only when one is configured (service/api/docs.py).
- Request filters and item features are only valid for names (and filter values) the served
  catalog has. Once a version is loaded the document says so (an enum of names and values per
  served version), so a request the schema calls valid is one the service accepts.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from service.api import docs
from service.schemas import ID_SCHEMA, MAX_FILTER_VALUES, MAX_FILTERS

REF = "#/components/schemas/{model}"
MAX_ENUM = 10_000  # larger vocabularies are described by the generic id schema


def _add_model(schemas: dict[str, Any], model: type[BaseModel]) -> None:
    schema = model.model_json_schema(ref_template=REF)
    for name, sub in schema.pop("$defs", {}).items():
        schemas.setdefault(name, sub)
    schemas[model.__name__] = schema


def _filters_schema(vocab: dict[str, list[str]], filterable: list[str]) -> dict[str, Any]:
    props: dict[str, Any] = {}
    for name in filterable:
        values = vocab.get(name, [])
        one: dict[str, Any] = {"enum": values} if 0 < len(values) <= MAX_ENUM else dict(ID_SCHEMA)
        props[name] = {"anyOf": [one, {"type": "array", "items": one, "minItems": 1, "maxItems": MAX_FILTER_VALUES}]}
    return {"type": "object", "properties": props, "additionalProperties": False, "maxProperties": MAX_FILTERS}


def _features_schema(kinds: Mapping[str, str]) -> dict[str, Any]:
    from service.catalog_updates import MAX_VALUES

    by_kind = {"categorical": dict(ID_SCHEMA), "multi": {"type": "array", "items": ID_SCHEMA, "maxItems": MAX_VALUES},
               "numeric": {"type": "number"}}
    return {"type": "object", "properties": {name: by_kind[kind] for name, kind in kinds.items()},
            "additionalProperties": False}


def install(app: FastAPI, models: list[type[BaseModel]], version_of: Callable[[], Any]) -> None:
    """Replace app.openapi; `version_of()` is the served LoadedVersion or None."""
    generic: list[dict[str, Any]] = []  # the document without a served version, built once
    served: dict[str, dict[str, Any]] = {}  # version -> its document (only the latest is kept)

    def base() -> dict[str, Any]:
        if not generic:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                _add_model(schemas, model)
            docs.apply(doc)
            generic.append(doc)
        return generic[0]

    def openapi() -> dict[str, Any]:
        v = version_of()
        if v is None:
            return base()
        if v.version not in served:
            doc = copy.deepcopy(base())
            schemas = doc["components"]["schemas"]
            filters = _filters_schema(v.item_features.vocab, v.item_features.filterable())
            schemas["RecommendRequest"]["properties"]["filters"] = {"anyOf": [filters, {"type": "null"}]}
            if "ItemIn" in schemas:
                schemas["ItemIn"]["properties"]["features"] = _features_schema(v.item_features.schema())
            served.clear()
            served[v.version] = doc
        return served[v.version]

    app.openapi = openapi  # type: ignore[method-assign]
