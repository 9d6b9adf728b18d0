"""service/recommend.py, the recommend use case, called directly (no HTTP): where the history
comes from, what a store failure and a refused field give, the budgets, the metrics it records.
The routes and the fast path that call it: tests/service/test_api.py, test_fast_path.py."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.artifacts import load_current
from service.metrics import Metrics
from service.pipeline import Recommender
from service.recommend import (STORE_FLAG, InvalidRequest, RecommendContext, as_json, recommend,
                               recommend_batch)
from service.schemas import RecommendRequest, encode_json
from service.stores import Event, InMemoryStore, StoreUnavailable
from tests.service.test_api import artifacts_root, catalog  # noqa: F401  (module fixtures)


class DownStore(InMemoryStore):
    """A store whose reads fail as an unreachable Redis does."""

    def get_history(self, user_id: str, limit: int | None = None) -> list[str]:
        raise StoreUnavailable("redis unavailable during get_history: connection refused")

    def get_histories(self, user_ids: Iterable[str]) -> dict[str, list[str]]:
        raise StoreUnavailable("redis unavailable during get_histories: connection refused")


class RefusingStore(InMemoryStore):
    """A store that refuses an id the request schema let through."""

    def get_history(self, user_id: str, limit: int | None = None) -> list[str]:
        raise ValueError(f"user_id {user_id!r} is refused")

    def get_histories(self, user_ids: Iterable[str]) -> dict[str, list[str]]:
        raise ValueError("user_id 'b' is refused")


class SlowStore(InMemoryStore):
    def get_history(self, user_id: str, limit: int | None = None) -> list[str]:
        time.sleep(0.02)
        return super().get_history(user_id, limit)


@pytest.fixture(scope="module")
def rec(artifacts_root: Path) -> Recommender:  # noqa: F811
    return Recommender(load_current(artifacts_root))


@pytest.fixture()
def store(catalog: list[str]) -> InMemoryStore:  # noqa: F811
    s = InMemoryStore()
    s.append_events([Event("alice", item, float(t)) for t, item in enumerate(catalog[10:14])])
    return s


def _ctx(rec: Recommender, store: InMemoryStore, timeout_ms: float = 60_000.0) -> RecommendContext:
    return RecommendContext(rec, store, Metrics(), timeout_ms)


def _ids(out: dict[str, Any]) -> list[str]:
    return [it["item_id"] for it in out["items"]]


def _count(ctx: RecommendContext, name: str, labels: dict[str, str] | None = None) -> float:
    return ctx.metrics.registry.get_sample_value(name, labels or {}) or 0.0


# --- where the history comes from ---


def test_the_request_history_wins_over_the_stored_one(rec: Recommender, store: InMemoryStore,
                                                      catalog: list[str]) -> None:  # noqa: F811
    ctx = _ctx(rec, store)
    out = recommend(ctx, RecommendRequest(user_id="alice", history=catalog[:4], k=5))
    assert _ids(out) == [it.item_id for it in rec.recommend(catalog[:4], 5, explain=False).items]
    assert out["served_by"] == "rerank"


def test_the_stored_history_of_user_id_is_used_without_a_request_history(rec: Recommender, store: InMemoryStore,
                                                                        catalog: list[str]) -> None:  # noqa: F811
    out = recommend(_ctx(rec, store), RecommendRequest(user_id="alice", k=5))
    assert store.get_history("alice") == catalog[10:14]
    assert _ids(out) == [it.item_id for it in rec.recommend(catalog[10:14], 5, explain=False).items]
    assert not set(_ids(out)) & set(catalog[10:14]) and out["served_by"] == "rerank"


def test_no_history_anywhere_serves_popularity(rec: Recommender, store: InMemoryStore) -> None:
    popular = [str(rec.v.item_ids[i]) for i in np.argsort(-rec.v.popularity[1:], kind="stable")[:5] + 1]
    ctx = _ctx(rec, store)
    for req in (RecommendRequest(k=5), RecommendRequest(user_id="nobody", k=5), RecommendRequest(history=[], k=5)):
        out = recommend(ctx, req)
        assert _ids(out) == popular and out["served_by"] == "popularity", req
        assert all("launcher" not in it for it in out["items"]) and out["scored_by"] == "popularity"
    assert _count(ctx, "recsys_fallbacks_total", {"reason": "no_history"}) == 3


def test_a_store_that_is_down_serves_without_the_stored_history_and_says_so(rec: Recommender,
                                                                            catalog: list[str]) -> None:  # noqa: F811
    ctx = _ctx(rec, DownStore())
    out = recommend(ctx, RecommendRequest(user_id="alice", k=5))
    assert out["served_by"] == f"popularity;{STORE_FLAG}" == "popularity;store_unavailable"
    assert _ids(out) == _ids(recommend(ctx, RecommendRequest(k=5)))
    assert _count(ctx, "recsys_fallbacks_total", {"reason": "store_unavailable"}) == 1
    # a request history needs no store: no flag
    assert recommend(ctx, RecommendRequest(user_id="alice", history=catalog[:3], k=5))["served_by"] == "rerank"


def test_an_id_the_store_refuses_is_an_invalid_request_naming_the_field(rec: Recommender) -> None:
    ctx = _ctx(rec, RefusingStore())
    with pytest.raises(InvalidRequest) as err:
        recommend(ctx, RecommendRequest(user_id="a", k=5))
    assert err.value.loc == ("user_id",) and err.value.message == "user_id 'a' is refused"
    assert str(err.value) == "user_id: user_id 'a' is refused"
    with pytest.raises(InvalidRequest) as err:
        recommend_batch(ctx, [RecommendRequest(k=1), RecommendRequest(user_id="b")], time.perf_counter())
    assert err.value.loc == ("requests",) and err.value.message == "user_id 'b' is refused"
    assert _count(ctx, "recsys_recommendations_total", {"stage": "popularity"}) == 0  # nothing was served


# --- filters ---


def test_a_filter_the_version_cannot_apply_names_its_field(rec: Recommender, store: InMemoryStore,
                                                           catalog: list[str]) -> None:  # noqa: F811
    ctx = _ctx(rec, store)
    with pytest.raises(InvalidRequest) as err:
        recommend(ctx, RecommendRequest(history=catalog[:3], filters={"nope": ["x"]}))
    assert err.value.loc == ("filters", "nope") and err.value.message.startswith("unknown item feature; filterable:")
    good = RecommendRequest(user_id="alice", k=2)
    with pytest.raises(InvalidRequest) as err:
        recommend_batch(ctx, [good, RecommendRequest(k=2, filters={"category": ["no-such-value"]})],
                        time.perf_counter())
    assert err.value.loc == ("requests", 1, "filters", "category")
    assert err.value.message.startswith("unknown value(s) ['no-such-value']")
    assert _count(ctx, "recsys_recommendations_total", {"stage": "rerank"}) == 0  # checked before any is served


def test_filters_keep_only_passing_items(rec: Recommender, store: InMemoryStore, catalog: list[str]) -> None:  # noqa: F811
    v = rec.v
    wanted = v.item_features.vocab["category"][int(v.item_features.categorical["category"][1]) - 1]
    passing = {str(v.item_ids[i]) for i in np.flatnonzero(rec.filter_mask({"category": [wanted]}))}
    out = recommend(_ctx(rec, store), RecommendRequest(history=catalog[:3], k=5, filters={"category": wanted}))
    assert _ids(out) and set(_ids(out)) <= passing - set(catalog[:3])


# --- budgets ---


def test_a_spent_budget_serves_the_retrieval_order(rec: Recommender, store: InMemoryStore,
                                                   catalog: list[str]) -> None:  # noqa: F811
    ctx = _ctx(rec, store, timeout_ms=0.0)
    out = recommend(ctx, RecommendRequest(history=catalog[:3], k=5))
    assert out["served_by"] == "retrieval;timeout" and len(out["items"]) == 5
    assert "prerank" not in out["timings_ms"]
    assert _count(ctx, "recsys_fallbacks_total", {"reason": "timeout"}) == 1


def test_the_store_read_counts_against_the_budget(rec: Recommender, catalog: list[str]) -> None:  # noqa: F811
    slow = SlowStore()
    slow.append_events([Event("alice", catalog[0], 0.0)])
    out = recommend(_ctx(rec, slow, timeout_ms=10.0), RecommendRequest(user_id="alice", k=5))  # the read takes 20 ms
    assert out["served_by"] == "retrieval;timeout" and out["timings_ms"]["store"] >= 20.0
    assert recommend(_ctx(rec, slow, timeout_ms=60_000.0), RecommendRequest(user_id="alice", k=5))["served_by"] == "rerank"


def test_a_batch_shares_one_budget_then_serves_popularity(rec: Recommender, store: InMemoryStore,
                                                          catalog: list[str]) -> None:  # noqa: F811
    ctx = _ctx(rec, store, timeout_ms=100.0)
    reqs = [RecommendRequest(history=catalog[:3], k=4, exclude=catalog[3:5]), RecommendRequest(user_id="alice", k=4)]
    out = recommend_batch(ctx, reqs, time.perf_counter() - 1.0)  # arrived 1 s ago: the 100 ms are spent
    assert [r["served_by"] for r in out["results"]] == ["popularity;timeout"] * 2
    assert [list(r["timings_ms"]) for r in out["results"]] == [["store", "popularity", "total"]] * 2
    popular = [str(rec.v.item_ids[i]) for i in np.argsort(-rec.v.popularity[1:], kind="stable") + 1]
    assert _ids(out["results"][0]) == [i for i in popular if i not in catalog[:5]][:4]  # no seen / excluded item
    assert _ids(out["results"][1]) == [i for i in popular if i not in catalog[10:14]][:4]  # the stored history's
    assert _count(ctx, "recsys_fallbacks_total", {"reason": "timeout"}) == 2
    roomy = _ctx(rec, store)
    fresh = recommend_batch(roomy, reqs, time.perf_counter())
    assert [r["served_by"] for r in fresh["results"]] == ["rerank", "rerank"]
    assert _ids(fresh["results"][1]) == _ids(recommend(roomy, RecommendRequest(user_id="alice", k=4)))


def test_a_batch_flags_only_the_requests_that_needed_the_store(rec: Recommender, catalog: list[str]) -> None:  # noqa: F811
    reqs = [RecommendRequest(history=catalog[:3], k=2), RecommendRequest(user_id="alice", k=2), RecommendRequest(k=2)]
    out = recommend_batch(_ctx(rec, DownStore()), reqs, time.perf_counter())
    assert [r["served_by"] for r in out["results"]] == ["rerank", "popularity;store_unavailable", "popularity"]


# --- the answer ---


def test_the_answer_is_the_response_model_with_store_and_total_timings(rec: Recommender, store: InMemoryStore,
                                                                       catalog: list[str]) -> None:  # noqa: F811
    ctx = _ctx(rec, store)
    out = recommend(ctx, RecommendRequest(history=catalog[:3] + ["unknown-1"], k=3, explain=True))
    assert list(out) == ["items", "model_version", "served_by", "scored_by", "timings_ms", "unknown_items",
                         "request_id"]
    assert out["model_version"] == "v1" and out["unknown_items"] == 1 and [it["rank"] for it in out["items"]] == [1, 2, 3]
    assert all(set(it["stages"]) == {"retrieval", "prerank", "rerank"} for it in out["items"])
    timings = out["timings_ms"]
    assert list(timings)[0] == "store" and list(timings)[-1] == "total" and timings["total"] >= timings["store"]
    assert _count(ctx, "recsys_recommendations_total", {"stage": "rerank"}) == 1
    assert _count(ctx, "recsys_unknown_history_items_total") == 1
    assert _count(ctx, "recsys_stage_duration_seconds_count", {"stage": "store"}) == 1
    req = RecommendRequest(history=catalog[:3], k=3)
    body = as_json(recommend, ctx, req)  # what the entry points send
    assert isinstance(body, bytes) and body.startswith(b'{"items":[{"item_id":')
    again = recommend(ctx, req)
    aside = {"timings_ms": None, "request_id": None}  # new each call (outside a request: a fresh id)
    assert json.loads(body) | aside == again | aside
    assert encode_json(again) == json.dumps(again, separators=(",", ":"), ensure_ascii=False).encode()


def test_the_use_case_sits_below_the_routes_and_both_entry_points_call_it() -> None:
    from tests.test_import_graph import GRAPH

    assert not {m for m in GRAPH["service.recommend"] if m.startswith("service.api")}
    assert not {m for m in GRAPH["service.fast_path"] if m.startswith("service.api.routes")}
    assert "service.recommend" in GRAPH["service.fast_path"] & GRAPH["service.api.routes.recommend"]
