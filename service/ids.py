"""External item id -> internal index, over the catalog's (memory-mapped) id array, without a dict.

A Python dict of 1M ids is ~100 MB of private memory per version and per worker, and took 3-5 s
to build on the 2-core benchmark machine (each str object and the table are fresh pages), which
was most of a 1M-item hot swap. Here the ids stay in the catalog's `<U{W}` array; what is built
per version is a 64-bit polynomial hash of each id, computed with NumPy over the array's UCS-4
code points (no str objects: ~0.1 s at 1M items, against 0.35 s for Python's hash of each id), sorted
(~16 MB for the hashes and their order at 1M items). A lookup hashes the request's ids the same
way, finds them with one searchsorted and compares each with the stored id, so a hash collision
can never map an id to another item; catalog ids that share a hash (or repeat) are resolved by a
small dict.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np

_CHUNK = 1 << 16  # catalog ids hashed at a time (bounds the uint64 temporaries)
_BASE = np.uint64(0x100000001B3)  # odd, so every power is odd (and invertible modulo 2**64)
_SMALL = 1024  # up to this many ids (a request): one matrix product; beyond it, one pass per column


def poly_hash(ids: np.ndarray) -> np.ndarray:
    """(n,) `<U{W}` array -> (n,) int64: sum over j of code_point[j] * BASE**(j + 1), modulo
    2**64, over each id's W UCS-4 code points (the zero padding of shorter ids adds nothing)."""
    codes = np.ascontiguousarray(ids).view(np.uint32).reshape(ids.size, -1)  # (n, W)
    powers = np.cumprod(np.full(codes.shape[1], _BASE, np.uint64))  # wraps modulo 2**64
    if ids.size <= _SMALL:
        return (codes.astype(np.uint64) @ powers).view(np.int64)
    h = np.zeros(ids.size, np.uint64)
    for c in range(codes.shape[1] - 1, -1, -1):  # the same sum by Horner's rule, in place (an
        h += codes[:, c]                          # integer matrix product is slow at this size)
        h *= _BASE
    return h.view(np.int64)


class ItemIndex(Mapping[str, int]):
    """Read-only mapping item_ids[i] -> i for i >= 1 (index 0 is padding and is left out); a
    repeated id maps to its last index, as a dict built in index order would."""

    def __init__(self, item_ids: np.ndarray) -> None:
        if item_ids.ndim != 1 or item_ids.dtype.kind != "U":
            raise ValueError(f"item_ids must be a 1-D str array, got {item_ids.dtype} {item_ids.shape}")
        self.ids = item_ids
        n = item_ids.size - 1
        hashes = np.empty(max(n, 0), np.int64)
        for s in range(0, n, _CHUNK):
            chunk = item_ids[1 + s:1 + s + _CHUNK]
            hashes[s:s + chunk.size] = poly_hash(chunk)
        order = np.argsort(hashes, kind="stable").astype(np.int64, copy=False)  # positions into ids[1:]
        self._sorted = hashes[order]
        order += 1  # in place: a copy of 1M indices costs as much as the hashing
        self._order = order
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
        # an id longer than the catalog's width is truncated here, so it may find a stored id
        # with the same prefix: the exact comparison below then rejects it
        h = poly_hash(np.asarray(item_ids, dtype=self.ids.dtype))
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
