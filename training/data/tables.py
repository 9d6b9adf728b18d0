"""`csv:` and `parquet:` data sources: an interactions table, optional item and user feature tables,
and event types with training weights. `recsys data convert` writes the other way (training/data/convert.py).

    csv:<file or folder>[,key=value,...]      parquet:<file or folder>[,key=value,...]

A folder holds interactions.csv (.parquet) and, when present, items.csv and users.csv (.parquet).
Keys (a path may not contain ','):
    items=<file>  users=<file>      feature tables (CSV or Parquet, by the file's extension)
    user= item= time= rating= event= the interactions' column names (defaults: user_id, item_id,
                                    timestamp, rating, event_type; rating and event are optional)
    weight.<type>=<w>               training weight of an event type (w > 0; types not named: 1)
    cat=a+b  multi=a+b  num=a+b     a feature column's kind, instead of the inferred one
    skip=a+b                        feature columns to leave out (free text, URLs)

Interactions: one row per event. A time is Unix seconds (a number) or ISO-8601 (2024-01-31T12:00:00Z;
without a zone: UTC), kept in whole seconds; events of a user within one second keep their row order.
A CSV without a header is read as user_id,item_id,timestamp[,rating].
Feature tables: the key column (item_id / user_id, or the item= / user= name) and one column per
feature. Kinds, when not declared: in a CSV a column is numeric when every non-empty value is a
number, multi-valued when some value holds '|' (the separator), else categorical; in Parquet list
columns are multi-valued, number columns numeric, the rest categorical. A missing categorical or
multi value is "unknown" (code 0); a missing number is the column's median. Items only the items
table lists are catalog items without interactions yet (cold start); users only the users table
lists are dropped. What was read and inferred is logged at INFO (the CLI prints it).

Bad rows are DataErrors naming file, row and column: `items.csv:7: column 'year': ...` (CSV: the line,
the header being line 1), `items.parquet: row 6, column 'year': ...` (Parquet: the 1-based row).
"""

from __future__ import annotations

import csv
import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np

from service.contract.features import HISTORY, LAST_ITEM, USER_LOG_COUNT
from training.data.dataset import DataError, FeatureTable, RawLog, encode_categorical, encode_multi, fill_median

log = logging.getLogger(__name__)

Format = Literal["csv", "parquet"]
FORMATS: tuple[Format, ...] = ("csv", "parquet")
Kind = Literal["cat", "multi", "num"]
KINDS: tuple[Kind, ...] = ("cat", "multi", "num")
KIND_NAMES = {"cat": "categorical", "multi": "multi-valued", "num": "numeric"}
MULTI_SEP = "|"  # between the values of a multi-valued cell in a CSV
TABLE_NAMES = ("interactions", "items", "users")  # the files a folder holds, with the format's extension
EXTENSIONS: dict[Format, str] = {"csv": ".csv", "parquet": ".parquet"}
COLUMNS = {"user": "user_id", "item": "item_id", "time": "timestamp", "rating": "rating", "event": "event_type"}
POSITIONAL = ("user_id", "item_id", "timestamp", "rating")  # a CSV without a header
# columns the pre-ranker adds to each side itself (training/data/features.py): a feature may not take their names
RESERVED = {"items": {"item_id", "item_log_count", "item_mean_label"},
            "users": {"user_id", HISTORY, LAST_ITEM, USER_LOG_COUNT, "user_mean_label"}}


@dataclass
class TableSpec:
    """A parsed csv:/parquet: spec."""

    kind: Format
    interactions: Path
    items: Path | None = None
    users: Path | None = None
    columns: dict[str, str] = field(default_factory=lambda: dict(COLUMNS))
    weights: dict[str, float] = field(default_factory=dict)
    kinds: dict[str, Kind] = field(default_factory=dict)
    skip: set[str] = field(default_factory=set)


def parse_spec(kind: Format, arg: str) -> TableSpec:
    path, *options = arg.split(",")
    root = Path(path)
    ext = EXTENSIONS[kind]
    if root.is_dir():
        spec = TableSpec(kind, root / f"interactions{ext}")
        if not spec.interactions.is_file():
            raise DataError(f"{root}: no interactions{ext} in this folder")
        spec.items = root / f"items{ext}" if (root / f"items{ext}").is_file() else None
        spec.users = root / f"users{ext}" if (root / f"users{ext}").is_file() else None
    else:
        spec = TableSpec(kind, root)
    known = ("items", "users", *COLUMNS, "weight.<type>", *KINDS, "skip")
    for opt in options:
        key, eq, value = opt.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not value:
            raise DataError(f"{kind}: option '{opt}' is not key=value (keys: {', '.join(known)})")
        if key in ("items", "users"):
            setattr(spec, key, Path(value))
        elif key in COLUMNS:
            spec.columns[key] = value
        elif key.startswith("weight.") and len(key) > len("weight."):
            try:
                w = float(value)
            except ValueError:
                w = math.nan
            if not (math.isfinite(w) and w > 0):
                raise DataError(f"{kind}: {key} must be a number > 0, got '{value}'")
            spec.weights[key[len("weight."):]] = w
        elif key in KINDS or key == "skip":
            for name in value.split("+"):
                if key == "skip":
                    spec.skip.add(name)
                elif spec.kinds.setdefault(name, key) != key:  # type: ignore[arg-type]
                    raise DataError(f"{kind}: column '{name}' declared both {spec.kinds[name]} and {key}")
        else:
            raise DataError(f"{kind}: unknown option '{key}' (keys: {', '.join(known)})")
    return spec


# --- reading a table: column name -> raw values, and where each row is ---


@dataclass
class Table:
    """One table as read: raw values per column (str for CSV; Python values or None for Parquet)."""

    path: Path
    columns: dict[str, list[Any]]
    lines: list[int] | None  # CSV: the line of each row; None for Parquet
    parquet_types: dict[str, str] = field(default_factory=dict)  # Parquet: "list", "number", "time", "other"

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()), []))

    def where(self, row: int, column: str) -> str:
        if self.lines is not None:
            return f"{self.path}:{self.lines[row]}: column '{column}'"
        return f"{self.path}: row {row + 1}, column '{column}'"

    def row_name(self, row: int) -> str:
        return f"line {self.lines[row]}" if self.lines is not None else f"row {row + 1}"

    def error(self, row: int, column: str, message: str) -> DataError:
        return DataError(f"{self.where(row, column)}: {message}")

    def column(self, name: str, role: str) -> list[Any]:
        if name not in self.columns:
            raise DataError(f"{self.path}: no column '{name}' ({role}; columns: {', '.join(self.columns)})")
        return self.columns[name]


def read_table(path: Path, key: str, positional: Sequence[str] = ()) -> Table:
    """A CSV (header required unless `positional` names its columns) or, by extension, a Parquet file."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix.lower() in (".parquet", ".pq"):
        return _read_parquet(path)
    return _read_csv(path, key, positional)


def _read_csv(path: Path, key: str, positional: Sequence[str]) -> Table:
    rows: list[list[str]] = []
    lines: list[int] = []
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        try:
            for row in reader:
                if any(c.strip() for c in row):
                    rows.append([c.strip() for c in row])
                    lines.append(reader.line_num)
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not utf-8 text ({exc.reason})") from None
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: {exc}") from None
    first = f"line {lines[0]}" if lines else ""
    if rows and key in rows[0]:
        header, rows, lines, first = rows[0], rows[1:], lines[1:], "the header"
        if len(set(header)) != len(header):
            dup = next(h for h in header if header.count(h) > 1)
            raise DataError(f"{path}: column '{dup}' appears twice in the header")
    elif positional and rows:
        width = len(rows[0])
        if width not in (len(positional) - 1, len(positional)):
            raise DataError(f"{path}:{lines[0]}: expected a header row naming '{key}', or "
                            f"{','.join(positional[:-1])}[,{positional[-1]}], got {width} fields")
        header = list(positional[:width])
    else:
        raise DataError(f"{path}: no header row naming '{key}'" if rows else f"{path}: empty table")
    for row, line in zip(rows, lines):
        if len(row) != len(header):
            raise DataError(f"{path}:{line}: {len(row)} fields where {first} has {len(header)}")
    return Table(path, {name: [r[j] for r in rows] for j, name in enumerate(header)}, lines)


def _read_parquet(path: Path) -> Table:
    import pyarrow as pa  # imported here: only Parquet sources need it
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    columns: dict[str, list[Any]] = {}
    types: dict[str, str] = {}
    for name, col in zip(table.column_names, table.columns):
        t = col.type
        if pa.types.is_dictionary(t):
            col, t = col.cast(t.value_type), t.value_type
        if pa.types.is_timestamp(t) or pa.types.is_date(t):  # -> whole Unix seconds (zoned ones are stored in UTC)
            per_second = {"s": 1, "ms": 1000, "us": 10**6, "ns": 10**9}[t.unit] if pa.types.is_timestamp(t) else 1000
            raw = col.cast(pa.int64() if not pa.types.is_date32(t) else pa.int32()).to_pylist()
            if pa.types.is_date32(t):  # days
                columns[name] = [None if v is None else v * 86400 for v in raw]
            else:
                columns[name] = [None if v is None else v // per_second for v in raw]
            types[name] = "time"
            continue
        columns[name] = col.to_pylist()
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            types[name] = "list"
        elif pa.types.is_integer(t) or pa.types.is_floating(t):
            types[name] = "number"
        else:
            types[name] = "other"
    return Table(path, columns, None, types)


# --- values ---


def _text(v: Any) -> str:
    """A cell as an id or category string ('' when missing); 3.0 in a Parquet number column is '3'."""
    if v is None:
        return ""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v).strip()


def _number(v: Any) -> float | None:
    """float of a cell, None when not a finite number."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        out = float(v)
    else:
        try:
            out = float(str(v))
        except ValueError:
            return None
    return out if math.isfinite(out) else None


def parse_time(v: Any) -> int | None:
    """Unix seconds of a cell: a number (Unix seconds) or an ISO-8601 string; None when neither."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, int):
        return v
    n = _number(v)
    if n is not None:
        return math.floor(n)
    try:
        t = datetime.fromisoformat(str(v).strip())
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return math.floor(t.timestamp())


def _ids(table: Table, name: str, role: str) -> list[str]:
    out = [_text(v) for v in table.column(name, role)]
    for row, v in enumerate(out):
        if not v:
            raise table.error(row, name, f"empty {role}")
    return out


def _values(table: Table, name: str, role: str, parse: Callable[[Any], Any], expected: str) -> list[Any]:
    out = []
    for row, raw in enumerate(table.column(name, role)):
        v = parse(raw)
        if v is None:
            raise table.error(row, name, f"expected {expected}, got {'nothing' if _text(raw) == '' else repr(raw)}")
        out.append(v)
    return out


# --- interactions ---


def read_interactions(spec: TableSpec) -> tuple[list[str], list[str], np.ndarray, np.ndarray | None, list[str] | None]:
    """(users, items, timestamps, ratings or None, event types or None) of the interactions table."""
    cols = spec.columns
    table = read_table(spec.interactions, cols["user"], POSITIONAL if spec.kind == "csv" else ())
    if len(table) == 0:
        raise DataError(f"{spec.interactions}: no interactions")
    users = _ids(table, cols["user"], "user id")
    items = _ids(table, cols["item"], "item id")
    times = _values(table, cols["time"], "time", parse_time, "Unix seconds or an ISO-8601 time (2024-01-31T12:00:00Z)")
    ratings = None
    if cols["rating"] in table.columns:
        ratings = np.array(_values(table, cols["rating"], "rating", _number, "a finite number"), dtype=np.float64)
    events = None
    if cols["event"] in table.columns:
        events = _ids(table, cols["event"], "event type")
    elif spec.weights:
        raise DataError(f"{spec.interactions}: weight.{next(iter(spec.weights))} given but no event column "
                        f"'{cols['event']}' (name it with event=<column>)")
    return users, items, np.array(times, dtype=np.int64), ratings, events


def event_weights(events: list[str], weights: dict[str, float], path: Path) -> np.ndarray:
    """(E,) float32 weight of each row's event type; logs the types, their counts and weights."""
    counts = Counter(events)
    unknown = sorted(set(weights) - set(counts))
    if unknown:
        raise DataError(f"{path}: weight.{unknown[0]}: no row has event type '{unknown[0]}' "
                        f"(types: {', '.join(sorted(counts))})")
    log.info("%s: event types %s", path, ", ".join(f"{t} ({n} rows, weight {weights.get(t, 1.0):g})"
                                                   for t, n in counts.most_common()))
    lookup = {t: weights.get(t, 1.0) for t in counts}
    return np.array([lookup[e] for e in events], dtype=np.float32)


# --- feature tables ---


def infer_csv_kind(values: Sequence[str]) -> Kind:
    """The kind a CSV column's values are read as when it is not declared (module doc)."""
    filled = [v for v in values if v != ""]
    if filled and all(_number(v) is not None for v in filled):
        return "num"
    if any(MULTI_SEP in v for v in filled):
        return "multi"
    return "cat"


def _kind(table: Table, name: str, declared: dict[str, Kind]) -> Kind:
    if name in declared:
        return declared[name]
    if table.lines is not None:
        return infer_csv_kind(table.columns[name])
    return {"list": "multi", "number": "num"}.get(table.parquet_types.get(name, ""), "cat")  # type: ignore[return-value]


def _multi_cell(table: Table, row: int, name: str, v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, list):
        return [x for x in map(_text, v) if x]
    if not isinstance(v, str):
        raise table.error(row, name, f"expected a list or '{MULTI_SEP}'-separated text, got {v!r}")
    return [x.strip() for x in v.split(MULTI_SEP) if x.strip()]


def read_features(table: Table, key: str, spec: TableSpec, side: str) -> tuple[list[str], FeatureTable]:
    """(ids, features in the table's row order) of the items or users table (`side`); logs the columns' kinds."""
    ids = _ids(table, key, key)
    taken = sorted(RESERVED[side] & (set(table.columns) - {key} - spec.skip))
    if taken:
        raise DataError(f"{table.path}: column '{taken[0]}' has the name of a feature the pipeline adds itself; "
                        f"rename it, or leave it out with skip={taken[0]}")
    seen: dict[str, int] = {}
    for row, e in enumerate(ids):
        if seen.setdefault(e, row) != row:
            raise table.error(row, key, f"'{e}' appears again (first on {table.row_name(seen[e])})")
    out = FeatureTable()
    described = []
    for name, raw in table.columns.items():
        if name == key or name in spec.skip:
            continue
        kind = _kind(table, name, spec.kinds)
        if kind == "num":
            nums = [None if _text(v) == "" else _number(v) for v in raw]
            bad = next((r for r, (n, v) in enumerate(zip(nums, raw)) if n is None and _text(v) != ""), None)
            if bad is not None:
                raise table.error(bad, name, f"expected a finite number, got {raw[bad]!r}")
            col = np.array([math.nan if n is None else n for n in nums], dtype=np.float32)
            out.numeric[name] = fill_median(col)
            gaps = np.isnan(col)
            filled = f", {int(gaps.sum())} missing -> median {out.numeric[name][gaps][0]:g}" if gaps.any() else ""
            described.append(f"{name} (numeric{filled})")
        elif kind == "multi":
            out.multi[name], out.vocab[name] = encode_multi([_multi_cell(table, r, name, v) for r, v in enumerate(raw)])
            described.append(f"{name} (multi-valued, {len(out.vocab[name])} values)")
        else:
            for row, v in enumerate(raw):
                if isinstance(v, (list, dict)):
                    raise table.error(row, name, f"expected one value, got {v!r} (declare multi={name})")
            out.categorical[name], out.vocab[name] = encode_categorical([_text(v) for v in raw])
            described.append(f"{name} (categorical, {len(out.vocab[name])} values)")
    log.info("%s: %d rows by %s; features: %s", table.path, len(ids), key, ", ".join(described) or "none")
    return ids, out


def read_tables(kind: Format, arg: str) -> RawLog:
    """The data set of a csv:/parquet: spec."""
    spec = parse_spec(kind, arg)
    users, items, times, ratings, events = read_interactions(spec)
    weights = None if events is None else event_weights(events, spec.weights, spec.interactions)
    if weights is not None and bool((weights == 1.0).all()):
        weights = None  # every type at 1: the same data set as without types
    log.info("%s: %d interactions, %s", spec.interactions, len(users),
             "with ratings" if ratings is not None else "no ratings")
    sides = [(path, spec.columns[role]) for path, role in ((spec.items, "item"), (spec.users, "user")) if path]
    read = {path: read_table(path, key) for path, key in sides}
    stray = sorted((set(spec.kinds) | spec.skip) - {c for t in read.values() for c in t.columns})
    if stray:  # a declared column that no feature table has is most likely a typo
        raise DataError(f"{kind}: declared column '{stray[0]}' is in no feature table "
                        f"({', '.join(str(p) for p in read) or 'none given'})")
    item_table = read_features(read[spec.items], spec.columns["item"], spec, "items") if spec.items else None
    user_table = read_features(read[spec.users], spec.columns["user"], spec, "users") if spec.users else None
    name = spec.interactions.parent.name if spec.interactions.stem == "interactions" else spec.interactions.name
    return RawLog(name, users, items, times, ratings, events=events, weights=weights,
                  user_table=user_table, item_table=item_table)
