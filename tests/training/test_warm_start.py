"""Warm start across data sets (training/warm_start.py, `recsys retrain`'s default): a fresh model of
a grown data set takes the old checkpoint's rows by external id (before any training step), new
items keep the fresh model's initial rows, and a checkpoint that does not fit is refused with a
one-line reason, the model left as built."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import torch

from models.prm import PRM, PRMConfig
from models.sasrec import SASRecConfig
from service.contract.rerank_inputs import PVStats
from training.checkpoints import read_checkpoint
from training.data.convert import write_tables
from training.data.dataset import Dataset
from training.data.sources import load, read
from training.data.splits import LeaveOneOut
from training.eval.baselines import LastItem
from training.stages.prerank import train as pr
from training.stages.prerank.data import NextItemData, build_next_item_data
from training.stages.rerank import models as rr
from training.stages.rerank.sampling import ImpressionConfig
from training.stages.retrieval import train as rt
from training.stages.retrieval.encoders import build_model
from training.warm_start import Incompatible, attempt, domain_keys, warm_prerank, warm_rerank, warm_retrieval

BASE = "synthetic:users=60,items=40,categories=8,seed=1"
GONE = "5"  # an item of the base data that the grown data no longer has
NEW_ITEMS = [f"new{j}" for j in range(5)]
NEW_CATEGORY = "catNEW"


def write_base(folder: Path) -> str:
    """The base data as CSV tables (interactions, items with a category, users)."""
    return write_tables(read(BASE), folder, "csv")[1]


def write_grown(base: Path, folder: Path) -> str:
    """The base data grown as a log would grow it, CSV: ten new users whose rows come first (so
    every internal item id shifts), five new items of a new category, item GONE dropped."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = list(csv.reader((base / "interactions.csv").open()))
    head, body = rows[0], [r for r in rows[1:] if r[1] != GONE]
    t0 = max(int(r[2]) for r in body) + 100
    new = []
    for u in range(10):
        seq = [NEW_ITEMS[(u + k) % 5] if k % 2 == 0 else str((u * 3 + k) % 40) for k in range(12)]
        new += [[f"nu{u}", it, str(t0 + 10 * k + u), "4"] for k, it in enumerate(seq) if it != GONE]
    with (folder / "interactions.csv").open("w", newline="") as f:
        csv.writer(f).writerows([head, *new, *body])
    items = list(csv.reader((base / "items.csv").open()))
    with (folder / "items.csv").open("w", newline="") as f:
        csv.writer(f).writerows([items[0], *[r for r in items[1:] if r[0] != GONE],
                                 *[[it, NEW_CATEGORY, "tagNEW", "10.0"] for it in NEW_ITEMS]])
    (folder / "users.csv").write_text((base / "users.csv").read_text())
    return f"csv:{folder}"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Dataset, Dataset]:
    root = tmp_path_factory.mktemp("warm")
    old = load(write_base(root / "a"))
    new = load(write_grown(root / "a", root / "b"))
    assert set(NEW_ITEMS) <= set(new.item_ids.tolist()) and GONE not in new.item_ids.tolist()
    assert old.item_ids[1] != new.item_ids[1]  # internal ids differ: a copy by position would be garbage
    return old, new


def sasrec(num_items: int, launchers: int = 1, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return build_model(SASRecConfig(num_items=num_items, maxlen=8, dim=8, num_blocks=1, num_launchers=launchers))


def test_retrieval_keeps_every_known_items_row_by_id_and_initialises_new_ones_fresh(
        tmp_path: Path, data: tuple[Dataset, Dataset]) -> None:
    old_ds, new_ds = data
    trained = sasrec(old_ds.num_items, seed=3)
    rt.save_checkpoint(tmp_path / "live", trained, old_ds, "old", {})
    model, fresh = sasrec(new_ds.num_items, seed=7), sasrec(new_ds.num_items, seed=7)
    ws = warm_retrieval(model, read_checkpoint(tmp_path / "live" / "checkpoint.pt"), new_ds.item_ids.tolist())

    old_row = {k: i for i, k in enumerate(old_ds.item_ids.tolist())}
    got, was, init = model.item_embedding.weight, trained.item_embedding.weight, fresh.item_embedding.weight
    known = [(i, old_row[k]) for i, k in enumerate(new_ds.item_ids.tolist()) if i and k in old_row]
    new = [i for i, k in enumerate(new_ds.item_ids.tolist()) if k not in old_row]
    assert len(known) == old_ds.num_items - 1 and len(new) == len(NEW_ITEMS)
    for i, j in known:
        assert torch.equal(got[i], was[j]), new_ds.item_ids[i]
    for i in new:
        assert torch.equal(got[i], init[i]) and not torch.equal(got[i], torch.zeros_like(got[i]))
    assert torch.equal(got[0], torch.zeros_like(got[0]))  # padding
    # every other weight is the checkpoint's
    for name, value in trained.state_dict().items():
        if name != "item_embedding.weight":
            assert torch.equal(model.state_dict()[name], value), name
    assert (ws.copied, ws.new, ws.dropped) == (old_ds.num_items - 1, len(NEW_ITEMS), 1)


def test_an_incompatible_retrieval_checkpoint_is_refused_in_one_line_and_the_model_left_fresh(
        tmp_path: Path, data: tuple[Dataset, Dataset]) -> None:
    old_ds, new_ds = data
    rt.save_checkpoint(tmp_path / "live", sasrec(old_ds.num_items, launchers=1), old_ds, "old", {})
    ckpt = read_checkpoint(tmp_path / "live" / "checkpoint.pt")
    model, fresh = sasrec(new_ds.num_items, launchers=2, seed=7), sasrec(new_ds.num_items, launchers=2, seed=7)
    with pytest.raises(Incompatible, match=r"^num_launchers is 1 in the checkpoint, 2 here$"):
        warm_retrieval(model, ckpt, new_ds.item_ids.tolist())
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in model.state_dict().items())
    record, line = attempt("train retrieval", tmp_path / "live",
                           lambda: warm_retrieval(model, ckpt, new_ds.item_ids.tolist()))
    assert record == {"from": str(tmp_path / "live"), "skipped": "num_launchers is 1 in the checkpoint, 2 here"}
    assert line == (f"train retrieval: no warm start from {tmp_path / 'live'} (num_launchers is 1 in the "
                    "checkpoint, 2 here); training anew")
    # a checkpoint written before item ids were recorded, and a missing one, fall back the same way
    del ckpt.extra["item_ids"]
    with pytest.raises(Incompatible, match="records no item ids"):
        warm_retrieval(sasrec(new_ds.num_items), ckpt, new_ds.item_ids.tolist())
    record, line = attempt("train retrieval", tmp_path / "nowhere",
                           lambda: warm_retrieval(model, read_checkpoint(tmp_path / "nowhere" / "checkpoint.pt"),
                                                  new_ds.item_ids.tolist()))
    assert "skipped" in record and line.endswith("; training anew") and "\n" not in line


def next_item_data(ds: Dataset) -> NextItemData:
    loo = LeaveOneOut(ds)
    return build_next_item_data(ds, loo, {"valid": LastItem(loo, "valid"), "test": LastItem(loo, "test")},
                                history_len=6, candidates=5, max_train_examples=50)


def tower(data: NextItemData, seed: int, embed_dim: int = 4) -> Any:
    torch.manual_seed(seed)
    return pr.build_model("inttower", data.spec, hidden=(8,), heads=2, head_dim=2, embed_dim=embed_dim)


def rows_by_key(model: Any, data: NextItemData, ds: Dataset, side: str, field: str) -> dict[str, torch.Tensor]:
    """key -> the field's embedding row, through the field's vocabulary (rows 2..)."""
    t = getattr(data.spec, side)
    sparse = list(t.sparse)
    emb = getattr(model, f"{side}_embed")
    weight = emb.sparse[sparse.index(field)].weight if field in t.sparse else emb.multi[list(t.multi).index(field)].weight
    vocab = t.sparse[field] if field in t.sparse else t.multi[field][0]
    keys = domain_keys(ds, data.spec)["item" if field in ("item_id", "last_item", "history") else f"{side}:{field}"]
    return {keys[raw]: weight[row] for raw, row in enumerate(vocab.table.tolist()) if row >= 2}


def test_prerank_copies_item_and_feature_value_rows_by_key(tmp_path: Path, data: tuple[Dataset, Dataset]) -> None:
    old_ds, new_ds = data
    old_data, new_data = next_item_data(old_ds), next_item_data(new_ds)
    trained = tower(old_data, 3)
    pr.save_checkpoint(trained, "inttower", old_data.spec, tmp_path / "live", old_ds.fingerprint,
                       objective="next-item", keys=domain_keys(old_ds, old_data.spec))
    model, fresh = tower(new_data, 7), tower(new_data, 7)
    ws = warm_prerank(model, new_data.spec, domain_keys(new_ds, new_data.spec),
                      read_checkpoint(tmp_path / "live" / "prerank.pt"), old_data.spec)

    fields = [("item", "item_id"), ("item", "category"), ("user", "last_item"), ("user", "history")]
    for side, field in fields:
        got, was = rows_by_key(model, new_data, new_ds, side, field), rows_by_key(trained, old_data, old_ds, side, field)
        init = rows_by_key(fresh, new_data, new_ds, side, field)
        assert set(got) & set(was), field
        for key, row in got.items():
            assert torch.equal(row, was[key] if key in was else init[key]), (field, key)
        if field == "item_id":
            assert set(NEW_ITEMS) & set(got) and not set(NEW_ITEMS) & set(was)  # new items' rows: fresh
            assert (ws.copied, ws.new) == (len(set(got) & set(was)), len(got) - len(set(got) & set(was)))
        if field == "category":
            assert NEW_CATEGORY in set(got) - set(was)
    # the out-of-vocabulary rows and the layers are the checkpoint's
    assert torch.equal(model.item_embed.sparse[0].weight[1], trained.item_embed.sparse[0].weight[1])
    assert torch.equal(model.item_mlp.linears[0].weight, trained.item_mlp.linears[0].weight)

    other = tower(new_data, 7, embed_dim=8)
    with pytest.raises(Incompatible, match=r"^embed_dim is 4 in the checkpoint, 8 here$"):
        warm_prerank(other, new_data.spec, domain_keys(new_ds, new_data.spec),
                     read_checkpoint(tmp_path / "live" / "prerank.pt"), old_data.spec)
    pr.save_checkpoint(trained, "inttower", old_data.spec, tmp_path / "older", old_ds.fingerprint,
                       objective="next-item")  # written before the keys were recorded
    with pytest.raises(Incompatible, match="records no vocabulary keys"):
        warm_prerank(tower(new_data, 7), new_data.spec, domain_keys(new_ds, new_data.spec),
                     read_checkpoint(tmp_path / "older" / "prerank.pt"), old_data.spec)


def test_rerank_takes_every_weight_or_refuses_another_shape(tmp_path: Path, data: tuple[Dataset, Dataset]) -> None:
    def prm(item_dim: int = 5, dropout: float = 0.1) -> PRM:
        return PRM(PRMConfig(item_dim=item_dim, pv_dim=4, d_model=8, heads=1, layers=1, ffn_dim=16, max_len=8,
                             dropout=dropout))

    torch.manual_seed(0)
    trained = prm()
    rr.save_reranker(tmp_path / "prm.pt", "prm", trained, PVStats((0.0,) * 4, (1.0,) * 4), ImpressionConfig(list_len=8),
                     data[0].fingerprint)
    ckpt = read_checkpoint(tmp_path / "prm.pt")
    same = prm(dropout=0.3)
    warm_rerank(same, ckpt)  # dropout is a training setting, not a shape
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in same.state_dict().items())
    with pytest.raises(Incompatible, match=r"^item_dim is 5 in the checkpoint, 6 here$"):
        warm_rerank(prm(item_dim=6), ckpt)  # one more item feature
