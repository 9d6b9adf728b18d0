"""The item catalog a version serves: catalog.npz from a data set (catalog_arrays), and
ItemCatalog, which `recsys reindex` grows with new and changed items."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.catalog_updates import FeatureKind, ItemError, ItemUpdate, schema_from_catalog, validate_item
from training.data.dataset import DataError, Dataset
from training.data.splits import LeaveOneOut


def catalog_arrays(ds: Dataset, loo: LeaveOneOut) -> dict[str, np.ndarray]:
    """catalog.npz: item_ids (N + 1,) str, popularity (N + 1,) int64 (training part), and per item
    feature `cat:<name>` (N + 1,) / `multi:<name>` (N + 1, K) int64 codes with `vocab:<name>`
    (code c >= 1 is vocab[c - 1]; 0 = unknown / padding), `num:<name>` (N + 1,) float32."""
    popularity = np.bincount(ds.items[loo.train_mask], minlength=ds.num_items + 1).astype(np.int64)
    popularity[0] = 0
    arrays: dict[str, np.ndarray] = {"item_ids": ds.item_ids.astype(str), "popularity": popularity}
    table = ds.item_features
    if table is not None:
        for name, col in table.categorical.items():
            arrays[f"cat:{name}"] = col.astype(np.int64)
        for name, col in table.multi.items():
            arrays[f"multi:{name}"] = col.astype(np.int64)
        for name, col in table.numeric.items():
            arrays[f"num:{name}"] = col.astype(np.float32)
        for name, vocab in table.vocab.items():
            arrays[f"vocab:{name}"] = np.array(vocab, dtype=str)
    return arrays


@dataclass(eq=False)
class ItemCatalog:
    """External ids and features of every item, laid out as catalog.npz (artifacts.catalog_arrays)."""

    item_ids: list[str]  # (N + 1,), [0] = padding
    popularity: np.ndarray  # (N + 1,) int64
    categorical: dict[str, np.ndarray] = field(default_factory=dict)  # (N + 1,) codes, 0 = unknown
    multi: dict[str, np.ndarray] = field(default_factory=dict)  # (N + 1, K) codes, right-padded with 0
    numeric: dict[str, np.ndarray] = field(default_factory=dict)  # (N + 1,) float32
    vocab: dict[str, list[str]] = field(default_factory=dict)  # code c >= 1 is vocab[c - 1]

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ItemCatalog:
        cat = cls(arrays["item_ids"].astype(str).tolist(), arrays["popularity"].astype(np.int64))
        for key, arr in arrays.items():
            kind, _, name = key.partition(":")
            if kind == "cat":
                cat.categorical[name] = arr.astype(np.int64)
            elif kind == "multi":
                cat.multi[name] = arr.astype(np.int64)
            elif kind == "num":
                cat.numeric[name] = arr.astype(np.float32)
            elif kind == "vocab":
                cat.vocab[name] = arr.astype(str).tolist()
        return cat

    @property
    def num_items(self) -> int:
        return len(self.item_ids) - 1

    def schema(self) -> dict[str, FeatureKind]:
        return schema_from_catalog(self.features())

    def arrays(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {"item_ids": np.array(self.item_ids, dtype=str), "popularity": self.popularity}
        out.update(self.features())
        out.update({f"vocab:{k}": np.array(v, dtype=str) for k, v in self.vocab.items()})
        return out

    def features(self) -> dict[str, np.ndarray]:
        """The per-item feature arrays by catalog.npz name (`cat:`, `multi:`, `num:`)."""
        out = {f"cat:{k}": v for k, v in self.categorical.items()}
        out.update({f"multi:{k}": v for k, v in self.multi.items()})
        out.update({f"num:{k}": v for k, v in self.numeric.items()})
        return out

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
        before = {k: v[old_rows].copy() for k, v in self.features().items()}
        self.popularity = grow_rows(self.popularity, n)
        feats = [u.features for u in latest.values()]
        for name, col in self.categorical.items():
            codes = self._codes(name, [f.get(name) for f in feats])
            self.categorical[name] = col = grow_rows(col, n)
            col[rows] = codes
        for name, col in self.multi.items():
            lists = [f.get(name) or [] for f in feats]
            lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
            width = max(col.shape[1], int(lengths.max(initial=0)))
            mat = np.zeros((len(lists), width), dtype=np.int64)
            starts = np.repeat(np.cumsum(lengths) - lengths, lengths)  # flat position of each list's first value
            flat = self._codes(name, [v for values in lists for v in values])  # type: ignore[union-attr]
            mat[np.repeat(np.arange(len(lists)), lengths), np.arange(flat.size) - starts] = flat
            col = grow_rows(col, n)
            self.multi[name] = col = np.pad(col, ((0, 0), (0, width - col.shape[1])))
            col[rows] = mat
        for name, col in self.numeric.items():
            self.numeric[name] = col = grow_rows(col, n)
            col[rows] = [float(f.get(name, 0.0)) for f in feats]  # type: ignore[arg-type]  # validated numeric
        after = self.features()
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
        for key, arr in sorted(self.arrays().items()):
            h.update(key.encode())
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()[:16]


def read_catalog_file(path: str | Path, schema: dict[str, FeatureKind]) -> list[ItemUpdate]:
    """--catalog: JSON Lines, one {"item_id", "features"} per line; DataError naming line and field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such catalog file")
    out: list[ItemUpdate] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(validate_item(json.loads(line), schema))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            except ItemError as exc:
                raise DataError(f"{path}:{lineno}: {exc}") from None
    return out


def distinct_codes(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, K) codes -> the codes sorted per row and a mask of each row's distinct values > 0."""
    srt = np.sort(codes, axis=1)
    first = srt > 0
    first[:, 1:] &= srt[:, 1:] != srt[:, :-1]
    return srt, first


def grow_rows(arr: np.ndarray, n: int) -> np.ndarray:
    """`arr` with zero rows appended up to n rows."""
    if arr.shape[0] >= n:
        return arr
    return np.concatenate([arr, np.zeros((n - arr.shape[0], *arr.shape[1:]), dtype=arr.dtype)])
