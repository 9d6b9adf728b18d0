"""The online log's records (DESIGN.md §8): what the service writes about every served list
(impressions) and every accepted event, and what online metrics, experiments and training read
back. Torch-free; imports nothing outside service/contract.

One record is one JSON object: a line of a JSON Lines file, or the single field ``RECORD_FIELD``
of a Redis Stream entry. The names of the streams and of the files are here too, so the writer
(service/online_log.py) and every reader (training's ``log:`` data source, the metrics join)
spell them once.

Impression:
    ``request_id``, ``user_id`` (or null: an anonymous request), ``version`` (the artifact version
    that served), ``experiment`` / ``arm`` (names, or null outside an experiment), ``items``: a list
    of {``item_id``, ``position`` (0-based), ``score`` (or null), ``source`` (the arm / version that
    contributed the item under interleaving; else null)}, ``ts`` (Unix seconds), ``sampled`` (the
    sampling rate the record was kept under, 0 < rate <= 1: one record stands for 1 / rate lists).

Event: the accepted event as stored: ``user_id``, ``item_id``, ``type``, ``ts``, ``event_id``
(or null), ``request_id`` (or null: the impression the client says it answers).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# --- where the records live ---
EVENTS_STREAM = "log:events"  # Redis Stream keys, after the store's key prefix (recsys:)
IMPRESSIONS_STREAM = "log:impressions"
RECORD_FIELD = "r"  # a stream entry holds one field: the record's JSON
EVENTS_FILE_PREFIX = "events"  # JSON Lines files: <prefix>-<20-digit sequence>.jsonl, oldest first
IMPRESSIONS_FILE_PREFIX = "impressions"
FILE_SUFFIX = ".jsonl"
SEQ_DIGITS = 20


def log_file_name(prefix: str, seq: int) -> str:
    """events-00000000000000000003.jsonl: names sort in write order."""
    if seq < 0:
        raise ValueError(f"seq: must be >= 0, got {seq}")
    return f"{prefix}-{seq:0{SEQ_DIGITS}d}{FILE_SUFFIX}"


def log_file_seq(prefix: str, name: str) -> int | None:
    """The sequence number of a log file name, None for a name that is not one of prefix's files."""
    head, tail = f"{prefix}-", FILE_SUFFIX
    if not (name.startswith(head) and name.endswith(tail)):
        return None
    digits = name[len(head):-len(tail)]
    return int(digits) if len(digits) == SEQ_DIGITS and digits.isdigit() else None


def _str(d: Mapping[str, Any], key: str, what: str) -> str:
    v = d.get(key)
    if not isinstance(v, str) or not v:
        raise ValueError(f"{what}.{key}: must be a non-empty string, got {v!r}")
    return v


def _opt_str(d: Mapping[str, Any], key: str, what: str) -> str | None:
    v = d.get(key)
    if v is not None and (not isinstance(v, str) or not v):
        raise ValueError(f"{what}.{key}: must be a non-empty string or null, got {v!r}")
    return v


def _num(d: Mapping[str, Any], key: str, what: str) -> float:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ValueError(f"{what}.{key}: must be a finite number, got {v!r}")
    return float(v)


@dataclass(frozen=True, slots=True)
class ImpressionItem:
    item_id: str
    position: int  # 0-based
    score: float | None = None
    source: str | None = None  # interleaving: the arm / version that contributed the item

    def to_json(self) -> dict[str, Any]:
        return {"item_id": self.item_id, "position": self.position, "score": self.score, "source": self.source}

    @classmethod
    def from_json(cls, d: Mapping[str, Any], what: str = "item") -> ImpressionItem:
        pos = d.get("position")
        if isinstance(pos, bool) or not isinstance(pos, int) or pos < 0:
            raise ValueError(f"{what}.position: must be an integer >= 0, got {pos!r}")
        score = None if d.get("score") is None else _num(d, "score", what)
        return cls(_str(d, "item_id", what), pos, score, _opt_str(d, "source", what))


@dataclass(frozen=True, slots=True)
class Impression:
    """One served list."""

    request_id: str
    user_id: str | None
    version: str
    experiment: str | None
    arm: str | None
    items: tuple[ImpressionItem, ...]
    ts: float
    sampled: float = 1.0

    def to_json(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "user_id": self.user_id, "version": self.version,
                "experiment": self.experiment, "arm": self.arm, "items": [it.to_json() for it in self.items],
                "ts": self.ts, "sampled": self.sampled}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Impression:
        w = "impression"
        raw = d.get("items")
        if not isinstance(raw, list):
            raise ValueError(f"{w}.items: must be a list, got {type(raw).__name__}")
        items = tuple(ImpressionItem.from_json(it, f"{w}.items[{i}]") if isinstance(it, Mapping) else
                      _bad_item(i, it) for i, it in enumerate(raw))
        sampled = _num(d, "sampled", w) if "sampled" in d else 1.0
        if not 0 < sampled <= 1:
            raise ValueError(f"{w}.sampled: must be in (0, 1], got {sampled!r}")
        return cls(_str(d, "request_id", w), _opt_str(d, "user_id", w), _str(d, "version", w),
                   _opt_str(d, "experiment", w), _opt_str(d, "arm", w), items, _num(d, "ts", w), sampled)


def _bad_item(i: int, it: object) -> ImpressionItem:
    raise ValueError(f"impression.items[{i}]: must be an object, got {type(it).__name__}")


@dataclass(frozen=True, slots=True)
class LoggedEvent:
    """One accepted event, as the history store stored it."""

    user_id: str
    item_id: str
    type: str
    ts: float
    event_id: str | None = None
    request_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"user_id": self.user_id, "item_id": self.item_id, "type": self.type, "ts": self.ts,
                "event_id": self.event_id, "request_id": self.request_id}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> LoggedEvent:
        w = "event"
        return cls(_str(d, "user_id", w), _str(d, "item_id", w), _str(d, "type", w), _num(d, "ts", w),
                   _opt_str(d, "event_id", w), _opt_str(d, "request_id", w))


def dumps(record: Impression | LoggedEvent) -> str:
    """The record's one line of JSON (no newline; non-ASCII ids kept as UTF-8)."""
    return json.dumps(record.to_json(), ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def load_impression(line: str | bytes) -> Impression:
    return Impression.from_json(_object(line))


def load_event(line: str | bytes) -> LoggedEvent:
    return LoggedEvent.from_json(_object(line))


def _object(line: str | bytes) -> Mapping[str, Any]:
    d = json.loads(line)
    if not isinstance(d, dict):
        raise ValueError(f"a log record must be a JSON object, got {type(d).__name__}")
    return d
