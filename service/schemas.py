"""HTTP request / response bodies of the v1 API (DESIGN.md §7), pydantic v2.

The recommend routes answer with :func:`recommend_json` / :func:`encode_json` instead of
building RecommendResponse: the models below stay the OpenAPI contract (tests check that the
fast encoding is the same JSON as the models' own and validates against /openapi.json).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, WithJsonSchema
from pydantic.json_schema import SkipJsonSchema

from service.stores import MAX_ID_LEN

MAX_HISTORY_IN_REQUEST = 1000
MAX_K = 1000
MAX_EVENTS = 1000
MAX_BATCH = 100
MAX_FILTERS = 16
MAX_FILTER_VALUES = 100

# no control characters (C0, DEL, C1): the stores refuse them, so the contract does too
ID_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]+$"
Id = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LEN, pattern=ID_PATTERN)]
ID_SCHEMA: dict[str, Any] = {"type": "string", "minLength": 1, "maxLength": MAX_ID_LEN, "pattern": ID_PATTERN}
FILTER_VALUES_SCHEMA: dict[str, Any] = {"anyOf": [
    ID_SCHEMA, {"type": "array", "items": ID_SCHEMA, "minItems": 1, "maxItems": MAX_FILTER_VALUES}]}
# one value or a list; a single string is taken as a one-element list (so a 422 has one clean loc)
FilterValues = Annotated[list[Id], BeforeValidator(lambda v: [v] if isinstance(v, str) else v),
                         Field(min_length=1, max_length=MAX_FILTER_VALUES), WithJsonSchema(FILTER_VALUES_SCHEMA)]


def _integral(value: object) -> object:
    """JSON Schema counts 5.0 as an integer: accept it as 5 (strict int validation follows)."""
    return int(value) if isinstance(value, float) and value.is_integer() and abs(value) < 2 ** 53 else value


class RecommendRequest(BaseModel):
    """`history` (oldest first) wins over the stored history of `user_id`; neither -> popularity."""

    model_config = ConfigDict(extra="forbid")

    user_id: Id | None = None
    history: list[Id] | None = Field(default=None, max_length=MAX_HISTORY_IN_REQUEST)
    k: Annotated[int, BeforeValidator(_integral)] = Field(default=10, ge=1, le=MAX_K, strict=True)
    exclude: list[Id] | None = Field(default=None, max_length=MAX_HISTORY_IN_REQUEST)
    filters: dict[Id, FilterValues] | None = Field(
        default=None, max_length=MAX_FILTERS,
        description="item feature -> accepted value(s), e.g. {\"genre\": [\"Comedy\", \"Drama\"]}")
    explain: bool = Field(default=False, strict=True)


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)  # an optional field is absent, never null


Absent = SkipJsonSchema[None]  # `X | Absent = None`: the schema says X, and the answer omits the field when None


class RecommendedItemOut(BaseModel):
    """One recommended item. Fields that do not apply are left out (never null)."""

    item_id: str
    score: float | Absent = Field(
        default=None, json_schema_extra=_no_default,
        description="the item's score from the answer's `scored_by` stage: higher is better, comparable within one "
                    "answer only (a model score has no fixed scale); for `popularity`, the item's share of the "
                    "training interactions (0 to 1). Left out for an item that stage did not score: one past the "
                    "re-ranked top RECSYS_PRERANK_N, or a popular item added when filters left too few; those "
                    "follow the scored items in `rank` order; and for every item of an interleaved answer (two "
                    "arms' scores do not compare)")
    rank: int = Field(description="1-based position in the list")
    launcher: int | Absent = Field(
        default=None, json_schema_extra=_no_default,
        description="which of the user's interest vectors found this item; left out for a popular item")
    stages: dict[str, float] | Absent = Field(
        default=None, json_schema_extra=_no_default,
        description="with explain only: each stage's score of the item (retrieval, prerank, rerank; popularity for "
                    "a popular item)")
    routes: dict[str, float] | Absent = Field(
        default=None, json_schema_extra=_no_default,
        description="with explain only: the score of each recall route that found the item: faiss (the "
                    "sequence model's nearest neighbours), i2i (items that followed the user's recent items); {} for "
                    "a popular item")
    source: str | Absent = Field(
        default=None, json_schema_extra=_no_default,
        description="in an interleaved experiment only: the arm whose list contributed this item (a click on it "
                    "is credited to that arm)")


class RecommendResponse(BaseModel):
    items: list[RecommendedItemOut] = Field(description="best first")
    model_version: str = Field(description="the published model version that answered")
    served_by: str = Field(description="the stage that ordered the list (rerank, prerank, retrieval, popularity), "
                                       "then ;-separated notes on a fallback, e.g. popularity;timeout or "
                                       "rerank;filter_backfill")
    scored_by: Literal["rerank", "prerank", "retrieval", "popularity"] = Field(
        description="what every item's `score` is: that stage's score (popularity: share of the training "
                    "interactions)")
    timings_ms: dict[str, float] = Field(description="milliseconds per step; total is the whole request")
    unknown_items: int = Field(default=0, description="history items the model version does not know (skipped)")
    request_id: str = Field(description="this list's id in the impression log: the X-Request-ID (a batch's i-th "
                                        "list: <X-Request-ID>-<i>); send it with the events the list led to "
                                        "(POST /v1/events request_id) for exact attribution")
    experiment: str | Absent = Field(default=None, json_schema_extra=_no_default,
                                     description="the experiment this answer belongs to; left out when none runs "
                                                 "or the request has no user_id")
    arm: str | Absent = Field(default=None, json_schema_extra=_no_default,
                              description="the experiment arm that served it; in an interleaved experiment both "
                                          "arms joined by '+' (each item's `source` says whose it is)")


class ScoredItem(Protocol):
    """What recommend_json reads of an item (service.pipeline.RecommendedItem, a frozen dataclass)."""

    @property
    def item_id(self) -> str: ...
    @property
    def score(self) -> float | None: ...
    @property
    def launcher(self) -> int | None: ...
    @property
    def stages(self) -> dict[str, float]: ...
    @property
    def routes(self) -> dict[str, float]: ...


def _item_json(it: ScoredItem, rank: int, explain: bool, source: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"item_id": it.item_id}
    if it.score is not None and source is None:  # two arms' scores do not compare: an interleaved answer has none
        out["score"] = it.score
    out["rank"] = rank
    if it.launcher is not None:
        out["launcher"] = it.launcher
    if explain:
        out["stages"], out["routes"] = it.stages, it.routes
    if source is not None:
        out["source"] = source
    return out


def recommend_json(items: Iterable[ScoredItem], model_version: str, served_by: str, scored_by: str,
                   timings_ms: Mapping[str, float], unknown_items: int, explain: bool,
                   request_id: str, experiment: str | None = None, arm: str | None = None,
                   sources: list[str] | None = None) -> dict[str, Any]:
    """RecommendResponse as the plain dict its model renders with exclude_none (same keys, same
    order, absent fields left out), built without a pydantic object per item and without FastAPI
    validating the response a second time (the saving was below the noise of the shared 2-core
    machine: app_overhead_100k_compare.txt). Keys must follow RecommendedItemOut /
    RecommendResponse (tests/service/test_fast_path.py)."""
    if sources is None:
        listed = [_item_json(it, rank, explain) for rank, it in enumerate(items, start=1)]
    else:
        listed = [_item_json(it, rank, explain, src) for rank, (it, src) in enumerate(zip(items, sources), start=1)]
    out = {"items": listed, "model_version": model_version, "served_by": served_by, "scored_by": scored_by,
           "timings_ms": dict(timings_ms), "unknown_items": unknown_items, "request_id": request_id}
    if experiment is not None:
        out["experiment"], out["arm"] = experiment, arm
    return out


def encode_json(content: Any) -> bytes:
    """JSON bytes exactly as starlette's JSONResponse renders them (the standard library's C
    encoder; a faster JSON library was not added: not measured to matter on a 10-item answer)."""
    return json.dumps(content, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")).encode("utf-8")


class RecommendBatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requests: list[RecommendRequest] = Field(min_length=1, max_length=MAX_BATCH)


class RecommendBatchResponse(BaseModel):
    results: list[RecommendResponse]


class ReloadOut(BaseModel):
    previous: str
    model_version: str
    changed: bool


class ArmOut(BaseModel):
    name: str
    version: str = Field(description="the version this arm serves now")
    pinned: bool = Field(description="false: the arm follows the live version (CURRENT)")
    share: float | Absent = Field(default=None, json_schema_extra=_no_default,
                                  description="its share of users (mode ab); left out for interleave")


class ExperimentOut(BaseModel):
    """Fields other than `experiment` are left out when no experiment runs."""

    experiment: str | None = Field(description="the running experiment's name; null when none runs")
    mode: Literal["ab", "interleave"] | Absent = Field(default=None, json_schema_extra=_no_default)
    seed: int | Absent = Field(default=None, json_schema_extra=_no_default)
    arms: list[ArmOut] | Absent = Field(default=None, json_schema_extra=_no_default)
    config: dict[str, Any] | Absent = Field(default=None, json_schema_extra=_no_default,
                                            description="the configuration as given")


class EventIn(BaseModel):
    """One interaction; `timestamp` is Unix seconds (defaults to the time received)."""

    model_config = ConfigDict(extra="forbid")

    user_id: Id
    item_id: Id
    timestamp: float | None = Field(default=None, allow_inf_nan=False, strict=True)
    type: Id | None = None
    event_id: Id | None = Field(default=None, description="client-chosen id: an event whose id is among the "
                                "user's last max_history event ids is a retry and is not stored again")
    request_id: Id | None = Field(default=None, description="the request_id of the recommended list this event "
                                  "answers (exact attribution in the online metrics); without it the event goes to "
                                  "the user's latest list that showed the item within RECSYS_ATTRIBUTION_WINDOW_S")


EventsList = Annotated[list[EventIn], Field(min_length=1, max_length=MAX_EVENTS)]


class EventsAccepted(BaseModel):
    accepted: int = Field(description="events appended to the history")
    duplicates: int = Field(default=0, description="events not appended: their event_id was already stored")


class HistoryOut(BaseModel):
    user_id: str
    items: list[str]


class ItemOut(BaseModel):
    item_id: str
    index: int
    popularity: int
    features: dict[str, str | list[str] | float]


class VersionOut(BaseModel):
    model_version: str
    created_at: str
    item_count: int
    data: dict[str, object]
    rerank: bool
    stages: list[str] = Field(description="the stages this process serves, in order (a prefix of retrieval, "
                                          "prerank, rerank)")
    serving: dict[str, object] | None = Field(
        default=None, description="the publish gate's record: split, users, rule, tolerance, stages, switched_off, "
                                  "reason, baselines (the verdict); None for a version published before the gate")
    cuts: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="per served cut (retrieval, prerank, rerank): HR/NDCG@10/20/50, "
                                          "Coverage@10, users, p50_ms on the gate's validation users")
    baselines: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="per trivial baseline (popularity, last-item, item2item: the "
                                          "item-to-item route alone): HR@10, NDCG@10, Coverage@10 on the same "
                                          "validation users; the verdict is serving.baselines (best, "
                                          "served_minus_best, paired_se, beats, allowed_below); {} for a "
                                          "version published before the baseline gate")
    regression: dict[str, object] | None = Field(
        default=None, description="the publish gate against the version live before it (manifest "
                                  "checks.regression): compared, live, new, users, result; across data sets "
                                  "(a retrain) also split, paired_se and rule; None for a version without checks")
