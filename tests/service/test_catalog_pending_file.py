"""PUT /v1/items without Redis (issue 23, finding 6): the pending file is appended to, never
re-read whole per call (benchmarks/operations/results/catalog_put_60k.txt: 1,117 -> 8 ms per put
at 60k pending items), and compacted to the latest line per item once it holds several lines
per item (service/catalog_updates.py FileCatalogUpdates)."""

from __future__ import annotations

from pathlib import Path

from service.catalog_updates import FileCatalogUpdates
from service.contract.catalog import ItemUpdate


def _item(i: int, price: float = 1.0) -> ItemUpdate:
    return ItemUpdate(f"i{i}", {"price": price})


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def test_counts_follow_appends_by_other_writers_and_replacements(tmp_path: Path) -> None:
    path = tmp_path / "pending.jsonl"
    a, b = FileCatalogUpdates(path), FileCatalogUpdates(path)  # two workers on one file
    assert a.put([_item(1), _item(2)]) == 2
    assert b.put([_item(2, 2.0), _item(3)]) == 3  # b indexes what a wrote
    assert a.put([_item(4)]) == 4  # a reads only b's lines and its own new one
    snap = a.snapshot()
    assert [u.item_id for u in snap.items] == ["i1", "i2", "i3", "i4"] and snap.items[1].features == {"price": 2.0}
    b.put([_item(5)])  # arrives after the snapshot: stays pending
    assert b.clear(snap) == 5  # the file is replaced: each index starts over
    assert a.count() == 1 and a.put([_item(6)]) == 2 and b.count() == 2


def test_the_file_is_compacted_to_the_latest_line_per_item(tmp_path: Path) -> None:
    path = tmp_path / "pending.jsonl"
    updates = FileCatalogUpdates(path)
    updates.COMPACT_MIN_LINES = 100
    for round_ in range(60):  # 60 updates of each of 5 items: 300 lines without compaction
        assert updates.put([_item(i, float(round_)) for i in range(5)]) == 5
    assert _lines(path) < 100
    snap = updates.snapshot()
    assert [u.item_id for u in snap.items] == [f"i{i}" for i in range(5)]
    assert all(u.features == {"price": 59.0} for u in snap.items)
    assert FileCatalogUpdates(path).count() == 5
