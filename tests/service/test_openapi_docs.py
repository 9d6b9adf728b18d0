"""The OpenAPI document as a caller reads it (issue 24): the keys are security schemes (not header
parameters), every operation has a summary and a user-facing description, and every request and
response example is valid against the document's own schema. The generic document (no version
loaded) is built in-process; the served one is fuzzed by tests/e2e/test_openapi_contract.py and
fed to a client generator by tests/e2e/test_surface.py."""

from __future__ import annotations

import re
from typing import Any

import jsonschema
import pytest

from service.api.docs import OPERATIONS, OPTIONAL_KEY
from service.main import create_app

DOC: dict[str, Any] = create_app().openapi()
# words of the implementation a caller should not need (the issue quoted "JSON bytes built on the compute thread")
INTERNALS = re.compile(r"compute thread|JSON bytes|fast path|FastAPI|pydantic|app\.state|\.py\b|lifespan|ASGI", re.I)


def _schema(schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator({**schema, "components": DOC["components"]})


def _operations() -> list[tuple[str, str, dict[str, Any]]]:
    return [(method, path, op) for path, ops in DOC["paths"].items() for method, op in ops.items()]


def test_api_keys_are_security_schemes_not_parameters() -> None:
    schemes = DOC["components"]["securitySchemes"]
    assert schemes["ApiKey"] == {"type": "apiKey", "in": "header", "name": "X-API-Key",
                                 "description": schemes["ApiKey"]["description"]}
    assert schemes["ReadKey"]["in"] == "header" and schemes["ReadKey"]["name"] == "X-API-Key"
    for method, path, op in _operations():
        assert not any(p["name"].lower() == "x-api-key" for p in op.get("parameters", [])), (method, path)
    writes = [("post", "/v1/events"), ("put", "/v1/items"), ("post", "/v1/admin/reload")]
    assert all(DOC["paths"][p][m]["security"] == [{"ApiKey": []}] for m, p in writes)
    # a read key is needed only when the service has one: "no key" is an alternative
    assert all(DOC["paths"][p][m]["security"] == [{"ReadKey": []}, {}] for m, p in OPTIONAL_KEY)


@pytest.mark.parametrize(("method", "path"), sorted(OPERATIONS))
def test_every_operation_is_described_for_its_callers(method: str, path: str) -> None:
    op = DOC["paths"][path][method]
    assert op["summary"] and len(op["description"]) > 20
    assert op["operationId"] == re.sub(r"\W", "", op["operationId"])  # plain names for generated clients
    texts = [op["description"], *(r["description"] for r in op["responses"].values())]
    assert not [t for t in texts if INTERNALS.search(t)]


def test_every_example_is_valid_against_its_schema() -> None:
    checked = 0
    for method, path, op in _operations():
        body = op.get("requestBody", {}).get("content", {}).get("application/json", {})
        for name, ex in body.get("examples", {}).items():
            _schema(body["schema"]).validate(ex["value"])
            checked += 1
        for status, answer in op["responses"].items():
            content = answer.get("content", {}).get("application/json", {})
            for name, ex in content.get("examples", {}).items():
                _schema(content["schema"]).validate(ex["value"])
                checked += 1
    assert checked == sum(len(spec.get("request", {})) + len(spec.get("response", {})) for spec in OPERATIONS.values())


def test_schema_descriptions_speak_to_callers() -> None:
    texts = [DOC["info"]["description"]]
    for schema in DOC["components"]["schemas"].values():
        texts.append(schema.get("description", ""))
        texts += [p.get("description", "") for p in schema.get("properties", {}).values()]
    assert not [t for t in texts if INTERNALS.search(t)]
