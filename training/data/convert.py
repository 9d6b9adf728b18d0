"""`recsys data convert`: any data source written out as the tables `csv:` / `parquet:` read
(training/data/tables.py): interactions in the source's row order, then items and users in their
tables' row order, so reading them back gives the same data set (the same fingerprint) whenever the
source's vocabularies are in order of first appearance (movielens:, csv:, parquet:; not synthetic,
whose vocabularies are fixed lists).

    interactions  user_id, item_id, timestamp (Unix seconds)[, rating][, event_type]
    items, users  item_id / user_id, then one column per feature: a categorical value, the values of
                  a multi-valued feature ('|'-joined in a CSV, a list in Parquet), a number
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from training.data.dataset import FeatureTable, RawLog
from training.data.tables import COLUMNS, EXTENSIONS, MULTI_SEP, Format, Kind, infer_csv_kind


def _number_text(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def _feature_columns(table: FeatureTable) -> dict[str, tuple[Kind, list[Any]]]:
    """name -> (kind, one value per row): a str, a list of str, or a float."""
    out: dict[str, tuple[Kind, list[Any]]] = {}
    for name, codes in table.categorical.items():
        vocab = table.vocab[name]
        out[name] = ("cat", [vocab[c - 1] if c > 0 else "" for c in codes.tolist()])
    for name, codes in table.multi.items():
        vocab = table.vocab[name]
        out[name] = ("multi", [[vocab[c - 1] for c in row if c > 0] for row in codes.tolist()])
    for name, col in table.numeric.items():
        out[name] = ("num", [float(v) for v in col.tolist()])
    return out


def _write_csv(path: Path, columns: dict[str, list[Any]]) -> None:
    rows = zip(*columns.values())
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(list(columns))
        for row in rows:
            w.writerow([MULTI_SEP.join(v) if isinstance(v, list) else _number_text(v) if isinstance(v, float) else v
                        for v in row])


def _write_parquet(path: Path, columns: dict[str, list[Any]], types: dict[str, str]) -> None:
    import pyarrow as pa  # imported here: only Parquet output needs it
    import pyarrow.parquet as pq

    arrow = {"string": pa.string(), "int64": pa.int64(), "float64": pa.float64(), "list": pa.list_(pa.string())}
    pq.write_table(pa.table({name: pa.array(values, type=arrow[types[name]]) for name, values in columns.items()}), path)


def write_tables(raw: RawLog, folder: str | Path, fmt: Format) -> tuple[list[Path], str]:
    """Write `raw` as interactions / items / users tables into `folder`; returns the files and the
    data spec that reads them back (with the declarations a CSV needs where inference would differ,
    and the event types' weights)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ext = EXTENSIONS[fmt]
    options: list[str] = []
    inter: dict[str, list[Any]] = {
        COLUMNS["user"]: [str(u) for u in np.asarray(raw.users).tolist()],
        COLUMNS["item"]: [str(i) for i in np.asarray(raw.items).tolist()],
        COLUMNS["time"]: np.asarray(raw.timestamps, dtype=np.int64).tolist(),
    }
    types = {COLUMNS["user"]: "string", COLUMNS["item"]: "string", COLUMNS["time"]: "int64"}  # Parquet's
    if raw.ratings is not None:
        inter[COLUMNS["rating"]] = [float(r) for r in np.asarray(raw.ratings).tolist()]
        types[COLUMNS["rating"]] = "float64"
    if raw.events is not None:
        inter[COLUMNS["event"]] = list(raw.events)
        types[COLUMNS["event"]] = "string"
        if raw.weights is not None:
            weight = dict(zip(raw.events, np.asarray(raw.weights).tolist()))
            options += [f"weight.{t}={w:g}" for t, w in sorted(weight.items()) if w != 1.0]
    files = [folder / f"interactions{ext}"]
    if fmt == "csv":
        _write_csv(files[0], inter)
    else:
        _write_parquet(files[0], inter, types)
    declared: dict[Kind, list[str]] = {"cat": [], "multi": [], "num": []}
    for name, side, key in (("items", raw.item_table, COLUMNS["item"]), ("users", raw.user_table, COLUMNS["user"])):
        if side is None:
            continue
        ids, table = side
        feats = _feature_columns(table)
        columns: dict[str, list[Any]] = {key: [str(e) for e in ids]}
        ftypes = {key: "string"}
        for col, (kind, values) in feats.items():
            columns[col] = values
            ftypes[col] = {"cat": "string", "multi": "list", "num": "float64"}[kind]
            if fmt == "csv":
                text = [MULTI_SEP.join(v) if kind == "multi" else _number_text(v) if kind == "num" else v for v in values]
                if infer_csv_kind(text) != kind:
                    declared[kind].append(col)
        path = folder / f"{name}{ext}"
        if fmt == "csv":
            _write_csv(path, columns)
        else:
            _write_parquet(path, columns, ftypes)
        files.append(path)
    options += [f"{kind}={'+'.join(cols)}" for kind, cols in declared.items() if cols]
    return files, ",".join([f"{fmt}:{folder}", *options])
