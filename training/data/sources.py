"""Data sources selected by `--data SPEC` (DESIGN §2).

- `synthetic[:key=value,...]`  the embedded, deterministic generator
- `movielens:<dir>`            ml-100k (u.data, u.item, u.user) or ml-1m (*.dat)
- `seqtxt:<file>`              one user per line: `user item item ...` in time order
- `csv:<file or dir>[,key=value,...]`      an interactions table, optional items= / users= feature
- `parquet:<file or dir>[,key=value,...]`  tables and event types with weights (training/data/tables.py)
- `log:<folder>` / `log:redis://host:port[/db][?key=<stream>]`
                               the service's durable event log (service/online_log.py): every
                               accepted event, in log order, timestamps floored to seconds

Every parse error is a DataError naming the file and line (and the column, for tables).
`read` gives the data set as read (a RawLog, which `recsys data convert` writes out as tables);
`load` builds it into a Dataset.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import redis

from service.online_log import read_events

from training.data import tables
from training.data.dataset import (DataError, Dataset, FeatureTable, RawLog, encode_categorical, encode_multi,
                                   fill_median)
from training.data.synthetic import parse_synthetic_spec, synthetic_log

SOURCES = ("synthetic[:key=value,...], movielens:<dir>, seqtxt:<file>, csv:<file|dir>[,...], "
           "parquet:<file|dir>[,...], log:<dir>|log:redis://...")

# ml-1m's age codes; ml-100k's raw ages are bucketed onto the same scale
ML_AGE_BUCKETS = [(1, "<18"), (18, "18-24"), (25, "25-34"), (35, "35-44"), (45, "45-49"), (50, "50-55"), (56, "56+")]


def load(spec: str) -> Dataset:
    return read(spec).build()


def read(spec: str) -> RawLog:
    """The data set of `spec` as read, before ids are mapped."""
    kind, _, arg = spec.partition(":")
    if kind == "synthetic":
        return synthetic_log(parse_synthetic_spec(arg))
    if kind in ("movielens", "seqtxt", *tables.FORMATS, "log") and not arg:
        raise DataError(f"data source '{kind}' needs a path: {kind}:<path>")
    if kind == "movielens":
        return read_movielens(Path(arg))
    if kind == "seqtxt":
        return read_seqtxt(Path(arg))
    if kind in tables.FORMATS:
        return tables.read_tables(kind, arg)
    if kind == "log":
        return read_log(arg)
    raise DataError(f"unknown data source '{spec}' (expected {SOURCES})")


def _lines(path: Path, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with path.open(encoding=encoding, errors="strict", newline="") as fh:
        try:
            for lineno, line in enumerate(fh, start=1):
                line = line.rstrip("\r\n")
                if line.strip():
                    yield lineno, line
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not {encoding} text ({exc.reason})") from None


def _int(value: str, path: Path, lineno: int, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataError(f"{path}:{lineno}: {what} must be an integer, got '{value}'") from None


def _float(value: str, path: Path, lineno: int, what: str) -> float:
    try:
        out = float(value)
    except ValueError:
        raise DataError(f"{path}:{lineno}: {what} must be a number, got '{value}'") from None
    if not np.isfinite(out):
        raise DataError(f"{path}:{lineno}: {what} must be finite, got '{value}'")
    return out


def _ratings_log(path: Path, sep: str, encoding: str = "utf-8") -> tuple[list[str], list[str], list[int], list[float]]:
    users: list[str] = []
    items: list[str] = []
    times: list[int] = []
    ratings: list[float] = []
    for lineno, line in _lines(path, encoding):
        parts = line.split(sep)
        if len(parts) != 4:
            raise DataError(f"{path}:{lineno}: expected 4 fields separated by {sep!r}, got {len(parts)}")
        users.append(parts[0].strip())
        items.append(parts[1].strip())
        ratings.append(_float(parts[2], path, lineno, "rating"))
        times.append(_int(parts[3], path, lineno, "timestamp"))
    if not users:
        raise DataError(f"{path}: no interactions")
    return users, items, times, ratings


def _age_bucket(age: int) -> str:
    label = ML_AGE_BUCKETS[0][1]
    for lower, name in ML_AGE_BUCKETS:
        if age >= lower:
            label = name
    return label


def read_movielens(root: Path) -> RawLog:
    if (root / "u.data").is_file():
        return _load_ml100k(root)
    if (root / "ratings.dat").is_file():
        return _load_ml1m(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such directory")
    raise DataError(f"{root}: neither u.data (ml-100k) nor ratings.dat (ml-1m) found")


def _load_ml100k(root: Path) -> RawLog:
    users, items, times, ratings = _ratings_log(root / "u.data", "\t")
    user_table = _ml_user_table(root / "u.user", "|", ml1m=False)
    genres = [line.split("|")[0] for _, line in _lines(root / "u.genre", "latin-1")] if (root / "u.genre").is_file() else []
    item_ids: list[str] = []
    item_genres: list[list[str]] = []
    years: list[float] = []
    if (root / "u.item").is_file():
        path = root / "u.item"
        for lineno, line in _lines(path, "latin-1"):
            parts = line.split("|")
            if len(parts) < 6:
                raise DataError(f"{path}:{lineno}: expected at least 6 fields separated by '|', got {len(parts)}")
            flags = parts[5:]
            names = genres if len(genres) == len(flags) else [f"genre{j}" for j in range(len(flags))]
            item_ids.append(parts[0])
            item_genres.append([g for g, f in zip(names, flags) if f.strip() == "1"])
            years.append(_year(parts[2]))
    item_table = _ml_item_table(item_ids, item_genres, years) if item_ids else None
    return RawLog("ml-100k", users, items, np.array(times), np.array(ratings), user_table=user_table,
                  item_table=item_table)


def _load_ml1m(root: Path) -> RawLog:
    users, items, times, ratings = _ratings_log(root / "ratings.dat", "::", "latin-1")
    user_table = _ml_user_table(root / "users.dat", "::", ml1m=True)
    item_ids: list[str] = []
    item_genres: list[list[str]] = []
    years: list[float] = []
    path = root / "movies.dat"
    if path.is_file():
        for lineno, line in _lines(path, "latin-1"):
            parts = line.split("::")
            if len(parts) != 3:
                raise DataError(f"{path}:{lineno}: expected 3 fields separated by '::', got {len(parts)}")
            item_ids.append(parts[0])
            item_genres.append([g for g in parts[2].split("|") if g])
            title = parts[1].rstrip()
            years.append(float(title[-5:-1]) if title.endswith(")") and title[-5:-1].isdigit() else np.nan)
    item_table = _ml_item_table(item_ids, item_genres, years) if item_ids else None
    return RawLog("ml-1m", users, items, np.array(times), np.array(ratings), user_table=user_table,
                  item_table=item_table)


def _year(date: str) -> float:
    tail = date.strip()[-4:]
    return float(tail) if tail.isdigit() else np.nan


def _ml_user_table(path: Path, sep: str, *, ml1m: bool) -> tuple[list[str], FeatureTable] | None:
    if not path.is_file():
        return None
    ids: list[str] = []
    ages: list[str] = []
    genders: list[str] = []
    occupations: list[str] = []
    for lineno, line in _lines(path, "latin-1"):
        parts = line.split(sep)
        if len(parts) != 5:
            raise DataError(f"{path}:{lineno}: expected 5 fields separated by {sep!r}, got {len(parts)}")
        if ml1m:  # UserID::Gender::Age::Occupation::Zip
            uid, gender, age, occ = parts[0], parts[1], parts[2], parts[3]
        else:  # id|age|gender|occupation|zip
            uid, age, gender, occ = parts[0], parts[1], parts[2], parts[3]
        ids.append(uid)
        ages.append(_age_bucket(_int(age, path, lineno, "age")))
        genders.append(gender)
        occupations.append(occ)
    table = FeatureTable()
    for name, values in (("age", ages), ("gender", genders), ("occupation", occupations)):
        table.categorical[name], table.vocab[name] = encode_categorical(values)
    return ids, table


def _ml_item_table(ids: list[str], genres: list[list[str]], years: list[float]) -> tuple[list[str], FeatureTable]:
    codes, vocab = encode_multi(genres)
    table = FeatureTable(multi={"genres": codes}, numeric={"year": fill_median(np.array(years))}, vocab={"genres": vocab})
    return ids, table


def read_seqtxt(path: Path) -> RawLog:
    users: list[str] = []
    items: list[str] = []
    for lineno, line in _lines(path):
        parts = line.split()
        if len(parts) < 2:
            raise DataError(f"{path}:{lineno}: expected 'user item [item ...]', got {len(parts)} field(s)")
        users.extend([parts[0]] * (len(parts) - 1))
        items.extend(parts[1:])
    if not users:
        raise DataError(f"{path}: no interactions")
    # the file order is the time order
    return RawLog(path.name, users, items, np.arange(len(users), dtype=np.int64))


def read_log(spec: str) -> RawLog:
    """The events the service logged (a folder of JSON Lines or a Redis stream), exactly as logged."""
    users: list[str] = []
    items: list[str] = []
    times: list[int] = []
    try:
        for ev in read_events(spec):
            users.append(ev.user_id)
            items.append(ev.item_id)
            times.append(math.floor(ev.ts))
    except (ValueError, OSError, redis.RedisError) as exc:
        raise DataError(f"log:{spec}: {exc}") from None
    if not users:
        raise DataError(f"log:{spec}: no events")
    return RawLog(f"log:{spec}", users, items, np.array(times, dtype=np.int64))


def with_log(base: RawLog, logged: RawLog) -> RawLog:
    """The base data followed by the logged events (`recsys retrain`): users and items the base data
    does not know are new ids like any other (build_dataset maps every id it sees; a new item or
    user has no row in the base feature tables and gets zero features, as any id missing from a
    table does). The logged rows come after the base rows in time: a logged time earlier than the
    base data's last one (a base set whose clock is ahead, e.g. the synthetic generator's) is moved
    to just after it, gaps kept, so each user's sequence is their base history, then what they
    did online. Ratings are kept only when both have them; event types with their weights are
    kept from the base data, a logged row's type being "logged" (weight 1)."""
    base_ts = np.asarray(base.timestamps, dtype=np.int64)
    log_ts = np.asarray(logged.timestamps, dtype=np.int64)
    floor = int(base_ts.max()) + 1 if base_ts.size else 0
    if log_ts.size and int(log_ts.min()) < floor:
        log_ts = floor + (log_ts - int(log_ts.min()))
    ratings = (None if base.ratings is None or logged.ratings is None
               else np.concatenate([np.asarray(base.ratings), np.asarray(logged.ratings)]))
    events = None if base.events is None else [*base.events, *([LOGGED_EVENT] * log_ts.size)]
    weights = (None if base.weights is None or base.events is None
               else np.concatenate([np.asarray(base.weights, dtype=np.float64), np.ones(log_ts.size)]))
    return RawLog(f"{base.name}+{logged.name}",
                  [*map(str, np.asarray(base.users).tolist()), *map(str, np.asarray(logged.users).tolist())],
                  [*map(str, np.asarray(base.items).tolist()), *map(str, np.asarray(logged.items).tolist())],
                  np.concatenate([base_ts, log_ts]), ratings, events, weights, base.user_table, base.item_table)


LOGGED_EVENT = "logged"  # the event type of a logged row merged after a base set with event types
