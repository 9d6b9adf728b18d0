"""Bodies json.loads accepts but the API cannot answer (issue 23, finding 2): non-finite
numbers, lone surrogates, deep nesting. Each is a 422 naming the field on the fast path and on
FastAPI's routes alike, a 401 first where the route needs a key the client did not send, and
the 422 always renders (service/strict_json.py, service/api/strict.py, service/fast_path.py).

On main each of these answered 500: rendering the 422 (which echoed `input`) or the answer
failed on the NaN / surrogate, and the fast path let RecursionError escape.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.api.deps import get_settings, get_store
from service.core.config import Settings
from service.main import create_app
from tests.service.test_api import API_KEY, artifacts_root, catalog  # noqa: F401  (module fixtures)

READ_KEY = "read-key"
DEEP = b"[" * 100_000
# (raw body, the loc its 422 names)
BAD_RECOMMEND: list[tuple[bytes, list[object]]] = [
    (b'{"history":["1"],"k":1e400}', ["body", "k"]),
    (b'{"history":["1"],"k":-1e400}', ["body", "k"]),
    (b'{"history":["1"],"k":NaN}', ["body", "k"]),
    (b'{"history":["1"],"k":Infinity}', ["body", "k"]),
    (b'{"history":["1","\\ud800"]}', ["body", "history", 1]),
    (b'{"history":["1"],"exclude":["a\\udfffb"]}', ["body", "exclude", 0]),
    (b'{"history":["1"],"filters":{"\\ud800":["x"]}}', ["body", "filters", "\ud800".encode("utf-8", "backslashreplace")
                                                        .decode()]),
    (DEEP, ["body"]),
    (b'{"history":' + b"[" * 40 + b"]" * 40 + b"}", ["body"]),
]


@pytest.fixture(scope="module")
def app(artifacts_root: Path) -> Iterator[FastAPI]:  # noqa: F811
    a = create_app(Settings(artifacts=artifacts_root, api_key=API_KEY, read_key=READ_KEY, reload_poll_s=0))
    with TestClient(a):
        yield a


def _post(app: FastAPI, path: str, body: bytes, key: str | None = None, method: str = "POST",
          fastapi_only: bool = False) -> tuple[int, object]:
    """Raw body (httpx cannot encode a lone surrogate as JSON); fastapi_only: a dependency
    override, which sends every request past the fast path to the route."""
    headers = {"content-type": "application/json", **({"x-api-key": key} if key else {})}
    if fastapi_only:
        app.dependency_overrides[get_settings] = lambda: app.state.settings
    try:
        r = TestClient(app, raise_server_exceptions=False).request(method, path, content=body, headers=headers)
    finally:
        app.dependency_overrides.clear()
    return r.status_code, (r.json() if r.content else None)


@pytest.mark.parametrize("fastapi_only", [False, True], ids=["fast_path", "route"])
@pytest.mark.parametrize(("body", "loc"), BAD_RECOMMEND, ids=[str(i) for i in range(len(BAD_RECOMMEND))])
def test_hostile_recommend_bodies_are_422_naming_the_field(app: FastAPI, body: bytes, loc: list[object],
                                                          fastapi_only: bool) -> None:
    status, out = _post(app, "/v1/recommend", body, fastapi_only=fastapi_only)
    assert status == 422, out
    assert isinstance(out, dict) and out["detail"][0]["loc"] == loc, out
    batch = b'{"requests":[' + body + b"]}"
    status, out = _post(app, "/v1/recommend/batch", batch)
    assert status == 422, out


@pytest.mark.parametrize("fastapi_only", [False, True], ids=["fast_path", "route"])
def test_no_key_and_a_bad_body_is_401_where_the_key_is_needed(app: FastAPI, fastapi_only: bool) -> None:
    for body in (b'{"user_id":"\\ud800"}', b'{"user_id":"u1","k":1e400}', b'{"user_id":"u1","k":NaN}'):
        assert _post(app, "/v1/recommend", body, fastapi_only=fastapi_only)[0] == 401
        assert _post(app, "/v1/recommend/batch", b'{"requests":[' + body + b"]}")[0] == 401
        status, out = _post(app, "/v1/recommend", body, key=READ_KEY, fastapi_only=fastapi_only)
        assert status == 422 and isinstance(out, dict) and out["detail"][0]["loc"][0] == "body"
    # an anonymous history request needs no key: its bad body is described
    assert _post(app, "/v1/recommend", b'{"history":["\\ud800"]}')[0] == 422
    for path, method, body in (("/v1/events", "POST", b'{"user_id":"\\ud800","item_id":"1"}'),
                               ("/v1/events", "POST", b'[{"user_id":"u","item_id":"1","timestamp":1e400}]'),
                               ("/v1/events", "POST", DEEP),
                               ("/v1/items", "PUT", b'{"item_id":"x","features":{"price":NaN}}')):
        assert _post(app, path, body, method=method)[0] == 401
        status, out = _post(app, path, body, key=API_KEY, method=method)
        assert status == 422 and isinstance(out, dict) and out["detail"][0]["loc"][0] == "body", out


def test_every_422_renders_and_echoes_only_small_inputs(app: FastAPI, catalog: list[str]) -> None:  # noqa: F811
    too_long = json.dumps({"history": ["x" * 200] * 1001}).encode()
    status, out = _post(app, "/v1/recommend", too_long)
    assert status == 422 and isinstance(out, dict)
    assert out["detail"][0]["loc"] == ["body", "history"] and "input" not in out["detail"][0]
    status, out = _post(app, "/v1/recommend", b'{"history":["1"],"k":0}')
    assert status == 422 and isinstance(out, dict) and out["detail"][0]["input"] == 0


def test_a_valid_body_still_serves(app: FastAPI, catalog: list[str]) -> None:  # noqa: F811
    body = json.dumps({"history": catalog[:3], "k": 3, "filters": {}, "exclude": ["\U0001f600"]}).encode()
    for fastapi_only in (False, True):
        status, out = _post(app, "/v1/recommend", body, fastapi_only=fastapi_only)
        assert status == 200 and isinstance(out, dict) and len(out["items"]) == 3
    # a surrogate pair is one character, not a lone surrogate
    assert _post(app, "/v1/recommend", b'{"history":["\\ud83d\\ude00"],"k":2}')[0] == 200


def test_an_escaping_exception_is_a_500_with_a_bounded_log(app: FastAPI, caplog: pytest.LogCaptureFixture) -> None:
    secret = "BODY-" + "x" * 1_000_000

    def broken() -> None:
        raise RuntimeError(secret)

    app.dependency_overrides[get_store] = broken
    try:
        with caplog.at_level(logging.ERROR):
            r = TestClient(app, raise_server_exceptions=False).post(
                "/v1/events", json={"user_id": "u", "item_id": "1"}, headers={"x-api-key": API_KEY})
    finally:
        app.dependency_overrides.clear()
    assert r.status_code == 500 and r.json() == {"detail": "internal error"}
    logged = "".join(rec.getMessage() for rec in caplog.records)
    assert "RuntimeError" in logged and 0 < len(logged) < 8_000


def test_strict_loads_unit() -> None:
    from service.strict_json import MAX_DEPTH, BodyError, loads, nesting_depth  # here: the HTTP tests run on main

    assert loads(b'{"a":[1,2.5,{"b":"\\ud83d\\ude00"}]}') == {"a": [1, 2.5, {"b": "\U0001f600"}]}
    assert nesting_depth(b'["[[[[", {"a": [[]]}]') == 4  # brackets in strings do not count
    assert nesting_depth(b"[" * (MAX_DEPTH + 5)) == MAX_DEPTH + 5
    loads(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH)  # at the limit: accepted
    for raw, loc in ((b'{"a":[1,{"b":1e999}]}', ("body", "a", 1, "b")), (b'["\\udc00"]', ("body", 0)),
                     (b"\xff", ("body",)), (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), ("body",)),
                     (b'{"k":' + b"9" * 5000 + b"}", ("body",)), (b"[1,", ("body",))):
        with pytest.raises(BodyError) as info:
            loads(raw)
        assert info.value.loc == loc, (raw[:40], info.value)
