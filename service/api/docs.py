"""What the OpenAPI document tells a caller: each operation's summary and description, request and
response examples, and which operations need a key only when the service has one. Written for
the API's users (no internals); service/api/openapi.py applies it to FastAPI's document.

Examples are valid requests against any served version (no filter names: those depend on the
catalog) and answers of the shape the service gives; tests/service/test_openapi_docs.py checks
them against the document's own schemas.
"""

from __future__ import annotations

from typing import Any

DESCRIPTION = """Recommendations from a published model version, kept fresh by the events you send.

Send what users do to `POST /v1/events`; ask for their next items with `POST /v1/recommend`
(by `user_id`, or with the `history` in the request). Every answer carries an `X-Request-ID`
header (yours, when you send a plain one), which the service's log lines of that request carry too.

Errors: `{"detail": "..."}`, or for a refused field (422) `{"detail": [{"loc": [...], "msg": "...",
"type": "..."}]}` where `loc` is the path of the field, e.g. `["body", "k"]`."""

TAGS = [
    {"name": "recommend", "description": "Ranked items for a user or a history."},
    {"name": "events", "description": "What users did, and their stored histories."},
    {"name": "catalog", "description": "Items and the served model version."},
    {"name": "items", "description": "New or changed items, served after the next re-index."},
    {"name": "admin", "description": "Operations (write key)."},
    {"name": "health", "description": "Liveness and readiness probes."},
]

# example answers: the shape the service gives (values from a small catalog)
_RECOMMENDATION = {
    "items": [{"item_id": "i1042", "score": 3.81, "rank": 1, "launcher": 0},
              {"item_id": "i77", "score": 3.12, "rank": 2, "launcher": 1}],
    "model_version": "20250101T000000Z-3f2a9c1", "served_by": "rerank", "scored_by": "rerank",
    "timings_ms": {"store": 0.21, "encode": 0.9, "search": 0.3, "prerank": 0.4, "rerank": 1.1, "total": 3.2},
    "unknown_items": 0, "request_id": "6f1d2c0a9b8e4f3a"}
_POPULAR = {
    "items": [{"item_id": "i12", "score": 0.0131, "rank": 1}, {"item_id": "i5", "score": 0.0118, "rank": 2}],
    "model_version": "20250101T000000Z-3f2a9c1", "served_by": "popularity", "scored_by": "popularity",
    "timings_ms": {"store": 0.0, "popularity": 0.05, "total": 0.07}, "unknown_items": 0, "request_id": "6f1d2c0a9b8e4f3a"}
_EXPLAINED = {
    "items": [{"item_id": "i1042", "score": 3.81, "rank": 1, "launcher": 0,
               "stages": {"retrieval": 12.4, "prerank": 2.2, "rerank": 3.81}, "routes": {"faiss": 12.4}}],
    "model_version": "20250101T000000Z-3f2a9c1", "served_by": "rerank", "scored_by": "rerank",
    "timings_ms": {"store": 0.2, "encode": 0.9, "search": 0.3, "prerank": 0.4, "rerank": 1.1, "total": 3.2},
    "unknown_items": 0, "request_id": "6f1d2c0a9b8e4f3a"}

_EXPERIMENT = {
    "experiment": "exp1", "mode": "ab", "seed": 0,
    "arms": [{"name": "control", "version": "v1", "pinned": False, "share": 0.5},
             {"name": "candidate", "version": "v2", "pinned": True, "share": 0.5}],
    "config": {"name": "exp1", "mode": "ab", "seed": 0,
               "arms": [{"name": "control", "share": 0.5}, {"name": "candidate", "version": "v2", "share": 0.5}]}}
_INTERLEAVED = {
    "items": [{"item_id": "i1042", "rank": 1, "launcher": 0, "source": "candidate"},
              {"item_id": "i77", "rank": 2, "launcher": 1, "source": "live"}],
    "model_version": "v1+v2", "served_by": "rerank+rerank", "scored_by": "rerank",
    "timings_ms": {"store": 0.2, "live.total": 3.1, "candidate.total": 3.3, "interleave": 0.02, "total": 6.6},
    "unknown_items": 0, "request_id": "6f1d2c0a9b8e4f3b", "experiment": "il1",
    "arm": "live+candidate"}


def _examples(**named: tuple[str, Any]) -> dict[str, Any]:
    return {name: {"summary": summary, "value": value} for name, (summary, value) in named.items()}


OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("post", "/v1/recommend"): {
        "summary": "Recommend items",
        "description": "The top `k` items for the request's `history` (oldest first) if given, else for the "
                       "stored history of `user_id`, else the most popular items. Items in the history and in "
                       "`exclude` are never returned; `filters` keeps items whose features match. Each item's "
                       "`score` is the `scored_by` stage's score (see the response schema).",
        "request": _examples(
            by_user=("A known user's next items", {"user_id": "u123", "k": 10}),
            by_history=("A session's next items (no stored user)", {"history": ["i5", "i77", "i1042"], "k": 5,
                                                                    "exclude": ["i12"]}),
            explain=("With each stage's score", {"history": ["i5", "i77"], "k": 3, "explain": True})),
        "response": _examples(model=("Ranked by the model", _RECOMMENDATION),
                              popular=("No history: the most popular items", _POPULAR),
                              explained=("With explain", _EXPLAINED),
                              ab=("A user in an A/B experiment", {**_RECOMMENDATION, "experiment": "exp1",
                                                                  "arm": "candidate"}),
                              interleaved=("A user in an interleaved experiment", _INTERLEAVED)),
    },
    ("post", "/v1/recommend/batch"): {
        "summary": "Recommend for several requests",
        "description": "Up to 100 recommend requests in one call, answered in order. Every request is checked "
                       "before any is served: the first refused one gives a 422 naming "
                       "`requests.<i>.<field>`. The sum of `k` and the total of history and exclude ids are "
                       "capped per batch (a 422 names the limit).",
        "request": _examples(two=("Two users", {"requests": [{"user_id": "u123", "k": 5},
                                                               {"history": ["i5", "i77"], "k": 5}]})),
        "response": _examples(two=("Two answers", {"results": [_RECOMMENDATION, _POPULAR]})),
    },
    ("post", "/v1/events"): {
        "summary": "Record what users did",
        "description": "One event or a list (up to 1,000): all are stored, in timestamp order, or none. The "
                       "user's next recommendation sees them. Give each event an `event_id`: a retry with the "
                       "same id is recognised and not stored twice (`duplicates`). A 503 means nothing was "
                       "stored (retry later); a 504 means the outcome is unknown (retry with the same ids).",
        "request": _examples(
            one=("One event", {"user_id": "u123", "item_id": "i1042", "event_id": "3f1c2a"}),
            many=("Several events", [{"user_id": "u123", "item_id": "i5", "timestamp": 1735689600,
                                      "type": "view", "event_id": "a1"},
                                     {"user_id": "u123", "item_id": "i77", "timestamp": 1735689660,
                                      "type": "purchase", "event_id": "a2"}])),
        "response": _examples(stored=("Stored", {"accepted": 2, "duplicates": 0}),
                              retried=("A retry of stored events", {"accepted": 0, "duplicates": 2})),
        "status": "202",
    },
    ("get", "/v1/users/{user_id}/history"): {
        "summary": "A user's stored history",
        "description": "The item ids of the user's stored history, oldest first (at most RECSYS_MAX_HISTORY); "
                       "empty for a user with none.",
        "response": _examples(history=("A history", {"user_id": "u123", "items": ["i5", "i77", "i1042"]})),
    },
    ("get", "/v1/items/{item_id}"): {
        "summary": "An item of the served version",
        "description": "The item's features and popularity (interactions in the training data) in the served "
                       "model version; 404 for an item it does not know.",
        "response": _examples(item=("An item", {"item_id": "i1042", "index": 17, "popularity": 212,
                                                "features": {"genre": ["Comedy", "Drama"], "year": "1995"}})),
    },
    ("put", "/v1/items"): {
        "summary": "Add or change items",
        "description": "One item or a list (up to 1,000), each with its complete features; served after the "
                       "next re-index. Feature names and kinds must be the served version's. All or none.",
        "request": _examples(one=("One item", {"item_id": "i9001", "features": {"genre": ["Comedy"],
                                                                                "year": "2024"}})),
        "response": _examples(accepted=("Accepted", {"accepted": 1, "pending": 1})),
        "status": "202",
    },
    ("get", "/v1/version"): {
        "summary": "The served model version",
        "description": "Which model version answers, when it was built, the stages it serves and the quality "
                       "figures it was published with.",
    },
    ("post", "/v1/admin/reload"): {
        "summary": "Load the newest published version now",
        "description": "Switches to the version the artifact root names as current once it has loaded and "
                       "passed its checks; 409 (the served version is kept) when it does not load. Versions "
                       "are also picked up on their own every RECSYS_RELOAD_POLL_S.",
        "response": _examples(reloaded=("Reloaded", {"previous": "v1", "model_version": "v2", "changed": True})),
    },
    ("get", "/v1/admin/experiment"): {
        "summary": "The running experiment",
        "description": "Its arms, the model version each serves now and each one's share of users; "
                       "`{\"experiment\": null}` when none runs.",
        "response": _examples(running=("An A/B experiment", _EXPERIMENT), none=("None", {"experiment": None})),
    },
    ("put", "/v1/admin/experiment"): {
        "summary": "Start an experiment between model versions",
        "description": "Replaces the running experiment once every arm's version has loaded. `ab`: each user "
                       "(by `user_id`) is served by one arm, picked by a stable hash of the experiment name, the "
                       "seed and the user, in the arms' shares. `interleave`: exactly two arms; each answer "
                       "merges both arms' lists (team draft) and each item's `source` names the arm that "
                       "contributed it. An arm without `version` serves the live version and follows new "
                       "publications. Requests without `user_id` are not in the experiment. A 422 names the "
                       "field: e.g. `arms.1.version` for a version that is not published or does not load.",
        "request": _examples(ab=("A/B, half the users each", _EXPERIMENT["config"]),
                             interleave=("Interleaving", {"name": "il1", "mode": "interleave", "arms": [
                                 {"name": "live"}, {"name": "candidate", "version": "v2"}]})),
        "response": _examples(started=("Started", _EXPERIMENT)),
    },
    ("delete", "/v1/admin/experiment"): {
        "summary": "End the experiment",
        "description": "Every request is served by the live version again.",
        "response": _examples(ended=("Ended", {"experiment": None})),
    },
    ("get", "/v1/experiments/{name}"): {
        "summary": "An experiment's results",
        "description": "The experiment's arms while it runs, and its online metrics from the impression and "
                       "event logs: per arm and version, impressions, click-through at each position and @k, hit "
                       "rate and coverage, each rate with its 95% interval; for an interleaved experiment, the "
                       "clicks and wins credited to each arm. 404 when it neither runs nor has logged impressions.",
    },
    ("get", "/healthz"): {"summary": "Liveness", "description": "200 while the process answers."},
    ("get", "/readyz"): {
        "summary": "Readiness",
        "description": "200 once a model version is loaded (503 before); reports whether the history store "
                       "answers (recommendations are served without it when it does not)."},
}

# operations whose key is needed only when the service has a read key: security lists "no key" too
OPTIONAL_KEY = frozenset({("post", "/v1/recommend"), ("post", "/v1/recommend/batch"),
                          ("get", "/v1/users/{user_id}/history"), ("get", "/v1/online-metrics"),
                          ("get", "/v1/experiments/{name}")})


def apply(doc: dict[str, Any]) -> None:
    """Add the descriptions, examples and optional security above to a FastAPI document (in place)."""
    doc["info"]["description"] = DESCRIPTION
    doc["tags"] = TAGS
    for (method, path), spec in OPERATIONS.items():
        op = doc["paths"][path][method]
        op["summary"], op["description"] = spec["summary"], spec["description"]
        if "request" in spec:
            op["requestBody"]["content"]["application/json"]["examples"] = spec["request"]
        if "response" in spec:
            op["responses"][spec.get("status", "200")]["content"]["application/json"]["examples"] = spec["response"]
    for method, path in OPTIONAL_KEY:
        op = doc["paths"].get(path, {}).get(method)
        if op is not None and "security" in op:
            op["security"] = [*op["security"], {}]
