"""The recommend use case, below its two entry points: the routes POST /v1/recommend and
/v1/recommend/batch (service/api/routes/recommend.py) and the ASGI fast path (service/fast_path.py).

History: the request's `history`, else the stored history of `user_id`, else none (popularity).
Store trouble never fails a request: it is served without the stored history and `served_by`
says so (`;store_unavailable`). A field the store or the loaded version refuses raises
InvalidRequest naming it; the entry points turn that into a 422.

Budget (RecommendContext.timeout_ms, RECSYS_TIMEOUT_MS): one request gets what the store read
left of it, and a stage not yet started when it is spent is skipped (`;timeout`, the previous
stage's order). A batch shares one budget that began when the HTTP request arrived: each request
gets what is left, and once it is spent the rest are served from popularity (`;timeout`).

Blocking (store read + pipeline): the entry points run these functions on the worker's compute
thread (service/compute.py).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ParamSpec

from service.core.logs import request_id as current_request_id
from service.experiments import Experiment
from service.interleave import team_draft
from service.metrics import Metrics
from service.online_log import ImpressionLog
from service.pipeline import FilterError, Recommender, RecommendResult
from service.schemas import RecommendRequest, encode_json, recommend_json
from service.stores import HistoryStore, StoreError

P = ParamSpec("P")
Loc = tuple[str | int, ...]

logger = logging.getLogger(__name__)

STORE_FLAG = "store_unavailable"


@dataclass(frozen=True)
class RecommendContext:
    """What a recommendation is served with; built per HTTP request (a hot swap replaces the
    recommender between requests)."""

    recommender: Recommender
    store: HistoryStore
    metrics: Metrics
    timeout_ms: float  # the budget of one HTTP request, a batch included
    impressions: ImpressionLog | None = None  # where served lists are recorded (None: not recorded)
    experiment: Experiment | None = None  # requests with a user_id are served by its arms


@dataclass
class History:
    """A request's resolved history: its item ids (oldest first), the flags it adds to
    `served_by` and the ms its store read took."""

    items: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    store_ms: float = 0.0


class InvalidRequest(ValueError):
    """A request field that passed the schema but that the store or the loaded version refuses;
    `loc` is its path inside the request body (e.g. ("requests", 1, "filters", "genre"))."""

    def __init__(self, loc: Loc, message: str) -> None:
        super().__init__(f"{'.'.join(map(str, loc))}: {message}")
        self.loc = loc
        self.message = message


def recommend(ctx: RecommendContext, req: RecommendRequest) -> dict[str, Any]:
    """Top-k for one request, as RecommendResponse's JSON-ready dict."""
    start = time.perf_counter()
    history = History()
    if req.history is not None:
        history.items = req.history
    elif req.user_id is not None:
        try:
            history.items = ctx.store.get_history(req.user_id)
        except ValueError as exc:  # an id pydantic lets through but the store refuses
            raise InvalidRequest(("user_id",), str(exc)) from None
        except StoreError as exc:
            logger.warning("history of %r unavailable, serving without it: %s", req.user_id, exc)
            history.flags.append(STORE_FLAG)
    history.store_ms = (time.perf_counter() - start) * 1000.0
    return _serve(ctx, req, history, (), _request_id())


def recommend_batch(ctx: RecommendContext, reqs: list[RecommendRequest], started: float) -> dict[str, Any]:
    """Every request of a batch, as RecommendBatchResponse's JSON-ready dict; stored histories
    are read in one store round trip. `started`: time.perf_counter() when the HTTP request
    arrived (the batch's budget began). Every request's filters are checked before any is served."""
    for i, r in enumerate(reqs):
        _check_filters(ctx.recommender, r, ("requests", i))
    t0 = time.perf_counter()
    stored, flags = _stored_histories(ctx.store, [r.user_id for r in reqs if r.history is None and r.user_id])
    store_ms = (time.perf_counter() - t0) * 1000.0
    results = []
    rid = _request_id()
    for i, r in enumerate(reqs):
        by_store = r.history is None and bool(r.user_id)
        history = History(r.history if r.history is not None else stored.get(r.user_id or "", []),
                          list(flags if by_store else []), store_ms)
        left_ms = ctx.timeout_ms - (time.perf_counter() - started) * 1000.0
        results.append(_serve(ctx, r, history, ("requests", i), f"{rid}-{i}", budget_ms=left_ms))
    return {"results": results}


def as_json(use_case: Callable[P, dict[str, Any]], *args: P.args, **kwargs: P.kwargs) -> bytes:
    """use_case(...)'s answer as the response body. The entry points run this on the compute
    thread, so the encoding stays off the event loop."""
    return encode_json(use_case(*args, **kwargs))


def _stored_histories(store: HistoryStore, user_ids: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    if not user_ids:
        return {}, []
    try:
        return store.get_histories(user_ids), []
    except ValueError as exc:
        raise InvalidRequest(("requests",), str(exc)) from None
    except StoreError as exc:
        logger.warning("histories of %d users unavailable, serving without them: %s", len(user_ids), exc)
        return {}, [STORE_FLAG]


def _check_filters(rec: Recommender, req: RecommendRequest, loc: Loc) -> None:
    if req.filters:
        try:
            rec.filter_mask(req.filters)
        except FilterError as exc:
            raise InvalidRequest((*loc, "filters", exc.field), exc.message) from None


def _request_id() -> str:
    """The HTTP request's id (X-Request-ID, service/middleware.py); a new one outside a request."""
    return current_request_id.get() or uuid.uuid4().hex


def _serve(ctx: RecommendContext, req: RecommendRequest, history: History, loc: Loc, request_id: str,
           budget_ms: float | None = None) -> dict[str, Any]:
    """RecommendResponse as a JSON-ready dict, recorded in the impression log under request_id
    (a batch's i-th list: <request id>-<i>). budget_ms: what is left of the HTTP request's budget
    (a batch); None = timeout_ms - store_ms. A request with a user_id during an experiment is
    served by the user's arm, or by both arms interleaved."""
    left = max(ctx.timeout_ms - history.store_ms, 0.0) if budget_ms is None else budget_ms
    batch = budget_ms is not None
    exp = ctx.experiment
    if exp is not None and req.user_id is not None:
        if exp.interleaved:
            return _interleaved(ctx, exp, req, req.user_id, history, loc, request_id, left, batch)
        arm = exp.arm_for(req.user_id)
        ctx.metrics.observe_arm(exp.name, arm.name)
        result = _run(exp.recommender(arm, ctx.recommender), req, history, loc, left, batch)
        return _answer(ctx, req, history, result, request_id, exp.name, arm.name)
    return _answer(ctx, req, history, _run(ctx.recommender, req, history, loc, left, batch), request_id)


def _run(rec: Recommender, req: RecommendRequest, history: History, loc: Loc, left: float,
         batch: bool) -> RecommendResult:
    try:
        if left <= 0.0 and batch:  # a batch's budget is spent: the cheapest answer
            return rec.recommend_popular(history.items, req.k, req.exclude, req.filters, reason="timeout")
        return rec.recommend(history.items, req.k, req.exclude, explain=req.explain, filters=req.filters,
                             timeout_ms=max(left, 0.0))
    except FilterError as exc:
        raise InvalidRequest((*loc, "filters", exc.field), exc.message) from None


def _answer(ctx: RecommendContext, req: RecommendRequest, history: History, result: RecommendResult,
            request_id: str, experiment: str | None = None, arm: str | None = None) -> dict[str, Any]:
    served_by = ";".join([result.served_by, *history.flags])
    timings = {"store": round(history.store_ms, 3), **result.timings_ms}
    timings["total"] = round(history.store_ms + result.timings_ms["total"], 3)
    ctx.metrics.observe_recommendation(served_by, timings, result.unknown_items)
    if ctx.impressions is not None:
        ctx.impressions.record(request_id, req.user_id, result.model_version,
                               [(it.item_id, it.score, None) for it in result.items], experiment, arm)
    return recommend_json(result.items, result.model_version, served_by, result.scored_by, timings, result.unknown_items,
                          req.explain, request_id, experiment, arm)


def _interleaved(ctx: RecommendContext, exp: Experiment, req: RecommendRequest, user_id: str, history: History,
                 loc: Loc, request_id: str, left: float, batch: bool) -> dict[str, Any]:
    """Both arms' top-k for the same request, merged by team draft (service/interleave.py); the
    coin flips are seeded by the experiment, the user and the request id. The second arm gets
    what the first left of the budget. The impression records each item's arm as its `source`
    (and no scores: two models' scores do not compare)."""
    arm_a, arm_b = exp.config.arms
    t0 = time.perf_counter()
    res_a = _run(exp.recommender(arm_a, ctx.recommender), req, history, loc, left, batch)
    spent = (time.perf_counter() - t0) * 1000.0
    res_b = _run(exp.recommender(arm_b, ctx.recommender), req, history, loc, left - spent, batch)
    t1 = time.perf_counter()
    picks = team_draft([it.item_id for it in res_a.items], [it.item_id for it in res_b.items], req.k,
                       exp.rng(user_id, request_id))
    merge_ms = (time.perf_counter() - t1) * 1000.0
    lists, names = (res_a.items, res_b.items), (arm_a.name, arm_b.name)
    items = [lists[p.team][p.index] for p in picks]
    sources = [names[p.team] for p in picks]
    flags = history.flags
    for arm, res in ((arm_a, res_a), (arm_b, res_b)):
        ctx.metrics.observe_arm(exp.name, arm.name)
        ctx.metrics.observe_recommendation(";".join([res.served_by, *flags]), res.timings_ms, res.unknown_items)
    timings = {"store": round(history.store_ms, 3),
               **{f"{arm_a.name}.{k}": v for k, v in res_a.timings_ms.items()},
               **{f"{arm_b.name}.{k}": v for k, v in res_b.timings_ms.items()},
               "interleave": round(merge_ms, 3),
               "total": round(history.store_ms + res_a.timings_ms["total"] + res_b.timings_ms["total"] + merge_ms, 3)}
    served_by = ";".join([f"{res_a.served_by}+{res_b.served_by}", *flags])
    version, arm_label = f"{res_a.model_version}+{res_b.model_version}", f"{arm_a.name}+{arm_b.name}"
    if ctx.impressions is not None:
        ctx.impressions.record(request_id, user_id, version, [(it.item_id, None, src) for it, src in zip(items, sources)],
                               exp.name, arm_label)
    return recommend_json(items, version, served_by, res_a.scored_by, timings, max(res_a.unknown_items,
                          res_b.unknown_items), req.explain, request_id, exp.name, arm_label, sources)
