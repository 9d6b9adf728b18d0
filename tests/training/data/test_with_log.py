"""training.data.sources.with_log: the base data followed by the service's event log (`recsys retrain`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from service.contract.online_log import EVENTS_FILE_PREFIX, LoggedEvent
from service.online_log import RotatingJsonl
from training.data.convert import write_tables
from training.data.sources import load, read, with_log
from training.data.synthetic import parse_synthetic_spec, synthetic_log

BASE = "synthetic:users=20,items=30,categories=5,seed=3"


def _write_log(folder: Path, rows: list[tuple[str, str, float]]) -> str:
    """The service's own file log writer, as RECSYS_LOG_DIR gets it."""
    sink = RotatingJsonl(folder, EVENTS_FILE_PREFIX)
    sink.write([json.dumps(LoggedEvent(user, item, "click", ts).to_json()) for user, item, ts in rows])
    sink.close()
    return f"log:{folder}"


def test_logged_events_follow_each_users_base_history_with_new_users_and_items(tmp_path: Path) -> None:
    base = synthetic_log(parse_synthetic_spec(BASE.partition(":")[2]))
    known_user, known_item = str(base.users[0]), str(base.items[0])
    log = _write_log(tmp_path / "log", [(known_user, "new-item", 100.0), ("new-user", known_item, 101.0),
                                        (known_user, known_item, 102.0)])
    merged = with_log(read(BASE), read(log))
    ds, before = merged.build(), read(BASE).build()
    assert ds.num_items == before.num_items + 1 and len(ds.user_ids) == len(before.user_ids) + 1
    assert len(ds.items) == len(before.items) + 3
    # the logged rows come after the user's base history, in log order (the log's clock is behind)
    row = list(ds.user_ids).index(known_user)
    seq = [str(ds.item_ids[i]) for i in ds.items[ds.offsets[row]:ds.offsets[row + 1]]]
    base_row = list(before.user_ids).index(known_user)
    base_seq = [str(before.item_ids[i]) for i in before.items[before.offsets[base_row]:before.offsets[base_row + 1]]]
    assert seq == base_seq + ["new-item", known_item]
    # a new item has no row in the base feature table: zero features, like any id missing from a table
    assert ds.item_features is not None
    new = list(ds.item_ids).index("new-item")
    assert all(int(col[new]) == 0 for col in ds.item_features.categorical.values())
    assert merged.ratings is None  # the log has none


def test_the_snapshot_reads_back_as_the_same_data_set(tmp_path: Path) -> None:
    log = _write_log(tmp_path / "log", [("new-user", "1", 5.0), ("new-user", "2", 6.0)])
    merged = with_log(read(BASE), read(log))
    _files, spec = write_tables(merged, tmp_path / "snap", "parquet")
    back, built = load(spec), merged.build()
    assert back.num_items == built.num_items and len(back.items) == len(built.items)
    assert np.array_equal(np.sort(back.user_ids.astype(str)), np.sort(built.user_ids.astype(str)))
