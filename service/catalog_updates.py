"""Pending catalog updates: items recorded by `PUT /v1/items`, served after the next `recsys reindex`.

An update is one item's complete feature set, e.g.
``{"item_id": "i42", "features": {"genre": ["a", "b"], "category": "x", "price": 1.5}}``.
It replaces what the catalog holds for that item (a feature left out becomes unknown: no
category, no values, 0.0), so only the latest update of an item matters and both backends
keep one live entry per item.

One interface, :class:`CatalogUpdates`, two implementations:

- :class:`RedisCatalogUpdates` (``RECSYS_REDIS_URL`` set): one hash ``recsys:catalog:pending``,
  field = item_id, value = JSON ``{item_id, features, received_at, seq, id}``; HSET replaces
  an item's earlier update.
- :class:`FileCatalogUpdates` (no Redis): JSON Lines ``<artifacts>/catalog_pending.jsonl``,
  one update per line, appended (one ``write`` per batch) under an exclusive ``flock`` on a
  side file ``catalog_pending.jsonl.lock``; the latest line of an item wins. ``put`` reads only
  the lines appended since its last call to count, and compacts the file (latest line per item)
  once it holds several lines per item. For one host, or a shared volume whose ``flock`` works;
  use Redis across machines.

Consuming: ``snapshot()`` reads every pending entry with its entry ``id`` (a fresh UUID per
update). After a successful publish, ``recsys reindex`` calls ``clear(snapshot)``, which removes
exactly those entries: Redis deletes a field only while it still holds the same entry id (a Lua
compare-and-delete), the file backend rewrites itself without the consumed lines under the
lock. An update that arrived during the re-index has a new id and stays pending.

Validation (:func:`validate_item`) runs before any write: ids and feature names as
``service.stores.validate_id``, values a string, a list of strings or a finite number, at most
MAX_FEATURES features and MAX_VALUES values per list; with a schema (the data set's feature
names and kinds) unknown names and wrong kinds are refused too. Errors are :class:`ItemError`
(a ``ValueError``) naming the field. No torch here: the API imports this module.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast, runtime_checkable

import redis

from service.contract.catalog import FeatureKind, FeatureValue, ItemUpdate
from service.contract.layout import PENDING_ITEMS, write_atomic
from service.stores import StoreError, StoreUnavailable, id_problem

logger = logging.getLogger(__name__)

MAX_FEATURES = 64
MAX_VALUES = 64
REDIS_KEY = "recsys:catalog:pending"
SOCKET_TIMEOUT_S = 2.0  # a write path of the API and a batch job: not the request budget of /recommend
_CLEAR_CHUNK = 1000  # (field, id) pairs per compare-and-delete script call

Schema = Mapping[str, FeatureKind]  # a catalog's feature names and kinds (ItemFeatures.schema())

# KEYS[1] the hash, ARGV = field1, id1, field2, id2, ...: delete a field only if it still holds that entry
_COMPARE_AND_DELETE = """
local n = 0
for i = 1, #ARGV, 2 do
  local v = redis.call('HGET', KEYS[1], ARGV[i])
  if v and cjson.decode(v)['id'] == ARGV[i + 1] then
    n = n + redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
return n
"""


class ItemError(ValueError):
    """A bad item update; ``loc`` is the path of the field inside the item, e.g. ("features", "price")."""

    def __init__(self, loc: tuple[str, ...], reason: str) -> None:
        super().__init__(f"{'.'.join(loc)}: {reason}")
        self.loc = loc
        self.reason = reason


@dataclass(frozen=True)
class PendingSnapshot:
    """What ``snapshot()`` read: the latest update of each item (ordered by when that update
    arrived) and (item_id, entry id) of every entry read, which is what ``clear()`` removes."""

    items: tuple[ItemUpdate, ...]
    entries: tuple[tuple[str, str], ...]


def validate_item(obj: object, schema: Schema | None = None) -> ItemUpdate:
    """``{"item_id": str, "features": {name: value}}`` -> ItemUpdate, or ItemError naming the field.

    With ``schema``, every feature name must be in it and its value of that kind (numbers are
    accepted for a numeric feature only); without, any of str / list[str] / finite number.
    """
    if not isinstance(obj, Mapping):
        raise ItemError((), f"must be an object with item_id and features, got {type(obj).__name__}")
    extra = sorted(str(k) for k in obj if k not in ("item_id", "features"))
    if extra:
        raise ItemError((extra[0],), "unknown field (expected item_id and features)")
    item_id = _valid_id(obj.get("item_id"), ("item_id",))
    raw = obj.get("features", {})
    if not isinstance(raw, Mapping):
        raise ItemError(("features",), f"must be an object, got {type(raw).__name__}")
    if len(raw) > MAX_FEATURES:
        raise ItemError(("features",), f"more than {MAX_FEATURES} features ({len(raw)})")
    features: dict[str, FeatureValue] = {}
    for name, value in raw.items():
        loc = ("features", str(name))
        _valid_id(name, loc)
        kind = None if schema is None else schema.get(name)
        if schema is not None and kind is None:
            raise ItemError(loc, f"unknown feature (known: {', '.join(sorted(schema)) or 'none'})")
        features[name] = _value(value, kind, loc)
    return ItemUpdate(item_id, features)


@runtime_checkable
class CatalogUpdates(Protocol):
    """Pending item updates; every method is safe to call from several threads / processes."""

    def put(self, items: Sequence[ItemUpdate]) -> int:
        """Record the updates (later ones win); return the number of items now pending."""
        ...

    def count(self) -> int:
        """Number of items with a pending update."""
        ...

    def snapshot(self) -> PendingSnapshot: ...

    def clear(self, snapshot: PendingSnapshot) -> int:
        """Remove the entries ``snapshot`` read (not newer ones); return how many were removed."""
        ...

    def close(self) -> None: ...


class RedisCatalogUpdates:
    """Pending updates in one Redis hash shared by every API replica and the re-index job."""

    def __init__(self, url: str, key: str = REDIS_KEY, socket_timeout: float = SOCKET_TIMEOUT_S) -> None:
        if not url:
            raise ValueError("url: must not be empty")
        self.key = key
        self._client = redis.Redis.from_url(url, socket_timeout=socket_timeout,
                                            socket_connect_timeout=socket_timeout, decode_responses=True)
        self._clear = self._client.register_script(_COMPARE_AND_DELETE)

    def put(self, items: Sequence[ItemUpdate]) -> int:
        if not items:
            return self.count()
        now = time.time()
        mapping = {u.item_id: json.dumps(_entry(u, now, seq)) for seq, u in enumerate(items)}
        pipe = self._client.pipeline(transaction=True)
        pipe.hset(self.key, mapping=mapping)  # type: ignore[arg-type]  # dict[str, str] is what it takes
        pipe.hlen(self.key)
        with _redis_errors("put"):
            return int(pipe.execute()[-1])

    def count(self) -> int:
        with _redis_errors("count"):
            return int(cast(int, self._client.hlen(self.key)))

    def snapshot(self) -> PendingSnapshot:
        with _redis_errors("snapshot"):
            raw = cast(dict[str, str], self._client.hgetall(self.key))
        entries = sorted((json.loads(v) for v in raw.values()), key=lambda e: (e["received_at"], e["seq"]))
        return _snapshot(entries)

    def clear(self, snapshot: PendingSnapshot) -> int:
        removed = 0
        pairs = snapshot.entries
        for start in range(0, len(pairs), _CLEAR_CHUNK):
            argv = [x for pair in pairs[start:start + _CLEAR_CHUNK] for x in pair]
            with _redis_errors("clear"):
                removed += int(self._clear(keys=[self.key], args=argv))
        return removed

    def close(self) -> None:
        self._client.close()


class FileCatalogUpdates:
    """Pending updates appended to a JSON Lines file next to the artifact versions.

    `put` appends and counts pending items from an index it keeps of the file (the item ids seen
    and how far it has read): each call reads only the lines appended since its last call, by
    this process or another, and re-reads the whole file only when it was replaced (`clear`, a
    compaction). When the file holds more than COMPACT_RATIO lines per pending item (and at least
    COMPACT_MIN_LINES), `put` rewrites it with the latest line of each item only.
    """

    COMPACT_MIN_LINES = 10_000
    COMPACT_RATIO = 4

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._file: tuple[int, int] | None = None  # (st_dev, st_ino) of the file indexed
        self._offset = 0  # bytes of it read into the index
        self._lines = 0
        self._ids: set[str] = set()

    @contextmanager
    def _locked(self, shared: bool = False) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _read(self) -> list[dict[str, object]]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def _catch_up(self) -> int:
        """Bring the index up to the file (lock held); the number of pending items."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._file, self._offset, self._lines, self._ids = None, 0, 0, set()
            return 0
        ident = (st.st_dev, st.st_ino)
        if ident != self._file or st.st_size < self._offset:  # replaced or truncated: index it anew
            self._file, self._offset, self._lines, self._ids = ident, 0, 0, set()
        if st.st_size > self._offset:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read(st.st_size - self._offset)
            data = data[: data.rfind(b"\n") + 1]  # whole lines only
            for line in data.splitlines():
                if line.strip():
                    self._ids.add(str(json.loads(line)["item_id"]))
                    self._lines += 1
            self._offset += len(data)
        return len(self._ids)

    def put(self, items: Sequence[ItemUpdate]) -> int:
        now = time.time()
        data = "".join(json.dumps(_entry(u, now, seq)) + "\n" for seq, u in enumerate(items)).encode()
        with self._locked():
            if data:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            pending = self._catch_up()
            if self._lines >= self.COMPACT_MIN_LINES and self._lines > self.COMPACT_RATIO * pending:
                self._compact()
            return pending

    def _compact(self) -> None:
        """Rewrite the file with the latest line of each item, in the order those arrived (lock held)."""
        latest: dict[str, dict[str, object]] = {}
        for e in self._read():
            latest.pop(str(e["item_id"]), None)
            latest[str(e["item_id"])] = e
        write_atomic(self.path, "".join(json.dumps(e) + "\n" for e in latest.values()))
        self._catch_up()

    def count(self) -> int:
        with self._locked():  # exclusive: the index is updated
            return self._catch_up()

    def snapshot(self) -> PendingSnapshot:
        with self._locked(shared=True):
            return _snapshot(self._read())

    def clear(self, snapshot: PendingSnapshot) -> int:
        consumed = {entry_id for _, entry_id in snapshot.entries}
        with self._locked():
            entries = self._read()
            keep = [e for e in entries if e["id"] not in consumed]
            write_atomic(self.path, "".join(json.dumps(e) + "\n" for e in keep))
        return len(entries) - len(keep)

    def close(self) -> None:
        return None


def make_catalog_updates(redis_url: str | None, artifacts_root: str | Path) -> CatalogUpdates:
    """Redis when a URL is configured, else ``<artifacts_root>/catalog_pending.jsonl``."""
    if redis_url:
        logger.info("catalog updates: redis hash %s", REDIS_KEY)
        return RedisCatalogUpdates(redis_url)
    path = Path(artifacts_root) / PENDING_ITEMS
    logger.info("catalog updates: %s", path)
    return FileCatalogUpdates(path)


# --- helpers ---


def _valid_id(value: object, loc: tuple[str, ...]) -> str:
    problem = id_problem(value)
    if problem is not None:
        raise ItemError(loc, problem)
    return value  # type: ignore[return-value]  # id_problem checked it is a str


def _value(value: object, kind: FeatureKind | None, loc: tuple[str, ...]) -> FeatureValue:
    if isinstance(value, str):
        if kind not in (None, "categorical"):
            raise ItemError(loc, f"must be {_WANT[kind]}, got a string")
        return _valid_id(value, loc)
    if isinstance(value, list):
        if kind not in (None, "multi"):
            raise ItemError(loc, f"must be {_WANT[kind]}, got a list")
        if len(value) > MAX_VALUES:
            raise ItemError(loc, f"more than {MAX_VALUES} values ({len(value)})")
        for i, v in enumerate(value):
            _valid_id(v, (*loc, str(i)))
        return list(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if kind not in (None, "numeric"):
            raise ItemError(loc, f"must be {_WANT[kind]}, got a number")
        if not math.isfinite(value):
            raise ItemError(loc, f"must be a finite number, got {value!r}")
        return float(value)
    raise ItemError(loc, f"must be a string, a list of strings or a number, got {type(value).__name__}")


_WANT: dict[FeatureKind | None, str] = {"categorical": "a string (categorical)", "multi": "a list of strings (multi)",
                                        "numeric": "a number (numeric)", None: "a string, list or number"}


def _entry(u: ItemUpdate, now: float, seq: int) -> dict[str, object]:
    """The stored form: the update, when it arrived (seq = its position in the request) and an entry id."""
    return {**u.to_json(), "received_at": now, "seq": seq, "id": uuid.uuid4().hex}


def _snapshot(entries: list[dict[str, object]]) -> PendingSnapshot:
    """Entries in the order received -> the latest update per item, in arrival order, + every entry."""
    latest: dict[str, ItemUpdate] = {}
    for e in entries:
        item_id = str(e["item_id"])
        latest.pop(item_id, None)  # a re-sent item moves to its latest position
        latest[item_id] = ItemUpdate(item_id, cast(dict[str, FeatureValue], e["features"]))
    return PendingSnapshot(tuple(latest.values()), tuple((str(e["item_id"]), str(e["id"])) for e in entries))


@contextmanager
def _redis_errors(op: str) -> Iterator[None]:
    """redis-py errors -> StoreUnavailable (unreachable) or StoreError (the rest), as service.stores."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise StoreUnavailable(f"redis unavailable during catalog {op}: {exc}") from exc
    except redis.RedisError as exc:
        raise StoreError(f"redis error during catalog {op}: {exc}") from exc
