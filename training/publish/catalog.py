"""The catalog a data set publishes (catalog_arrays: catalog.npz of `recsys export`) and the
--catalog file of `recsys reindex` (read_catalog_file). The layout of catalog.npz and
ItemCatalog, which reindex grows, live in service/contract/catalog.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from service.catalog_updates import ItemError, validate_item
from service.contract.catalog import CatalogArrays, FeatureKind, ItemFeatures, ItemUpdate
from training.data.dataset import DataError, Dataset
from training.data.splits import LeaveOneOut


def catalog_arrays(ds: Dataset, loo: LeaveOneOut) -> dict[str, np.ndarray]:
    """catalog.npz of the data set (service.contract.catalog): external ids, popularity = the
    training part's interaction counts, the item features (codes int64, numbers float32)."""
    popularity = np.bincount(ds.items[loo.train_mask], minlength=ds.num_items + 1).astype(np.int64)
    popularity[0] = 0
    return CatalogArrays(ds.item_ids.astype(str), popularity, item_features_of(ds)).arrays()


def item_features_of(ds: Dataset) -> ItemFeatures:
    """The data set's item features as the catalog ships them (codes int64, numbers float32)."""
    table = ds.item_features
    return ItemFeatures() if table is None else ItemFeatures(
        categorical={name: col.astype(np.int64) for name, col in table.categorical.items()},
        multi={name: col.astype(np.int64) for name, col in table.multi.items()},
        numeric={name: col.astype(np.float32) for name, col in table.numeric.items()},
        vocab=dict(table.vocab),
    )


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
