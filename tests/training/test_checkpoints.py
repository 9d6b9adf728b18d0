"""The one checkpoint format (training/checkpoints.py): its registry, the old layouts it still
reads, the data-fingerprint rule (folders trained before it still export: tests/training/publish/test_sources.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from models.cascade import RetrievalPrior, RetrievalPriorConfig
from models.dcnv2 import DCNv2Config
from models.hstu import HSTUConfig
from models.inttower import IntTowerConfig
from models.layers import FieldsConfig
from models.mind import MINDConfig
from models.prm import PointwiseMLPConfig, PRMConfig
from models.sasrec import SASRecConfig
from models.two_tower import TwoTowerConfig
from training.checkpoints import (
    FILES,
    FORMAT_KEYS,
    REGISTRY,
    CheckpointError,
    kind_of,
    load_checkpoint,
    load_prerank,
    load_reranker,
    load_retrieval,
    read_checkpoint,
    save_checkpoint,
    stage_kinds,
    upgrade_layout,
)
from training.data.dataset import DataError
from training.environment import ENVIRONMENT_KEY
from training.data.sources import load

DATA = "synthetic:users=40,items=30,seed=0"
FIELDS = FieldsConfig(sparse_vocab=(5,), multi_vocab=(), multi_width=(), num_dense=1)
CONFIGS: dict[str, Any] = {
    "retrieval/sasrec": SASRecConfig(num_items=30, maxlen=5, dim=8, num_blocks=1, num_heads=1, num_launchers=2),
    "retrieval/hstu": HSTUConfig(num_items=30, maxlen=5, dim=8, num_blocks=1, num_heads=1, head_dim=4),
    "retrieval/mind": MINDConfig(num_items=30, maxlen=5, dim=8, num_interests=2),
    "prerank/two-tower": TwoTowerConfig(user_fields=FIELDS, item_fields=FIELDS, embed_dim=4, hidden=(8,)),
    "prerank/inttower": IntTowerConfig(user_fields=FIELDS, item_fields=FIELDS, embed_dim=4, hidden=(8,), heads=2,
                                       head_dim=2),
    "prerank/dcnv2": DCNv2Config(user_fields=FIELDS, item_fields=FIELDS, embed_dim=4, hidden=(8,)),
    "rerank/prm": PRMConfig(item_dim=3, pv_dim=2, d_model=4, heads=1, layers=1, ffn_dim=8, max_len=5),
    "rerank/prm_base": PRMConfig(item_dim=3, d_model=4, heads=1, layers=1, ffn_dim=8, max_len=5),
    "rerank/mlp": PointwiseMLPConfig(item_dim=3, pv_dim=2, hidden=(4,), max_len=5),
}


@pytest.fixture(scope="module")
def ds() -> Any:
    return load(DATA)


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_the_registry_builds_every_kind_of_each_stage() -> None:
    assert set(REGISTRY) == set(CONFIGS)
    assert sorted(stage_kinds("retrieval")) == ["hstu", "mind", "sasrec"]
    assert sorted(stage_kinds("prerank")) == ["dcnv2", "inttower", "two-tower"]
    assert sorted(stage_kinds("rerank")) == ["mlp", "prm", "prm_base"]
    for key, cfg in CONFIGS.items():
        kind = REGISTRY[key]
        model = kind.build(kind.config_from_dict(cfg.to_dict()))  # what a checkpoint's config dict rebuilds
        assert isinstance(model, kind.model) and isinstance(cfg, kind.config) and kind.key == key
    with pytest.raises(ValueError, match=r"unknown pre-ranking model 'deepfm' \(expected one of"):
        kind_of("prerank", "deepfm")


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_one_format_round_trips_every_kind(key: str, tmp_path: Path, ds: Any) -> None:
    kind = REGISTRY[key]
    model = kind.build(CONFIGS[key])
    path = save_checkpoint(tmp_path / FILES[kind.stage], key, CONFIGS[key], model.state_dict(), ds.fingerprint,
                           {"metrics": {"NDCG@10": 0.1}})
    assert set(torch.load(path, weights_only=True)) == set(FORMAT_KEYS)  # the one layout on disk
    again, ckpt = load_checkpoint(tmp_path, kind.stage, ds)
    env = ckpt.extra.pop(ENVIRONMENT_KEY)  # what it was trained with, beside what the stage recorded
    assert env["torch"] == torch.__version__ and env["numpy"] == np.__version__
    assert env["torch_threads"] == str(torch.get_num_threads())
    assert ckpt.kind is kind and ckpt.config == CONFIGS[key] and ckpt.extra == {"metrics": {"NDCG@10": 0.1}}
    assert same_weights(again, model) and not again.training


# --- the layouts written before the one format (as the code of /work/ref21 wrote them) ---


def old_retrieval(model: nn.Module, ds: Any, encoder: str | None) -> dict[str, Any]:
    payload = {"kind": "retrieval", "model_config": model.config.to_dict(), "state_dict": model.state_dict(),
               "data": DATA, "fingerprint": ds.fingerprint, "item_ids": ds.item_ids.tolist(), "holdout": 4}
    return payload if encoder is None else {"encoder": encoder, **payload}  # no encoder: before HSTU / MIND


def old_prerank(model: nn.Module, name: str, ds: Any, prior: dict[str, Any] | None) -> dict[str, Any]:
    return {"model": name, "config": model.cfg.to_dict(), "state_dict": model.state_dict(), "prior": prior,
            "objective": "next-item", "train": {"epochs": 2}, "fingerprint": ds.fingerprint, "retrieval": None}


def old_rerank(model: nn.Module, name: str, ds: Any) -> dict[str, Any]:
    return {"kind": "rerank", "name": name, "config_type": type(model.config).__name__,
            "config": model.config.to_dict(), "state_dict": model.state_dict(),
            "pv_stats": {"mean": (0.0, 0.0), "std": (1.0, 1.0)}, "impressions": {"list_len": 5},
            "fingerprint": ds.fingerprint, "train": {"epochs": 2}}


def test_upgrade_layout_converts_each_old_layout() -> None:
    state = {"w": torch.ones(2)}
    assert upgrade_layout({"kind": "retrieval", "model_config": {"a": 1}, "state_dict": state, "fingerprint": "f",
                           "data": "d"}) == {"kind": "retrieval/sasrec", "config": {"a": 1}, "state_dict": state,
                                             "fingerprint": "f", "extra": {"data": "d"}}
    new = upgrade_layout({"model": "inttower", "config": {"b": 2}, "state_dict": state, "prior": None,
                          "objective": "ctr"})
    assert new == {"kind": "prerank/inttower", "config": {"b": 2}, "state_dict": state, "fingerprint": None,
                   "extra": {"prior": None, "objective": "ctr"}}
    new = upgrade_layout({"kind": "rerank", "name": "prm_base", "config_type": "PRMConfig", "config": {},
                          "state_dict": state, "fingerprint": "f", "train": {}})
    assert new["kind"] == "rerank/prm_base" and new["extra"] == {"train": {}}
    assert upgrade_layout(new) is new  # the one format passes through
    with pytest.raises(CheckpointError, match=r"not a checkpoint layout this code knows \(kind 'prerank'"):
        upgrade_layout({"kind": "prerank", "state_dict": state})


@pytest.mark.parametrize("encoder", ["sasrec", "hstu", None])
def test_an_old_retrieval_checkpoint_loads(encoder: str | None, tmp_path: Path, ds: Any) -> None:
    key = f"retrieval/{encoder or 'sasrec'}"
    model = REGISTRY[key].build(CONFIGS[key])
    torch.save(old_retrieval(model, ds, encoder), tmp_path / "checkpoint.pt")
    again, ckpt = load_retrieval(tmp_path, ds)
    assert ckpt.kind.key == key and same_weights(again, model) and again.config == model.config
    assert ckpt.extra["holdout"] == 4 and ckpt.extra["data"] == DATA and ckpt.fingerprint == ds.fingerprint


@pytest.mark.parametrize("name", ["inttower", "two-tower", "dcnv2"])
def test_an_old_prerank_checkpoint_loads_with_its_prior(name: str, tmp_path: Path, ds: Any) -> None:
    from training.data.features import FeatureSpec
    from training.stages.prerank.train import load_prior

    model = REGISTRY[f"prerank/{name}"].build(CONFIGS[f"prerank/{name}"])
    prior = RetrievalPrior(RetrievalPriorConfig(num_launchers=2))
    with torch.no_grad():
        prior.weight.fill_(0.5)
    state = {k: v for k, v in prior.state_dict().items() if k != "tower_weight"}  # saved before the gate
    torch.save(old_prerank(model, name, ds, {"config": prior.cfg.to_dict(), "state_dict": state}),
               tmp_path / "prerank.pt")
    spec = FeatureSpec.__new__(FeatureSpec)
    (tmp_path / "prerank_features.json").write_text("{}")
    with pytest.MonkeyPatch.context() as mp:  # the spec file is not what this test is about
        mp.setattr(FeatureSpec, "load", staticmethod(lambda path: spec))
        again, got_spec, ckpt = load_prerank(tmp_path, ds)
    assert got_spec is spec and ckpt.name == name and same_weights(again, model)
    assert ckpt.extra["objective"] == "next-item" and ckpt.extra["train"] == {"epochs": 2}
    loaded = load_prior(ckpt)
    assert loaded is not None and float(loaded.weight.detach()) == 0.5 and float(loaded.tower_weight.detach()) == 1.0


@pytest.mark.parametrize("name", ["prm", "prm_base", "mlp"])
def test_an_old_rerank_checkpoint_loads(name: str, tmp_path: Path, ds: Any) -> None:
    model = REGISTRY[f"rerank/{name}"].build(CONFIGS[f"rerank/{name}"])
    torch.save(old_rerank(model, name, ds), tmp_path / f"{name}.pt")
    again, ckpt = load_reranker(tmp_path / f"{name}.pt", ds)
    assert ckpt.name == name and same_weights(again, model) and again.config == model.config
    assert ckpt.extra["pv_stats"]["std"] == (1.0, 1.0) and ckpt.extra["impressions"] == {"list_len": 5}


# --- the fingerprint rule and the other refusals ---


def test_a_missing_or_other_fingerprint_is_refused_with_the_retrain_command(tmp_path: Path, ds: Any) -> None:
    model = REGISTRY["rerank/prm"].build(CONFIGS["rerank/prm"])
    old = old_rerank(model, "prm", ds)
    del old["fingerprint"]  # the old re-rank rule (impressions.Pipeline.load) let this through
    torch.save(old, tmp_path / "prm.pt")
    with pytest.raises(DataError) as err:
        load_reranker(tmp_path / "prm.pt", ds, DATA)
    assert str(err.value) == (
        f"{tmp_path / 'prm.pt'}: the rerank checkpoint records no data fingerprint, so it cannot be checked "
        f"against {ds.name}; retrain it: recsys train rerank --data {DATA} --retrieval RETRIEVAL_DIR "
        f"--prerank PRERANK_DIR --out {tmp_path}")
    key = "retrieval/sasrec"
    save_checkpoint(tmp_path / "checkpoint.pt", key, CONFIGS[key], REGISTRY[key].build(CONFIGS[key]).state_dict(),
                    "0123456789abcdef", {})
    with pytest.raises(DataError, match=(r"checkpoint.pt: the retrieval checkpoint was trained on another data set "
                                         rf"\(fingerprint 0123456789abcdef, .* has {ds.fingerprint}\); retrain it: "
                                         r"recsys train retrieval --data DATA --out ")):
        load_retrieval(tmp_path, ds)


def test_unreadable_foreign_and_misfit_files_are_refused(tmp_path: Path, ds: Any) -> None:
    (tmp_path / "checkpoint.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="checkpoint.pt: unreadable checkpoint"):
        read_checkpoint(tmp_path / "checkpoint.pt")
    key = "rerank/mlp"
    save_checkpoint(tmp_path / "checkpoint.pt", key, CONFIGS[key], REGISTRY[key].build(CONFIGS[key]).state_dict(),
                    ds.fingerprint, {})
    with pytest.raises(CheckpointError, match=r"checkpoint.pt: not a retrieval checkpoint \(kind 'rerank/mlp'\)"):
        load_retrieval(tmp_path, ds)
    other = REGISTRY["rerank/prm"].build(CONFIGS["rerank/prm"]).state_dict()
    save_checkpoint(tmp_path / "prm.pt", "rerank/prm", CONFIGS["rerank/prm_base"], other, ds.fingerprint, {})
    with pytest.raises(CheckpointError, match="prm.pt: the weights do not fit the rerank/prm config"):
        load_reranker(tmp_path / "prm.pt", ds)
    with pytest.raises(FileNotFoundError, match="no prerank.pt there"):
        load_prerank(tmp_path, ds)
