"""catalog.npz, the item catalog of a version: the one codec of its array names, and ItemCatalog.

The arrays (N items; row 0 is padding everywhere):

- ``item_ids`` (N + 1,) str, ``popularity`` (N + 1,) int64 (training-part interaction counts);
- per item feature ``cat:<name>`` (N + 1,) int64 codes, ``multi:<name>`` (N + 1, K) int64 codes
  right-padded with 0, ``num:<name>`` (N + 1,) float32;
- ``vocab:<name>`` (V,) str for every cat / multi feature: code c >= 1 is vocab[c - 1], 0 = unknown.

Only this module spells those names: training writes them with `CatalogArrays.arrays()` (or
`ItemCatalog.arrays()`), the service reads them with `CatalogArrays.from_arrays`, which checks
every name, row count and vocabulary once, and everything else works on `ItemFeatures` by
feature name. NumPy only (no torch): the service imports it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, cast, get_args

import numpy as np

ITEM_IDS = "item_ids"
POPULARITY = "popularity"

FeatureKind = Literal["categorical", "multi", "numeric"]
KeyKind = Literal["categorical", "multi", "numeric", "vocab"]
FEATURE_KINDS: tuple[FeatureKind, ...] = get_args(FeatureKind)
# the on-disk prefixes; the order is the order arrays are written in
_PREFIX: dict[KeyKind, str] = {"categorical": "cat", "multi": "multi", "numeric": "num", "vocab": "vocab"}
_KIND: dict[str, KeyKind] = {p: k for k, p in _PREFIX.items()}
_NDIM: dict[KeyKind, int] = {"categorical": 1, "multi": 2, "numeric": 1, "vocab": 1}

FeatureValue = str | list[str] | float


class CatalogError(ValueError):
    """A catalog array name or array that breaks the layout; the message names the array."""


def key(kind: KeyKind, name: str) -> str:
    """The catalog.npz name of feature `name` of `kind` (or of its vocabulary): ("multi", "tags") -> "multi:tags"."""
    if kind not in _PREFIX:
        raise CatalogError(f"catalog key kind {kind!r}: expected one of {list(_PREFIX)}")
    if not isinstance(name, str) or not name:
        raise CatalogError(f"catalog key name {name!r}: must be a non-empty string")
    return f"{_PREFIX[kind]}:{name}"


def parse_key(k: str) -> tuple[KeyKind, str]:
    """"cat:genre" -> ("categorical", "genre"); CatalogError naming `k` for anything else
    (item_ids and popularity are not feature keys)."""
    prefix, sep, name = k.partition(":")
    if not sep or prefix not in _KIND:
        raise CatalogError(f"catalog key {k!r}: expected <prefix>:<name> with prefix one of {list(_KIND)}")
    if not name:
        raise CatalogError(f"catalog key {k!r}: empty feature name")
    return _KIND[prefix], name


def is_vocab(k: str) -> bool:
    """Whether catalog array `k` is a vocabulary (small strings: read, not memory-mapped)."""
    return k.partition(":")[0] == _PREFIX["vocab"]


@dataclass(frozen=True, eq=False)
class ItemFeatures:
    """The per-item features of a catalog by name, each column (N + 1, ...) as stored (the
    service's are read-only memory maps); vocab: name -> values, code c >= 1 is vocab[c - 1]."""

    categorical: dict[str, np.ndarray] = field(default_factory=dict)  # (N + 1,) int64 codes, 0 = unknown
    multi: dict[str, np.ndarray] = field(default_factory=dict)  # (N + 1, K) int64 codes, right-padded with 0
    numeric: dict[str, np.ndarray] = field(default_factory=dict)  # (N + 1,) float32
    vocab: dict[str, list[str]] = field(default_factory=dict)

    def by_kind(self) -> dict[FeatureKind, dict[str, np.ndarray]]:
        return {"categorical": self.categorical, "multi": self.multi, "numeric": self.numeric}

    def schema(self) -> dict[str, FeatureKind]:
        """name -> kind, in catalog order (categorical, multi, numeric)."""
        return {name: kind for kind, cols in self.by_kind().items() for name in cols}

    def filterable(self) -> list[str]:
        """The features /recommend filters on: the coded ones (categorical, multi)."""
        return [*self.categorical, *self.multi]

    def codes(self, name: str) -> np.ndarray:
        """The code column of categorical (N + 1,) or multi-valued (N + 1, K) feature `name`."""
        return self.categorical[name] if name in self.categorical else self.multi[name]

    def columns(self) -> dict[str, np.ndarray]:
        """The feature arrays by catalog.npz name, in the order they are written (no vocabularies)."""
        return {key(kind, name): col for kind, cols in self.by_kind().items() for name, col in cols.items()}

    def arrays(self) -> dict[str, np.ndarray]:
        """columns() and the vocabularies by catalog.npz name."""
        return {**self.columns(), **{key("vocab", name): np.array(v, dtype=str) for name, v in self.vocab.items()}}

    def item(self, row: int) -> dict[str, FeatureValue]:
        """Item `row`'s features decoded to values: a categorical's value ("" when unknown), a
        multi-valued feature's values, a number."""
        out: dict[str, FeatureValue] = {}
        for name, col in self.categorical.items():
            vocab, code = self.vocab[name], int(col[row])
            out[name] = vocab[code - 1] if 1 <= code <= len(vocab) else ""
        for name, col in self.multi.items():
            vocab = self.vocab[name]
            out[name] = [vocab[c - 1] for c in col[row].tolist() if 1 <= c <= len(vocab)]
        for name, col in self.numeric.items():
            out[name] = float(col[row])
        return out


@dataclass(frozen=True, eq=False)
class CatalogArrays:
    """catalog.npz split by kind and checked: item_ids (N + 1,) str, popularity (N + 1,) int64, features."""

    item_ids: np.ndarray
    popularity: np.ndarray
    features: ItemFeatures

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], n: int | None = None) -> CatalogArrays:
        """Split catalog.npz's arrays (kept as they are: no copy, no cast). CatalogError naming the
        array for an unknown name, a wrong shape or row count (N + 1 with N = n, or the item_ids'
        count without n), a cat / multi feature without its vocabulary, a name of two kinds."""
        for k in (ITEM_IDS, POPULARITY):
            if k not in arrays:
                raise CatalogError(f"no {k} array")
        ids = arrays[ITEM_IDS]
        rows = n + 1 if n is not None else ids.shape[0] if ids.ndim else 0
        expected = "item_count + 1" if n is not None else "the item_ids' count"
        feats = ItemFeatures()
        columns, kinds = feats.by_kind(), feats.schema()
        vocab: dict[str, np.ndarray] = {}
        for k, arr in arrays.items():
            kind, name = (None, k) if k in (ITEM_IDS, POPULARITY) else parse_key(k)
            want = 1 if kind is None else _NDIM[kind]
            if arr.ndim != want:
                raise CatalogError(f"{k} has shape {arr.shape}, expected {want} dimension(s)")
            if kind == "vocab":
                vocab[name] = arr
                continue
            if arr.shape[0] != rows:
                raise CatalogError(f"{k} has {arr.shape[0]} rows, expected {expected} = {rows}")
            if kind is None:
                continue
            if name in kinds:  # one name, one kind: the schema of PUT /v1/items is by name
                raise CatalogError(f"{k}: feature {name!r} is {kinds[name]} already")
            kinds[name] = kind
            columns[kind][name] = arr
        for name in feats.filterable():
            if name not in vocab:
                raise CatalogError(f"{key(kinds[name], name)} has no {key('vocab', name)} array")
        feats.vocab.update({name: arr.astype(str).tolist() for name, arr in vocab.items()})
        return cls(arrays[ITEM_IDS], arrays[POPULARITY], feats)

    def arrays(self) -> dict[str, np.ndarray]:
        """The catalog.npz arrays in the order they are written: item_ids, popularity, cat:, multi:, num:, vocab:."""
        return {ITEM_IDS: self.item_ids, POPULARITY: self.popularity, **self.features.arrays()}


@dataclass(frozen=True)
class ItemUpdate:
    """One item's complete features: name -> str (categorical), list[str] (multi) or float
    (numeric). Validated by service.catalog_updates.validate_item; applied by ItemCatalog.apply."""

    item_id: str
    features: dict[str, FeatureValue]

    def to_json(self) -> dict[str, object]:
        return {"item_id": self.item_id, "features": self.features}


@dataclass(eq=False)
class ItemCatalog:
    """External ids and features of every item, laid out as catalog.npz; `recsys reindex` grows
    it with new and changed items (apply)."""

    item_ids: list[str]  # (N + 1,), [0] = padding
    popularity: np.ndarray  # (N + 1,) int64
    categorical: dict[str, np.ndarray] = field(default_factory=dict)  # (N + 1,) codes, 0 = unknown
    multi: dict[str, np.ndarray] = field(default_factory=dict)  # (N + 1, K) codes, right-padded with 0
    numeric: dict[str, np.ndarray] = field(default_factory=dict)  # (N + 1,) float32
    vocab: dict[str, list[str]] = field(default_factory=dict)  # code c >= 1 is vocab[c - 1]

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> ItemCatalog:
        """A copy of catalog.npz's arrays, checked as CatalogArrays.from_arrays (CatalogError)."""
        c = CatalogArrays.from_arrays(arrays)
        f = c.features
        return cls(c.item_ids.astype(str).tolist(), c.popularity.astype(np.int64),
                   {k: v.astype(np.int64) for k, v in f.categorical.items()},
                   {k: v.astype(np.int64) for k, v in f.multi.items()},
                   {k: v.astype(np.float32) for k, v in f.numeric.items()},
                   {k: list(v) for k, v in f.vocab.items()})

    @property
    def num_items(self) -> int:
        return len(self.item_ids) - 1

    @property
    def features(self) -> ItemFeatures:
        """A view of the feature columns (shares this catalog's dicts)."""
        return ItemFeatures(self.categorical, self.multi, self.numeric, self.vocab)

    def schema(self) -> dict[str, FeatureKind]:
        return self.features.schema()

    def arrays(self) -> dict[str, np.ndarray]:
        return CatalogArrays(np.array(self.item_ids, dtype=str), self.popularity, self.features).arrays()

    def extends(self, other: ItemCatalog) -> bool:
        """Same features, `other`'s items first in the same order, vocabularies extending `other`'s."""
        n = len(other.item_ids)
        return (self.item_ids[:n] == other.item_ids
                and (self.categorical.keys(), self.multi.keys(), self.numeric.keys())
                == (other.categorical.keys(), other.multi.keys(), other.numeric.keys())
                and all(self.vocab.get(k, [])[:len(v)] == v for k, v in other.vocab.items()))

    def apply(self, updates: Sequence[ItemUpdate]) -> tuple[list[str], list[str]]:
        """Apply updates in order (a later update of an item replaces an earlier one); new items
        are appended. Returns the ids added and the ids of existing items whose features changed."""
        latest: dict[str, ItemUpdate] = {}
        for u in updates:
            latest[u.item_id] = u
        index = {x: i for i, x in enumerate(self.item_ids) if i > 0}
        n0 = len(self.item_ids)
        added = [x for x in latest if x not in index]
        rows = np.array([index.get(x, -1) for x in latest], dtype=np.int64)
        rows[rows < 0] = np.arange(n0, n0 + len(added))
        self.item_ids.extend(added)
        n = len(self.item_ids)
        old_rows = rows[rows < n0]
        before = {k: v[old_rows].copy() for k, v in self.features.columns().items()}
        self.popularity = grow_rows(self.popularity, n)
        feats = [u.features for u in latest.values()]
        for name, col in self.categorical.items():
            codes = self._codes(name, [f.get(name) for f in feats])
            self.categorical[name] = col = grow_rows(col, n)
            col[rows] = codes
        for name, col in self.multi.items():
            lists = [cast(list[str], f.get(name) or []) for f in feats]  # validate_item: a multi value is a list
            lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
            width = max(col.shape[1], int(lengths.max(initial=0)))
            mat = np.zeros((len(lists), width), dtype=np.int64)
            starts = np.repeat(np.cumsum(lengths) - lengths, lengths)  # flat position of each list's first value
            flat = self._codes(name, [v for values in lists for v in values])
            mat[np.repeat(np.arange(len(lists)), lengths), np.arange(flat.size) - starts] = flat
            col = grow_rows(col, n)
            self.multi[name] = col = np.pad(col, ((0, 0), (0, width - col.shape[1])))
            col[rows] = mat
        for name, col in self.numeric.items():
            self.numeric[name] = col = grow_rows(col, n)
            col[rows] = [float(f.get(name, 0.0)) for f in feats]  # type: ignore[arg-type]  # validated numeric
        after = self.features.columns()
        diff = np.zeros(old_rows.size, dtype=bool)
        for k, old in before.items():
            new = after[k][old_rows]
            if old.ndim == 2:
                old = np.pad(old, ((0, 0), (0, new.shape[1] - old.shape[1])))
                diff |= (old != new).any(axis=1)
            else:
                diff |= old != new
        changed = [self.item_ids[r] for r in old_rows[diff]]
        return added, changed

    def _codes(self, name: str, values: Sequence[object]) -> np.ndarray:
        """Codes of categorical values (None -> 0, unknown); unseen values extend the vocabulary."""
        vocab = self.vocab.setdefault(name, [])
        lookup = {v: i + 1 for i, v in enumerate(vocab)}
        out = np.zeros(len(values), dtype=np.int64)
        for j, v in enumerate(values):
            if v is None:
                continue
            code = lookup.get(v)  # type: ignore[call-overload]
            if code is None:
                vocab.append(str(v))
                code = lookup[v] = len(vocab)  # type: ignore[index]
            out[j] = code
        return out

    def digest(self) -> str:
        h = hashlib.sha256("\x1f".join(self.item_ids).encode())
        for k, arr in sorted(self.arrays().items()):
            h.update(k.encode())
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()[:16]


def grow_rows(arr: np.ndarray, n: int) -> np.ndarray:
    """`arr` with zero rows appended up to n rows."""
    if arr.shape[0] >= n:
        return arr
    return np.concatenate([arr, np.zeros((n - arr.shape[0], *arr.shape[1:]), dtype=arr.dtype)])
