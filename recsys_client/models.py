"""What the recsys API answers, as frozen dataclasses (built from the JSON by `from_json`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Event:
    """One interaction. `timestamp`: Unix seconds (None: when the server receives it). `event_id`:
    None lets the client pick one, so a retry is recognised by the server and not stored twice."""

    user_id: str
    item_id: str
    timestamp: float | None = None
    type: str | None = None
    event_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"user_id": self.user_id, "item_id": self.item_id}
        for name in ("timestamp", "type", "event_id"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out


@dataclass(frozen=True)
class RecommendedItem:
    item_id: str
    rank: int
    score: float | None = None  # the answer's `scored_by` stage's score; None: that stage did not score it
    launcher: int | None = None
    stages: dict[str, float] | None = None  # explain only
    routes: dict[str, float] | None = None  # explain only

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RecommendedItem:
        return cls(item_id=d["item_id"], rank=d["rank"], score=d.get("score"), launcher=d.get("launcher"),
                   stages=d.get("stages"), routes=d.get("routes"))


@dataclass(frozen=True)
class Recommendation:
    items: list[RecommendedItem]
    model_version: str
    served_by: str
    scored_by: str
    timings_ms: dict[str, float]
    unknown_items: int = 0
    request_id: str | None = None  # the X-Request-ID of the HTTP answer

    @property
    def item_ids(self) -> list[str]:
        return [it.item_id for it in self.items]

    @classmethod
    def from_json(cls, d: dict[str, Any], request_id: str | None = None) -> Recommendation:
        return cls(items=[RecommendedItem.from_json(it) for it in d["items"]], model_version=d["model_version"],
                   served_by=d["served_by"], scored_by=d["scored_by"], timings_ms=d["timings_ms"],
                   unknown_items=d.get("unknown_items", 0), request_id=request_id)


@dataclass(frozen=True)
class EventsAccepted:
    accepted: int  # appended to the history
    duplicates: int  # not appended: their event_id was already stored (a retry)
    event_ids: list[str] = field(default_factory=list)  # the ids sent, in the order of the events given
    attempts: int = 1


@dataclass(frozen=True)
class Item:
    item_id: str
    index: int
    popularity: int
    features: dict[str, Any]

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Item:
        return cls(item_id=d["item_id"], index=d["index"], popularity=d["popularity"], features=d["features"])


@dataclass(frozen=True)
class Version:
    model_version: str
    created_at: str
    item_count: int
    stages: list[str]
    raw: dict[str, Any]  # the whole answer (data, serving record, cuts, baselines)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Version:
        return cls(model_version=d["model_version"], created_at=d["created_at"], item_count=d["item_count"],
                   stages=d["stages"], raw=d)


@dataclass(frozen=True)
class Query:
    """One recommend request: `history` (oldest first) wins over the stored history of `user_id`;
    neither: the most popular items. `filters`: item feature -> accepted value(s)."""

    user_id: str | None = None
    history: list[str] | None = None
    k: int = 10
    exclude: list[str] | None = None
    filters: dict[str, str | list[str]] | None = None
    explain: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"k": self.k}
        for name in ("user_id", "history", "exclude", "filters"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.explain:
            out["explain"] = True
        return out
