"""service/ids.py: the catalog id lookup (NumPy FNV-1a hashes, exact check, shared hashes)."""

from __future__ import annotations

import numpy as np
import pytest

import service.ids as ids_mod
from service.ids import ItemIndex, fnv1a


def catalog(*ids: str) -> np.ndarray:
    return np.asarray(["<pad>", *ids])


def test_lookup_matches_a_dict_built_in_index_order() -> None:
    rng = np.random.default_rng(0)
    names = [f"item-{i}" for i in rng.permutation(5000)] + ["é→", "x", "item-17"]  # item-17 repeats
    arr = catalog(*names)
    want = {name: i for i, name in enumerate(arr.tolist()) if i > 0}  # the last index wins
    index = ItemIndex(arr)
    queries = [*rng.choice(names, 300).tolist(), "missing", "", "item-170000", "x" * 40, "é"]
    got = index.lookup(queries).tolist()
    assert got == [want.get(q, 0) for q in queries]
    assert len(index) == len(want) and dict(index.items()) == want


def test_an_id_longer_than_the_catalog_width_is_unknown_not_its_prefix() -> None:
    index = ItemIndex(catalog("abc", "abd"))  # width 5 (<pad>)
    assert index.lookup(["abc", "abcde", "abcdefgh", "<pad>x"]).tolist() == [1, 0, 0, 0]


def test_hash_collisions_never_map_an_id_to_another_item(monkeypatch: pytest.MonkeyPatch) -> None:
    """With every id hashing alike, lookups still give each id its own index (the shared-hash dict)."""
    monkeypatch.setattr(ids_mod, "fnv1a", lambda a: np.zeros(a.size, np.int64))
    index = ItemIndex(catalog("a", "b", "c", "b"))
    assert index.lookup(["a", "b", "c", "d"]).tolist() == [1, 4, 3, 0]


def test_fnv1a_is_the_reference_algorithm_on_code_points() -> None:
    def reference(s: str, width: int) -> int:
        h = 0xCBF29CE484222325
        for ch in s.ljust(width, "\0"):
            h = ((h ^ ord(ch)) * 0x100000001B3) % 2**64
        return h - 2**64 if h >= 2**63 else h

    arr = np.asarray(["a", "hello", "ünï", ""])
    assert fnv1a(arr).tolist() == [reference(s, 5) for s in arr.tolist()]
