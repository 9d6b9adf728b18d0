"""Warm start across data sets: a stage's fresh model takes the weights of a checkpoint trained on
another data set (`recsys retrain`: the live version's; `--warm-from` of `recsys train <stage>`).

Internal ids belong to one data set (training/data/dataset.py numbers items, users and feature
values by first appearance), so a table indexed by one is copied row by row through the external
key each row stands for, never by position:
    retrieval  item_embedding (N + 1, D): row i is item_ids[i] (the checkpoint's extra `item_ids`)
    pre-rank   each sparse and multi-valued field's embedding (V, E): row c is the value whose raw
               code the field's vocabulary (prerank_features.json) maps to c: an item id (item_id,
               last_item, history), a user id or a feature value, its key out of the domain key
               lists the checkpoint records (extra `keys`, domain_keys); rows 0 (padding) and 1
               (out of vocabulary) are copied as they are
    re-rank    no table indexed by an id (its item inputs are features: service/contract/rerank_inputs.py)
A row whose key the checkpoint lacks (a new item, user or value) keeps the fresh model's initial
value, drawn as a model trained anew draws it; keys gone from the data are dropped. Every other
weight is copied as is and must have the same shape; the configs must be equal but for the
tables' sizes and dropout (a training setting, not a shape). Otherwise `Incompatible`, with a
one-line reason, and the model is left untouched (every check runs before the first copy), so
the caller trains it anew (`attempt`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.layers import FieldEmbedding
from service.contract.features import HISTORY, LAST_ITEM
from training.checkpoints import Checkpoint, RetrievalModel, Stage, checkpoint_path, read_checkpoint
from training.data.dataset import Dataset
from training.data.features import FeatureSpec, TowerSpec

PAD_KEY, OOV_KEY = "\x00pad", "\x00oov"  # the keys of a vocabulary's rows 0 and 1
ITEM_FIELDS = ("item_id", LAST_ITEM, HISTORY)  # pre-rank fields whose raw codes are internal item ids
RETRIEVAL_TABLE = "item_embedding.weight"
UNSIZED = ("dropout",)  # config fields that change no shape: a warm start may change them


class Incompatible(ValueError):
    """The checkpoint cannot start this model; the message is one line, the reason."""


@dataclass(frozen=True)
class WarmStart:
    """What a warm start copied (`attempt` adds where from): rows of the id-indexed tables by key (`copied` of the keys both
    data sets have, `new` fresh rows, `dropped` rows of keys gone), counted over `keys`."""

    keys: str = ""  # what the counted rows are ("items"); "" for a model without id-indexed tables
    copied: int = 0
    new: int = 0
    dropped: int = 0

    def describe(self) -> str:
        if not self.keys:
            return "every weight copied"
        return (f"{self.copied} {self.keys} rows copied by id, {self.new} rows new to the table initialised fresh, "
                f"{self.dropped} rows of the checkpoint's table dropped")

    def record(self) -> dict[str, Any]:
        """What the new checkpoint keeps (extra `warm_start`)."""
        return {"keys": self.keys, "copied": self.copied, "new": self.new, "dropped": self.dropped}


def attempt(command: str, source: str | Path, start: Callable[[], WarmStart]) -> tuple[dict[str, Any], str]:
    """Run a warm start; (the record the checkpoint keeps, the one line to print). A checkpoint that
    cannot start the model (missing, unreadable, incompatible) gives a record with `skipped` and a
    line saying the stage trains anew; the model is then as built."""
    try:
        ws = start()
    except (OSError, ValueError, KeyError) as exc:  # Incompatible, CheckpointError, DataError: the input's fault
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        return {"from": str(source), "skipped": reason}, f"{command}: no warm start from {source} ({reason}); training anew"
    return {"from": str(source), **ws.record()}, f"{command}: warm start from {source}: {ws.describe()}"


def read_stage(path: str | Path, stage: Stage) -> Checkpoint:
    """The stage's checkpoint in a folder (or a checkpoint file); FileNotFoundError naming what is missing."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such folder")
    return read_checkpoint(checkpoint_path(path, stage))


# --- rows by key ---


def row_index(keys: Sequence[str | None]) -> dict[str, int]:
    """key -> row (rows without a key left out)."""
    return {k: i for i, k in enumerate(keys) if k is not None}


def copy_rows(fresh: torch.Tensor, old: torch.Tensor, new_keys: Sequence[str | None],
              old_keys: Sequence[str | None], what: str) -> tuple[torch.Tensor, int, int]:
    """`fresh` (V, ...) with each row whose key `old` (V', ...) has replaced by that row: (the
    table, rows copied, rows of `old` whose key the new table lacks)."""
    if old.shape[1:] != fresh.shape[1:]:
        raise Incompatible(f"{what} has rows of shape {tuple(old.shape[1:])} in the checkpoint, {tuple(fresh.shape[1:])} here")
    if old.shape[0] != len(old_keys) or fresh.shape[0] != len(new_keys):
        raise Incompatible(f"{what} has {old.shape[0]} rows for {len(old_keys)} keys in the checkpoint, "
                           f"{fresh.shape[0]} rows for {len(new_keys)} keys here")
    where = row_index(old_keys)
    pairs = [(i, where[k]) for i, k in enumerate(new_keys) if k is not None and k in where]
    out = fresh.detach().clone()
    if pairs:
        dst, src = (torch.tensor(x, dtype=torch.long) for x in zip(*pairs))
        out[dst] = old[src].to(out.dtype)
    kept = {k for k in new_keys if k is not None}
    dropped = sum(1 for k in where if k not in kept)
    return out, len(pairs), dropped


def same_config(old: Any, new: Any, sized: tuple[str, ...]) -> None:
    """Incompatible unless the two frozen configs are equal in every field but `sized` and UNSIZED."""
    if type(old) is not type(new):
        raise Incompatible(f"a {type(old).__name__} in the checkpoint, a {type(new).__name__} here")
    for f in dataclasses.fields(new):
        if f.name in sized or f.name in UNSIZED:
            continue
        a, b = getattr(old, f.name), getattr(new, f.name)
        if a != b:
            raise Incompatible(f"{f.name} is {a} in the checkpoint, {b} here")


def same_names(state: Mapping[str, torch.Tensor], fresh: Mapping[str, torch.Tensor]) -> None:
    if set(state) != set(fresh):
        diff = sorted(set(state) ^ set(fresh))
        raise Incompatible(f"other weights ({len(diff)} names differ, e.g. {diff[0]})")


def load_checked(model: nn.Module, state: Mapping[str, torch.Tensor], tables: Mapping[str, torch.Tensor]) -> None:
    """Load `state` (the checkpoint's weights) into `model`, `tables` (already remapped) replacing
    their keys; Incompatible (before anything is copied) when a name or a shape differs."""
    fresh = model.state_dict()
    same_names(state, fresh)
    merged: dict[str, torch.Tensor] = {}
    for name, value in fresh.items():
        if name in tables:
            merged[name] = tables[name]
        elif state[name].shape != value.shape:
            raise Incompatible(f"{name} is {tuple(state[name].shape)} in the checkpoint, {tuple(value.shape)} here")
        else:
            merged[name] = state[name]
    model.load_state_dict(merged)


def _check_stage(ckpt: Checkpoint, stage: Stage, model: nn.Module) -> None:
    if ckpt.kind.stage != stage:
        raise Incompatible(f"a {ckpt.kind.key} checkpoint, not a {stage} one")
    if type(model) is not ckpt.kind.model:
        raise Incompatible(f"a {ckpt.kind.key} checkpoint, the model here is a {type(model).__name__}")


# --- the three stages ---


def warm_retrieval(model: RetrievalModel, ckpt: Checkpoint, item_ids: Sequence[str]) -> WarmStart:
    """Start a fresh retriever of the data set whose item ids are `item_ids` ((N + 1,), [0] padding)
    from `ckpt`: item rows copied by external id, every other weight as is."""
    _check_stage(ckpt, "retrieval", model)
    same_config(ckpt.config, model.config, sized=("num_items",))
    old_ids = ckpt.extra.get("item_ids")
    if not isinstance(old_ids, list) or not old_ids:
        raise Incompatible("the checkpoint records no item ids")
    if RETRIEVAL_TABLE not in ckpt.state_dict:
        raise Incompatible(f"the checkpoint has no {RETRIEVAL_TABLE}")
    fresh = model.state_dict()[RETRIEVAL_TABLE]
    ids = [str(x) for x in item_ids]
    table, copied, dropped = copy_rows(fresh, ckpt.state_dict[RETRIEVAL_TABLE], ids, old_ids, "the item table")
    load_checked(model, ckpt.state_dict, {RETRIEVAL_TABLE: table})
    with torch.no_grad():
        model.item_embedding.weight[0].zero_()  # padding (both tables have it at row 0)
    return WarmStart("items", copied - 1, len(ids) - copied, dropped)  # padding not counted


def field_domain(tower: str, name: str) -> str:
    """The key domain of a pre-rank field's raw codes: "item", "user" or "<tower>:<column>"."""
    if name in ITEM_FIELDS:
        return "item"
    if name == "user_id":
        return "user"
    return f"{tower}:{name}"


def domain_keys(ds: Dataset, spec: FeatureSpec) -> dict[str, list[str]]:
    """The external key of each raw code, per domain the spec's sparse and multi-valued fields read
    (what a pre-rank checkpoint records as extra `keys`): items by internal id (training/data/
    features.py item_columns), users by user + 1, feature values by code (0 = unknown)."""
    out: dict[str, list[str]] = {}
    for tower, t in (("user", spec.user), ("item", spec.item)):
        table = ds.user_features if tower == "user" else ds.item_features
        for name in (*t.sparse, *t.multi):
            dom = field_domain(tower, name)
            if dom in out:
                continue
            if dom == "item":
                out[dom] = [str(x) for x in ds.item_ids.tolist()]
            elif dom == "user":
                out[dom] = [PAD_KEY, *map(str, ds.user_ids.tolist())]
            elif table is not None and name in table.vocab:
                out[dom] = [PAD_KEY, *map(str, table.vocab[name])]
    return out


def vocab_row_keys(table: Sequence[int] | Any, size: int, keys: Sequence[str]) -> list[str | None]:
    """The key of each of a vocabulary's `size` rows: raw code r -> row table[r] stands for keys[r]."""
    rows: list[str | None] = [None] * size
    rows[0], rows[1] = PAD_KEY, OOV_KEY
    for raw, row in enumerate(list(table)):
        if row >= 2 and raw < len(keys):
            rows[row] = keys[raw]
    return rows


def _field_names(t: TowerSpec) -> dict[str, list[str]]:
    return {"sparse": list(t.sparse), "multi": list(t.multi), "dense": list(t.dense)}


def warm_prerank(model: nn.Module, spec: FeatureSpec, keys: Mapping[str, Sequence[str]], ckpt: Checkpoint,
                 old_spec: FeatureSpec) -> WarmStart:
    """Start a fresh pre-rank tower (built over `spec`, the new data's fitted fields; `keys`:
    domain_keys of the new data) from `ckpt` and the spec it was trained with: each field's
    embedding rows copied by key, every other weight as is. The counts are the item_id field's."""
    _check_stage(ckpt, "prerank", model)
    cfg = getattr(model, "cfg")
    same_config(ckpt.config, cfg, sized=("user_fields", "item_fields"))
    old_keys = ckpt.extra.get("keys")
    if not isinstance(old_keys, dict):
        raise Incompatible("the checkpoint records no vocabulary keys")
    for tower in ("user", "item"):
        a, b = _field_names(getattr(old_spec, tower)), _field_names(getattr(spec, tower))
        for kind in ("sparse", "multi", "dense"):
            if a[kind] != b[kind]:
                gone, new = [x for x in a[kind] if x not in b[kind]], [x for x in b[kind] if x not in a[kind]]
                what = f"{len(a[kind])} in the checkpoint, {len(b[kind])} here" if len(gone) + len(new) > 4 else \
                    f"{gone or 'none'} gone, {new or 'none'} new" if gone or new else "in another order"
                raise Incompatible(f"the {tower} tower's {kind} fields differ ({what})")
    tables: dict[str, torch.Tensor] = {}
    counts = WarmStart("items")
    fresh = model.state_dict()
    same_names(ckpt.state_dict, fresh)
    for prefix, module in model.named_modules():
        if not isinstance(module, FieldEmbedding):
            continue
        side = "user" if module.cfg is cfg.user_fields else "item" if module.cfg is cfg.item_fields else None
        if side is None:
            raise Incompatible(f"{prefix}: a field embedding of neither tower")
        new_t, old_t = getattr(spec, side), getattr(old_spec, side)
        fields = [("sparse", j, n, new_t.sparse[n], old_t.sparse[n]) for j, n in enumerate(new_t.sparse)]
        fields += [("multi", j, n, new_t.multi[n][0], old_t.multi[n][0]) for j, n in enumerate(new_t.multi)]
        for kind, j, name, vocab, old_vocab in fields:
            dom = field_domain(side, name)
            if dom not in keys or dom not in old_keys:
                raise Incompatible(f"no keys for the {side} field {name!r} ({'in the checkpoint' if dom in keys else 'here'})")
            param = f"{prefix}.{kind}.{j}.weight"
            table, copied, dropped = copy_rows(
                fresh[param], ckpt.state_dict[param],
                vocab_row_keys(vocab.table, vocab.size, keys[dom]),
                vocab_row_keys(old_vocab.table, old_vocab.size, old_keys[dom]), f"{side} field {name!r}")
            tables[param] = table
            if side == "item" and name == "item_id":
                counts = WarmStart("items", copied - 2, vocab.size - copied, dropped)  # pad, OOV
    load_checked(model, ckpt.state_dict, tables)
    return counts


def warm_rerank(model: nn.Module, ckpt: Checkpoint) -> WarmStart:
    """Start a fresh re-ranker from `ckpt`: the same config (dropout aside), every weight as is."""
    _check_stage(ckpt, "rerank", model)
    same_config(ckpt.config, getattr(model, "config"), sized=())
    load_checked(model, ckpt.state_dict, {})
    return WarmStart()


