"""service/contract/catalog.py: the catalog.npz names (the on-disk spelling is pinned here and
nowhere else), the checked split of a catalog, and ItemCatalog growing with item updates."""

from __future__ import annotations

import numpy as np
import pytest

from service.contract.catalog import (
    FEATURE_KINDS,
    CatalogArrays,
    CatalogError,
    ItemCatalog,
    ItemFeatures,
    ItemUpdate,
    KeyKind,
    is_vocab,
    key,
    parse_key,
)

# the names as published versions hold them: changing one breaks every version on disk
ON_DISK: dict[KeyKind, str] = {"categorical": "cat:genre", "multi": "multi:genre", "numeric": "num:genre",
                               "vocab": "vocab:genre"}


def arrays() -> dict[str, np.ndarray]:
    """A 3-item catalog (rows 0..3, row 0 padding) with one feature of each kind."""
    return {
        "item_ids": np.array(["<pad>", "a", "b", "c"]),
        "popularity": np.array([0, 5, 2, 0], np.int64),
        "cat:category": np.array([0, 1, 2, 1], np.int64),
        "multi:tags": np.array([[0, 0], [1, 2], [2, 0], [0, 0]], np.int64),
        "num:price": np.array([0, 1.5, 2.5, 0], np.float32),
        "vocab:category": np.array(["x", "y"]),
        "vocab:tags": np.array(["t1", "t2"]),
    }


@pytest.mark.parametrize("kind", list(ON_DISK))
def test_every_key_kind_round_trips(kind: KeyKind) -> None:
    k = key(kind, "genre")
    assert k == ON_DISK[kind] and parse_key(k) == (kind, "genre")
    assert is_vocab(k) == (kind == "vocab")
    assert parse_key(key(kind, "a:b")) == (kind, "a:b")  # only the first ':' separates


@pytest.mark.parametrize(("bad", "why"), [("genre", "expected <prefix>:<name>"), ("colour:red", "expected <prefix>:<name>"),
                                          ("cat:", "empty feature name"), ("", "expected <prefix>:<name>"),
                                          ("item_ids", "expected <prefix>:<name>")])
def test_a_bad_key_is_refused_naming_it(bad: str, why: str) -> None:
    with pytest.raises(CatalogError, match=f"catalog key {bad!r}: {why}"):
        parse_key(bad)


def test_key_refuses_an_unknown_kind_or_an_empty_name() -> None:
    with pytest.raises(CatalogError, match="catalog key kind 'colour'"):
        key("colour", "x")  # type: ignore[arg-type]
    with pytest.raises(CatalogError, match="catalog key name '': must be a non-empty string"):
        key("categorical", "")


def test_split_and_write_back_keep_every_array_and_the_order() -> None:
    src = arrays()
    c = CatalogArrays.from_arrays(src, n=3)
    f = c.features
    assert f.categorical["category"] is src["cat:category"]  # no copy: the service's arrays stay memory maps
    assert f.vocab == {"category": ["x", "y"], "tags": ["t1", "t2"]}
    assert f.schema() == {"category": "categorical", "tags": "multi", "price": "numeric"}
    assert f.filterable() == ["category", "tags"] and tuple(f.by_kind()) == FEATURE_KINDS
    out = c.arrays()
    assert list(out) == list(src)  # written as item_ids, popularity, cat, multi, num, vocab
    for k, arr in src.items():
        assert out[k].dtype == arr.dtype
        np.testing.assert_array_equal(out[k], arr)


def test_item_decodes_codes_to_values() -> None:
    f = CatalogArrays.from_arrays(arrays()).features
    assert f.item(1) == {"category": "x", "tags": ["t1", "t2"], "price": 1.5}
    assert f.item(3) == {"category": "x", "tags": [], "price": 0.0}
    assert f.item(0) == {"category": "", "tags": [], "price": 0.0}  # code 0: unknown
    np.testing.assert_array_equal(f.codes("tags"), arrays()["multi:tags"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.pop("item_ids"), "no item_ids array"),
        (lambda a: a.pop("popularity"), "no popularity array"),
        (lambda a: a.pop("vocab:tags"), "multi:tags has no vocab:tags array"),
        (lambda a: a.pop("vocab:category"), "cat:category has no vocab:category array"),
        (lambda a: a.update({"num:price": np.zeros(5, np.float32)}), "num:price has 5 rows, expected item_count \\+ 1 = 4"),
        (lambda a: a.update({"item_ids": a["item_ids"][:3]}), "item_ids has 3 rows, expected item_count \\+ 1 = 4"),
        (lambda a: a.update({"multi:tags": np.zeros(4, np.int64)}), "multi:tags has shape \\(4,\\), expected 2 dimension"),
        (lambda a: a.update({"colour": np.zeros(4)}), "catalog key 'colour'"),
        (lambda a: a.update({"num:category": np.zeros(4, np.float32)}), "num:category: feature 'category' is categorical"),
    ],
)
def test_a_broken_catalog_is_refused_naming_the_array(change: object, message: str) -> None:
    a = arrays()
    change(a)  # type: ignore[operator]
    with pytest.raises(CatalogError, match=message):
        CatalogArrays.from_arrays(a, n=3)


def test_without_n_rows_are_checked_against_the_item_ids() -> None:
    a = arrays()
    a["popularity"] = a["popularity"][:2]
    with pytest.raises(CatalogError, match="popularity has 2 rows, expected the item_ids' count = 4"):
        CatalogArrays.from_arrays(a)


def test_item_catalog_copies_and_writes_back_the_same_arrays() -> None:
    src = arrays()
    cat = ItemCatalog.from_arrays(src)
    assert cat.num_items == 3 and cat.item_ids == ["<pad>", "a", "b", "c"]
    cat.categorical["category"][1] = 2
    assert src["cat:category"][1] == 1  # a copy: apply() must not write into the loaded file
    back = ItemCatalog.from_arrays(src).arrays()
    assert list(back) == list(src)
    for k, arr in src.items():
        assert back[k].dtype == arr.dtype
        np.testing.assert_array_equal(back[k], arr)


def test_apply_appends_new_items_replaces_changed_ones_and_extends_vocabularies() -> None:
    base = ItemCatalog.from_arrays(arrays())
    cat = ItemCatalog.from_arrays(arrays())
    added, changed = cat.apply([
        ItemUpdate("d", {"category": "z", "tags": ["t2", "t3", "t1"]}),  # new: unseen values, wider tags
        ItemUpdate("b", {"category": "y", "tags": ["t2"], "price": 2.5}),  # unchanged
        ItemUpdate("a", {"category": "y"}),  # first update of a, replaced below
        ItemUpdate("a", {"category": "x", "tags": ["t1", "t2"], "price": 9.0}),  # only the price changes
    ])
    assert (added, changed) == (["d"], ["a"])
    assert cat.item_ids == ["<pad>", "a", "b", "c", "d"] and cat.popularity.tolist() == [0, 5, 2, 0, 0]
    assert cat.vocab == {"category": ["x", "y", "z"], "tags": ["t1", "t2", "t3"]}
    assert cat.categorical["category"].tolist() == [0, 1, 2, 1, 3]
    assert cat.multi["tags"].tolist() == [[0, 0, 0], [1, 2, 0], [2, 0, 0], [0, 0, 0], [2, 3, 1]]
    assert cat.numeric["price"].tolist() == [0, 9.0, 2.5, 0, 0]
    assert cat.extends(base) and not base.extends(cat)
    assert cat.digest() != base.digest() and base.digest() == ItemCatalog.from_arrays(arrays()).digest()
    assert ItemCatalog.from_arrays(cat.arrays()).arrays().keys() == cat.arrays().keys()


def test_item_features_of_an_item_catalog_share_its_columns() -> None:
    cat = ItemCatalog.from_arrays(arrays())
    assert cat.features.categorical is cat.categorical and cat.schema() == cat.features.schema()
    assert isinstance(cat.features, ItemFeatures)
