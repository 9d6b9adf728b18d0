"""The item-to-item recall route's table (built by `recsys export` and `recsys reindex`).

From interaction sequences (each user's items in time order), for every item i and every item j
that follows it within `window` positions (distance d = 1 is the transition i -> next item):

    c(i, j)   = sum over such occurrences of 1 / d                   (j != i)
    pop(x)    = occurrences of x in the sequences
    s(i, j)   = c(i, j) / (pop(i) ** (1 - alpha) * pop(j) ** alpha)

With event weights (Dataset.weights, from csv: / parquet: event types) each occurrence counts its
event's weight w instead of 1: c(i, j) sums w(j) / d over the occurrences of the follower j (a
purchase after i counts w_purchase / w_view times a view), and pop(x) sums w(x).

alpha = 0 ranks a row by c(i, j) (popular followers win); alpha = 1 divides by the follower's
popularity, so rare items that always follow i win; 0.5 is the cosine-like middle. The row
factor pop(i) ** (1 - alpha) only sets the scale of a row against the others, which matters
when the service sums the rows of several recent items. Each row keeps its top R followers:

    neighbours (N + 1, R) int32    item ids, 0 = padding (fewer than R followers); row 0 padding
    scores     (N + 1, R) float32  s(i, j) of each neighbour, 0 for padding; sorted descending,
                                   ties by smaller item id

The request side (NumPy) is service/item2item.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from service.contract.layout import ITEM2ITEM
from service.item2item import DEFAULT_SERVING, NEIGHBOURS, SCORES
from training.data.dataset import Dataset

RULE = ("s(i, j) = sum over occurrences of j within `window` positions after i of 1 / distance, divided by "
        "pop(i) ** (1 - alpha) * pop(j) ** alpha; top `neighbours` per item")


@dataclass(frozen=True)
class Item2ItemConfig:
    """Defaults: the best on ml-100k validation (benchmarks/quality/results/item2item_route_ml100k*.txt).
    The table takes (N + 1) * R * 8 bytes (13 MB for 16k items, 800 MB for 1M at R = 100)."""

    neighbours: int = 100  # R kept per item
    window: int = 8  # following items counted, weighted 1 / distance
    alpha: float = 0.25  # popularity exponent of the follower in the normalisation

    def __post_init__(self) -> None:
        if self.neighbours < 1:
            raise ValueError(f"neighbours must be >= 1, got {self.neighbours}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Rows(NamedTuple):
    """The table's input: items (E,) ids in 1..N, users (E,) sequence keys, weights (E,) each row's
    event weight (None: all 1), events: how many rows came from `recsys reindex --events`."""

    items: np.ndarray
    users: np.ndarray
    weights: np.ndarray | None = None
    events: int = 0


def build_table(items: np.ndarray, users: np.ndarray, num_items: int,
                cfg: Item2ItemConfig = Item2ItemConfig(), weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """items (E,) int item ids in 1..N and users (E,) any int keys: consecutive rows with the
    same key are one sequence, in time order; weights (E,) > 0 per row (None: all 1). ->
    neighbours (N + 1, R) int32, scores (N + 1, R) float32 (see the module doc)."""
    items = np.asarray(items, np.int64)
    users = np.asarray(users, np.int64)
    if items.shape != users.shape or items.ndim != 1:
        raise ValueError(f"items and users must be 1-D of one length, got {items.shape} and {users.shape}")
    w = None if weights is None else np.asarray(weights, np.float64)
    if w is not None and (w.shape != items.shape or not (w > 0).all()):
        raise ValueError(f"weights must be > 0 and of the items' shape {items.shape}, got shape {w.shape}")
    if items.size and (items.min() < 1 or items.max() > num_items):
        raise ValueError(f"item ids must be in 1..{num_items}, got {items.min()}..{items.max()}")
    n1 = num_items + 1
    keys: list[np.ndarray] = []
    parts: list[np.ndarray] = []
    for d in range(1, cfg.window + 1):
        src, dst = items[:-d], items[d:]
        ok = (users[:-d] == users[d:]) & (src != dst)
        keys.append(src[ok] * n1 + dst[ok])
        parts.append(np.full(int(ok.sum()), 1.0 / d) if w is None else w[d:][ok] / d)  # the follower's weight
    key = np.concatenate(keys) if keys else np.zeros(0, np.int64)
    pairs, inv = np.unique(key, return_inverse=True)
    count = np.bincount(inv, weights=np.concatenate(parts) if parts else None, minlength=pairs.size)
    src, dst = pairs // n1, pairs % n1
    pop = np.bincount(items, weights=w, minlength=n1).astype(np.float64)
    score = count / (pop[src] ** (1.0 - cfg.alpha) * pop[dst] ** cfg.alpha)
    order = np.lexsort((dst, -score, src))  # by row, score descending, smaller id first
    src, dst, score = src[order], dst[order], score[order]
    first = np.searchsorted(src, src, side="left")
    rank = np.arange(src.size) - first  # position within the row
    keep = rank < cfg.neighbours
    neighbours = np.zeros((n1, cfg.neighbours), np.int32)
    scores = np.zeros((n1, cfg.neighbours), np.float32)
    neighbours[src[keep], rank[keep]] = dst[keep]
    scores[src[keep], rank[keep]] = score[keep]
    return neighbours, scores


def training_rows(ds: Dataset, train_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(items, users) of the data set's training part (the leave-one-out train mask), in order."""
    return ds.items[train_mask], ds.users[train_mask]


def dataset_rows(ds: Dataset, mask: np.ndarray) -> Rows:
    """Rows of the data set's interactions in `mask` (the leave-one-out train mask), in order, with
    their event weights."""
    return Rows(ds.items[mask], ds.users[mask], None if ds.weights is None else ds.weights[mask])


def with_events(rows: Rows, user_ids: np.ndarray, events: Dataset, id_to_index: dict[str, int]) -> Rows:
    """Training rows plus a log of new events (a data set of its own, time-ordered per user):
    each user's events follow that user's training rows (same external user id), a new user's
    events are a sequence of their own. Events of items outside the catalog are dropped; event
    weights are kept (1 for the side without them). Rows.events: the events used."""
    items, users = rows.items, rows.users
    ev_items = np.asarray([id_to_index.get(str(x), 0) for x in events.item_ids], np.int64)[events.items]
    known = ev_items > 0
    keys = {str(u): k for k, u in enumerate(user_ids.tolist())}
    ev_user_ids = events.user_ids.astype(str)
    ev_keys = np.asarray([keys.setdefault(u, len(keys)) for u in ev_user_ids.tolist()], np.int64)[events.users]
    all_items = np.concatenate([items, ev_items[known]])
    all_users = np.concatenate([users, ev_keys[known]])
    order = np.argsort(all_users, kind="stable")  # training rows first within a user, then events
    weights = None
    if rows.weights is not None or events.weights is not None:
        ones = np.ones(items.size, np.float32) if rows.weights is None else rows.weights
        ev_w = np.ones(events.items.size, np.float32) if events.weights is None else events.weights
        weights = np.concatenate([ones, ev_w[known]])[order]
    return Rows(all_items[order], all_users[order], weights, int(known.sum()))


def write_table(folder: Path, neighbours: np.ndarray, scores: np.ndarray) -> str:
    """Write ITEM2ITEM into a version folder; returns its name (the manifest's files.item2item)."""
    with open(Path(folder) / ITEM2ITEM, "wb") as f:
        np.savez(f, **{NEIGHBOURS: neighbours.astype(np.int32), SCORES: scores.astype(np.float32)})  # type: ignore[arg-type]  # numpy's stub types **kwds as bool
    return ITEM2ITEM


def manifest_entry(cfg: Item2ItemConfig, interactions: int, events: int, neighbours: np.ndarray,
                   serving: dict[str, float] | None = None) -> dict[str, Any]:
    """The manifest's "item2item" block."""
    return {"file": ITEM2ITEM, **cfg.to_dict(), "rule": RULE, "interactions": interactions, "events": events,
            "items_with_neighbours": int((neighbours[:, 0] > 0).sum()),
            "serving": dict(DEFAULT_SERVING if serving is None else serving)}


def publish_table(folder: Path, num_items: int, rows: Rows, cfg: Item2ItemConfig = Item2ItemConfig()) -> dict[str, Any]:
    """Build the table from `rows`, write it into `folder`, return the manifest block."""
    neighbours, scores = build_table(rows.items, rows.users, num_items, cfg, rows.weights)
    write_table(folder, neighbours, scores)
    return manifest_entry(cfg, int(rows.items.size), rows.events, neighbours)
