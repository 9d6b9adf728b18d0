"""service/ids.py: the catalog id lookup (NumPy polynomial hashes, exact check, shared hashes)."""

from __future__ import annotations

import numpy as np
import pytest

import service.ids as ids_mod
from service.ids import ItemIndex, poly_hash


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
    monkeypatch.setattr(ids_mod, "poly_hash", lambda a: np.zeros(a.size, np.int64))
    index = ItemIndex(catalog("a", "b", "c", "b"))
    assert index.lookup(["a", "b", "c", "d"]).tolist() == [1, 4, 3, 0]


def test_poly_hash_is_the_reference_sum_for_small_and_large_arrays() -> None:
    def reference(s: str, width: int) -> int:
        h = 0
        for j, ch in enumerate(s.ljust(width, "\0")):
            h = (h + ord(ch) * pow(0x100000001B3, j + 1, 2**64)) % 2**64
        return h - 2**64 if h >= 2**63 else h

    arr = np.asarray(["a", "hello", "ünï", "", "hellp"])
    assert poly_hash(arr).tolist() == [reference(s, 5) for s in arr.tolist()]
    big = np.asarray([f"id{i}" for i in range(3000)] + arr.tolist())  # the per-column path
    np.testing.assert_array_equal(poly_hash(big)[-5:], poly_hash(arr.astype(big.dtype)))
