"""Pending catalog updates (service/catalog_updates.py) on both backends, and PUT /v1/items."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.api.routes import items as items_route
from service.catalog_updates import (
    MAX_VALUES,
    CatalogUpdates,
    FileCatalogUpdates,
    ItemError,
    RedisCatalogUpdates,
    make_catalog_updates,
    validate_item,
)
from service.contract.catalog import FeatureKind, ItemFeatures, ItemUpdate
from service.core.config import Settings
from service.contract.layout import PENDING_ITEMS

SCHEMA: dict[str, FeatureKind] = {"category": "categorical", "tags": "multi", "price": "numeric"}


@pytest.fixture(params=["file", "redis"])
def updates(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CatalogUpdates]:
    if request.param == "file":
        backend: CatalogUpdates = FileCatalogUpdates(tmp_path / PENDING_ITEMS)
    else:
        url = request.getfixturevalue("redis_url")
        backend = RedisCatalogUpdates(url, key=f"test:{uuid.uuid4().hex}:catalog")  # shared server: own key
    yield backend
    backend.close()


def item(item_id: str, **features: object) -> ItemUpdate:
    return validate_item({"item_id": item_id, "features": features}, SCHEMA)


def test_validate_item_accepts_each_kind() -> None:
    got = validate_item({"item_id": "i1", "features": {"category": "x", "tags": ["a", "b"], "price": 2}}, SCHEMA)
    assert got == ItemUpdate("i1", {"category": "x", "tags": ["a", "b"], "price": 2.0})
    assert isinstance(got.features["price"], float)
    assert validate_item({"item_id": "i2"}).features == {}  # features default to none (all unknown)


@pytest.mark.parametrize(
    ("obj", "loc", "message"),
    [
        ({"item_id": "i", "features": {"colour": "red"}}, ("features", "colour"),
         "unknown feature (known: category, price, tags)"),
        ({"item_id": "i", "features": {"price": "cheap"}}, ("features", "price"),
         "must be a number (numeric), got a string"),
        ({"item_id": "i", "features": {"category": ["x"]}}, ("features", "category"),
         "must be a string (categorical), got a list"),
        ({"item_id": "i", "features": {"tags": "a"}}, ("features", "tags"), "must be a list of strings (multi), got a string"),
        ({"item_id": "i", "features": {"tags": ["a", 3]}}, ("features", "tags", "1"), "must be a string, got int"),
        ({"item_id": "i", "features": {"tags": ["a"] * (MAX_VALUES + 1)}}, ("features", "tags"),
         f"more than {MAX_VALUES} values"),
        ({"item_id": "i", "features": {"price": float("nan")}}, ("features", "price"), "must be a finite number"),
        ({"item_id": "i", "features": {"price": True}}, ("features", "price"), "got bool"),
        ({"item_id": "i", "features": {"category": "a\x00b"}}, ("features", "category"), "control"),
        ({"item_id": "", "features": {}}, ("item_id",), "must not be empty"),
        ({"item_id": 7}, ("item_id",), "must be a string, got int"),
        ({"item_id": "i", "extra": 1}, ("extra",), "unknown field"),
        ({"item_id": "i", "features": [1]}, ("features",), "must be an object, got list"),
    ],
)
def test_validate_item_names_the_field(obj: dict, loc: tuple[str, ...], message: str) -> None:
    with pytest.raises(ItemError) as exc:
        validate_item(obj, SCHEMA)
    assert exc.value.loc == loc
    assert message in exc.value.reason
    assert str(exc.value).startswith(".".join(loc) + ": ")


def test_without_a_schema_any_kind_is_accepted_but_values_are_checked() -> None:
    assert validate_item({"item_id": "i", "features": {"anything": ["v"]}}).features == {"anything": ["v"]}
    with pytest.raises(ItemError, match=r"features.x: must be a finite number"):
        validate_item({"item_id": "i", "features": {"x": float("inf")}})


def test_put_counts_items_and_the_latest_update_wins(updates: CatalogUpdates) -> None:
    assert updates.count() == 0 and updates.snapshot().items == ()
    assert updates.put([item("a", category="x"), item("b", price=1.0)]) == 2
    assert updates.put([item("a", category="y", tags=["t"])]) == 2  # same item: still 2 pending
    snap = updates.snapshot()
    assert [u.item_id for u in snap.items] == ["b", "a"]  # ordered by each item's latest update
    assert snap.items[1] == ItemUpdate("a", {"category": "y", "tags": ["t"]})
    assert updates.count() == 2


def test_snapshot_keeps_the_order_of_a_batch(updates: CatalogUpdates) -> None:
    updates.put([item("z"), item("a"), item("m")])  # one request: same arrival time
    assert [u.item_id for u in updates.snapshot().items] == ["z", "a", "m"]


def test_clear_removes_exactly_what_was_consumed(updates: CatalogUpdates) -> None:
    updates.put([item("a", category="x"), item("b", category="x")])
    snap = updates.snapshot()
    # arriving while a re-index runs: a newer update of a consumed item and a new item
    updates.put([item("a", category="z"), item("c", category="x")])
    updates.clear(snap)
    left = updates.snapshot()
    assert {u.item_id: u.features for u in left.items} == {"a": {"category": "z"}, "c": {"category": "x"}}
    assert updates.count() == 2
    updates.clear(left)
    assert updates.count() == 0 and updates.snapshot().entries == ()


def test_make_catalog_updates_picks_the_backend(tmp_path: Path) -> None:
    file_backend = make_catalog_updates(None, tmp_path)
    assert isinstance(file_backend, FileCatalogUpdates) and file_backend.path == tmp_path / PENDING_ITEMS
    assert isinstance(make_catalog_updates("redis://127.0.0.1:1/0", tmp_path), RedisCatalogUpdates)


def test_file_backend_appends_one_line_per_update(tmp_path: Path) -> None:
    backend = FileCatalogUpdates(tmp_path / "p.jsonl")
    backend.put([item("a"), item("b")])
    backend.put([item("a", price=3.0)])
    lines = (tmp_path / "p.jsonl").read_text().splitlines()
    assert len(lines) == 3 and '"price": 3.0' in lines[2]


# --- PUT /v1/items ---


def make_client(tmp_path: Path, api_key: str | None = None, features: ItemFeatures | None = None,
                configured: bool = True) -> tuple[TestClient, FileCatalogUpdates]:
    app = FastAPI()
    app.include_router(items_route.router)
    backend = FileCatalogUpdates(tmp_path / PENDING_ITEMS)
    app.state.settings = Settings(api_key=api_key, artifacts=tmp_path, allow_anonymous_writes=api_key is None)
    app.state.catalog_updates = backend if configured else None
    app.state.recommender = None if features is None else SimpleNamespace(v=SimpleNamespace(item_features=features))
    return TestClient(app), backend


def test_put_one_item_or_a_list(tmp_path: Path) -> None:
    client, backend = make_client(tmp_path)
    r = client.put("/v1/items", json={"item_id": "n1", "features": {"category": "x", "price": 2}})
    assert r.status_code == 202 and r.json() == {"accepted": 1, "pending": 1}
    r = client.put("/v1/items", json=[{"item_id": "n2"}, {"item_id": "n1", "features": {"tags": ["a"]}}])
    assert r.status_code == 202 and r.json() == {"accepted": 2, "pending": 2}
    assert {u.item_id: u.features for u in backend.snapshot().items} == {"n2": {}, "n1": {"tags": ["a"]}}


def test_put_requires_the_api_key_when_configured(tmp_path: Path) -> None:
    client, backend = make_client(tmp_path, api_key="s3cret")
    assert client.put("/v1/items", json={"item_id": "n1"}).status_code == 401
    assert client.put("/v1/items", json={"item_id": "n1"}, headers={"X-API-Key": "wrong"}).status_code == 401
    assert backend.count() == 0
    r = client.put("/v1/items", json={"item_id": "n1"}, headers={"X-API-Key": "s3cret"})
    assert r.status_code == 202


@pytest.mark.parametrize(
    ("body", "loc", "msg"),
    [
        ([{"item_id": "a"}, {"item_id": "b", "features": {"price": "cheap"}}], ["body", 1, "features", "price"],
         "must be a number (numeric), got a string"),
        ({"item_id": "a", "features": {"colour": "red"}}, ["body", "features", "colour"], "unknown feature"),
        ([{"item_id": "a"}, {"features": {}}], ["body", 1, "item_id"], "Field required"),
        ({"item_id": "a", "features": {"tags": ["x", None]}}, ["body", "features", "tags", "1"],
         "must be a string, got NoneType"),
        ([], ["body"], "at least 1 item"),
        ([{"item_id": "a"}] * 1001, ["body"], "at most 1000 items"),
    ],
)
def test_put_bad_input_is_422_naming_the_field(body: object, loc: list, msg: str, tmp_path: Path) -> None:
    client, backend = make_client(tmp_path, features=ItemFeatures(
        categorical={"category": np.zeros(1, np.int64)}, multi={"tags": np.zeros((1, 1), np.int64)},
        numeric={"price": np.zeros(1, np.float32)}, vocab={"category": [], "tags": []}))
    r = client.put("/v1/items", json=body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail[0]["loc"] == loc and msg in detail[0]["msg"], detail
    assert backend.count() == 0  # nothing of a bad batch is recorded


def test_put_without_configured_updates_is_503(tmp_path: Path) -> None:
    client, _ = make_client(tmp_path, configured=False)
    assert client.put("/v1/items", json={"item_id": "a"}).status_code == 503


def test_put_when_redis_is_down_is_503(tmp_path: Path) -> None:
    client, _ = make_client(tmp_path)
    client.app.state.catalog_updates = RedisCatalogUpdates("redis://127.0.0.1:1/0", socket_timeout=0.2)  # type: ignore[attr-defined]
    r = client.put("/v1/items", json={"item_id": "a"})
    assert r.status_code == 503 and "retry later" in r.json()["detail"]
