"""External item id -> internal index, over the catalog's (memory-mapped) id array, without a dict.

A Python dict of 1M ids is ~100 MB of private memory per version and per worker, and took 3-5 s
to build on the 2-core benchmark machine (each str object and the table are fresh pages), which
was most of a 1M-item hot swap. Here the ids stay in the catalog's `<U{W}` array; what is built
per version is each id's Python hash (computed a chunk of ids at a time, so the str objects are
transient), sorted (~16 MB for the hashes and their order at 1M items). A lookup hashes the
request's ids (CPython caches a str's hash), finds them with one searchsorted and compares each
with the stored id, so a hash collision can never map an id to another item; catalog ids that
share a hash (or repeat) are resolved by a small dict.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np

_CHUNK = 1 << 16  # catalog ids turned into str objects (and hashed) at a time


class ItemIndex(Mapping[str, int]):
    """Read-only mapping item_ids[i] -> i for i >= 1 (index 0 is padding and is left out); a
    repeated id maps to its last index, as a dict built in index order would. Hashes are those of
    this process (str hashing is salted per process), so an ItemIndex is not to be pickled."""

    def __init__(self, item_ids: np.ndarray) -> None:
        if item_ids.ndim != 1 or item_ids.dtype.kind != "U":
            raise ValueError(f"item_ids must be a 1-D str array, got {item_ids.dtype} {item_ids.shape}")
        self.ids = item_ids
        n = item_ids.size - 1
        hashes = np.empty(max(n, 0), np.int64)
        for s in range(0, n, _CHUNK):
            chunk = item_ids[1 + s:1 + s + _CHUNK].tolist()
            hashes[s:s + len(chunk)] = np.fromiter(map(hash, chunk), np.int64, len(chunk))
        order = np.argsort(hashes, kind="stable")  # positions into ids[1:]
        self._sorted = hashes[order]
        self._order = (order + 1).astype(np.int64)
        same = np.flatnonzero(self._sorted[1:] == self._sorted[:-1])
        shared = np.unique(np.concatenate([same, same + 1]))
        # ids whose hash another id shares (a repeated id included): a dict, in index order
        self._shared = {str(self.ids[i]): int(i) for i in np.sort(self._order[shared]).tolist()}
        self._shared_hashes = np.unique(self._sorted[shared])
        self._len = int(self._sorted.size - shared.size + len(self._shared))

    def lookup(self, item_ids: Sequence[str]) -> np.ndarray:
        """(n,) int64 indices of `item_ids`, 0 for an unknown id."""
        if not item_ids or self._sorted.size == 0:
            return np.zeros(len(item_ids), np.int64)
        h = np.fromiter(map(hash, item_ids), np.int64, len(item_ids))
        pos = np.minimum(np.searchsorted(self._sorted, h), self._sorted.size - 1)
        idx = self._order[pos]
        # the exact check: a hash collision never maps an id to another item
        out = np.asarray([i if ok and x == y else 0 for x, y, i, ok in
                          zip(item_ids, self.ids[idx].tolist(), idx.tolist(), (self._sorted[pos] == h).tolist())],
                         np.int64)
        if self._shared:
            for j in np.flatnonzero(np.isin(h, self._shared_hashes)).tolist():
                out[j] = self._shared.get(item_ids[j], 0)
        return out

    def __getitem__(self, item_id: str) -> int:
        if not isinstance(item_id, str):
            raise KeyError(item_id)
        i = int(self.lookup([item_id])[0])
        if i == 0:
            raise KeyError(item_id)
        return i

    def __iter__(self) -> Iterator[str]:
        seen: set[str] = set()
        for i in range(self.ids.size - 1, 0, -1):  # the last index wins for a repeated id
            key = str(self.ids[i])
            if key not in seen:
                seen.add(key)
                yield key

    def __len__(self) -> int:
        return self._len
