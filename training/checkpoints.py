"""Checkpoints: the one file format of the three stages, the one registry of their models and the
one data-fingerprint rule (the checkpoints a version is built from: training/publish/sources.py).

One format, whatever the stage (torch.save of a dict, read back with weights_only=True):
    {"kind": "<stage>/<model>", "config": model.config.to_dict(), "state_dict": ...,
     "fingerprint": the data set's fingerprint, "extra": what the stage records beside the weights,
     with "environment": the CPU, library versions and thread count it was trained with}
`kind` picks the REGISTRY entry (config class, model class) that rebuilds the model. Files written
before this format (three key layouts) are converted when read (upgrade_layout), so trained folders
keep exporting. Every load checks the data set (check_fingerprint): a checkpoint that records no
fingerprint, or another one, is refused with the command that retrains it.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import torch
from torch import nn

from models.dcnv2 import DCNv2, DCNv2Config
from models.hstu import HSTU, HSTUConfig
from models.inttower import IntTower, IntTowerConfig
from models.mind import MIND, MINDConfig
from models.prm import PointwiseMLP, PointwiseMLPConfig, PRM, PRMConfig, RerankModel
from models.sasrec import MultiLauncherSASRec, SASRecConfig
from models.two_tower import TwoTower, TwoTowerConfig
from service.contract.layout import PRERANK_CHECKPOINT, PRERANK_FEATURES, RERANK_CHECKPOINT, RETRIEVAL_CHECKPOINT
from training.data.dataset import DataError, Dataset
from training.data.features import FeatureSpec
from training.environment import ENVIRONMENT_KEY, environment

Stage = Literal["retrieval", "prerank", "rerank"]
RetrievalModel = Union[MultiLauncherSASRec, HSTU, MIND]
FILES: dict[Stage, str] = {"retrieval": RETRIEVAL_CHECKPOINT, "prerank": PRERANK_CHECKPOINT,
                           "rerank": RERANK_CHECKPOINT}
# what a refused checkpoint's message tells the user to run (DATA: the data spec when known)
RETRAIN: dict[Stage, str] = {
    "retrieval": "recsys train retrieval --data {data} --out {out}",
    "prerank": "recsys train prerank --data {data} --objective next-item --retrieval RETRIEVAL_DIR --out {out}",
    "rerank": "recsys train rerank --data {data} --retrieval RETRIEVAL_DIR --prerank PRERANK_DIR --out {out}",
}
FORMAT_KEYS = ("kind", "config", "state_dict", "fingerprint", "extra")
MODEL_NOUN: dict[Stage, str] = {"retrieval": "retrieval encoder", "prerank": "pre-ranking model", "rerank": "re-ranker"}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, is of an unknown kind or of another stage; names the file."""


# --- the registry ---


@dataclass(frozen=True)
class ModelKind:
    """What rebuilds a model from its checkpoint: its stage, its name and its (config, model) classes."""

    stage: Stage
    name: str
    config: type
    model: type[nn.Module]

    @property
    def key(self) -> str:
        return f"{self.stage}/{self.name}"

    def config_from_dict(self, d: dict[str, Any]) -> Any:
        """The frozen config a checkpoint saved with config.to_dict()."""
        if hasattr(self.config, "from_dict"):  # field models: nested FieldsConfig
            return self.config.from_dict(d)
        return self.config(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def build(self, config: Any) -> nn.Module:
        """A fresh model (random init: draws from torch's global generator, as training expects)."""
        return self.model(config)


REGISTRY: dict[str, ModelKind] = {k.key: k for k in (
    ModelKind("retrieval", "sasrec", SASRecConfig, MultiLauncherSASRec),
    ModelKind("retrieval", "hstu", HSTUConfig, HSTU),
    ModelKind("retrieval", "mind", MINDConfig, MIND),
    ModelKind("prerank", "two-tower", TwoTowerConfig, TwoTower),
    ModelKind("prerank", "inttower", IntTowerConfig, IntTower),
    ModelKind("prerank", "dcnv2", DCNv2Config, DCNv2),
    ModelKind("rerank", "prm", PRMConfig, PRM),
    ModelKind("rerank", "prm_base", PRMConfig, PRM),  # PRM without the personalised vector (pv_dim 0)
    ModelKind("rerank", "mlp", PointwiseMLPConfig, PointwiseMLP),
)}


def stage_kinds(stage: Stage) -> dict[str, ModelKind]:
    """name -> kind of one stage's models (what `--encoder` / `--model` choose from)."""
    return {k.name: k for k in REGISTRY.values() if k.stage == stage}


def kind_of(stage: Stage, name: str) -> ModelKind:
    kinds = stage_kinds(stage)
    if name not in kinds:
        raise ValueError(f"unknown {MODEL_NOUN[stage]} {name!r} (expected one of {sorted(kinds)})")
    return kinds[name]


# --- the format ---


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A checkpoint file, read back: kind, typed config, weights, data fingerprint, extra."""

    path: Path
    kind: ModelKind
    config: Any  # the kind's frozen config dataclass
    state_dict: dict[str, torch.Tensor]
    fingerprint: str | None
    extra: dict[str, Any]

    @property
    def name(self) -> str:
        return self.kind.name

    def build(self) -> nn.Module:
        """The model with these weights, in eval mode; CheckpointError when they do not fit the config."""
        model = self.kind.build(self.config)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as exc:
            raise CheckpointError(f"{self.path}: the weights do not fit the {self.kind.key} config "
                                  f"({str(exc).splitlines()[0]})") from None
        return model.eval()


def save_checkpoint(path: str | Path, kind: str, config: Any, state_dict: dict[str, torch.Tensor],
                    fingerprint: str, extra: dict[str, Any]) -> Path:
    """Write one checkpoint (temp file + rename, so a reader never sees half a file); `extra` gains
    the environment it was trained in (training/environment.py)."""
    if kind not in REGISTRY:
        raise ValueError(f"unknown checkpoint kind {kind!r} (expected one of {sorted(REGISTRY)})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"kind": kind, "config": config.to_dict(), "state_dict": state_dict, "fingerprint": fingerprint,
               "extra": {**extra, ENVIRONMENT_KEY: environment()}}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def upgrade_layout(payload: dict[str, Any]) -> dict[str, Any]:
    """`payload` in the one format (FORMAT_KEYS), converting the three layouts written before it:
        retrieval {"kind": "retrieval", "encoder" (absent: sasrec), "model_config", "state_dict", ...}
        pre-rank  {"model", "config", "state_dict", "prior", ...}  (no kind; a prior without
                  tower_weight predates the gate that added the tower at weight 1)
        re-rank   {"kind": "rerank", "name", "config_type", "config", "state_dict", ...}
    Every other key of an old layout (fingerprint aside) goes to `extra` unchanged."""
    if not isinstance(payload, dict):
        raise CheckpointError(f"not a checkpoint: a {type(payload).__name__}, not a dict")
    if set(payload) == set(FORMAT_KEYS):
        return payload
    old = dict(payload)
    tag = old.pop("kind", None)
    if tag == "retrieval" and "model_config" in old:
        kind, config = "retrieval/" + old.pop("encoder", "sasrec"), old.pop("model_config")
    elif tag is None and "model" in old and "config" in old:
        kind, config = "prerank/" + old.pop("model"), old.pop("config")
        if old.get("prior"):
            state = dict(old["prior"]["state_dict"])
            state.setdefault("tower_weight", torch.ones(()))
            old["prior"] = {**old["prior"], "state_dict": state}
    elif tag == "rerank" and "name" in old:
        old.pop("config_type", None)  # the name decides the class
        kind, config = "rerank/" + old.pop("name"), old.pop("config")
    else:
        raise CheckpointError(f"not a checkpoint layout this code knows (kind {tag!r}, keys {sorted(old)})")
    if "state_dict" not in old:
        raise CheckpointError(f"a {kind} checkpoint without weights (keys {sorted(old)})")
    return {"kind": kind, "config": config, "state_dict": old.pop("state_dict"),
            "fingerprint": old.pop("fingerprint", None), "extra": old}


def checkpoint_path(path: str | Path, stage: Stage) -> Path:
    """A checkpoint file, or the stage's file in a folder."""
    path = Path(path)
    return path / FILES[stage] if path.is_dir() else path


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read one file (FileNotFoundError when missing, CheckpointError when unreadable); not built, not checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent}: no {path.name} there")
    try:
        # weights_only: unpickling a planted file must not run code
        payload = upgrade_layout(torch.load(path, map_location="cpu", weights_only=True))
    except (pickle.UnpicklingError, EOFError, OSError, RuntimeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0]})") from None
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    if payload["kind"] not in REGISTRY:
        raise CheckpointError(f"{path}: unknown checkpoint kind {payload['kind']!r} (known: {sorted(REGISTRY)})")
    kind = REGISTRY[payload["kind"]]
    try:
        config = kind.config_from_dict(dict(payload["config"]))
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: bad {kind.key} config ({exc})") from None
    return Checkpoint(path, kind, config, payload["state_dict"], payload["fingerprint"], dict(payload["extra"]))


def check_fingerprint(ckpt: Checkpoint, ds: Dataset, data_spec: str | None = None) -> None:
    """The one data rule: DataError unless the checkpoint records `ds`'s fingerprint."""
    retrain = RETRAIN[ckpt.kind.stage].format(data=data_spec or "DATA", out=ckpt.path.parent)
    if ckpt.fingerprint is None:
        raise DataError(f"{ckpt.path}: the {ckpt.kind.stage} checkpoint records no data fingerprint, so it cannot "
                        f"be checked against {ds.name}; retrain it: {retrain}")
    if ckpt.fingerprint != ds.fingerprint:
        raise DataError(f"{ckpt.path}: the {ckpt.kind.stage} checkpoint was trained on another data set "
                        f"(fingerprint {ckpt.fingerprint}, {ds.name} has {ds.fingerprint}); retrain it: {retrain}")


def load_checkpoint(path: str | Path, stage: Stage, ds: Dataset,
                    data_spec: str | None = None) -> tuple[nn.Module, Checkpoint]:
    """Read a checkpoint of `stage` (a file, or the stage's file in a folder), check it against `ds`
    and build its model (eval mode). FileNotFoundError / CheckpointError / DataError."""
    ckpt = read_checkpoint(checkpoint_path(path, stage))
    if ckpt.kind.stage != stage:
        raise CheckpointError(f"{ckpt.path}: not a {stage} checkpoint (kind {ckpt.kind.key!r})")
    check_fingerprint(ckpt, ds, data_spec)
    return ckpt.build(), ckpt


def load_retrieval(path: str | Path, ds: Dataset, data_spec: str | None = None) -> tuple[RetrievalModel, Checkpoint]:
    model, ckpt = load_checkpoint(path, "retrieval", ds, data_spec)
    assert isinstance(model, (MultiLauncherSASRec, HSTU, MIND)), type(model)
    if model.config.num_items != ds.num_items:  # same fingerprint, other catalog: a corrupt file
        raise DataError(f"{ckpt.path}: retrieval checkpoint has {model.config.num_items} items, "
                        f"the data set {ds.num_items}")
    return model, ckpt


def load_prerank(folder: str | Path, ds: Dataset,
                 data_spec: str | None = None) -> tuple[nn.Module, FeatureSpec, Checkpoint]:
    """The pre-ranker and the feature spec saved beside it (prerank_features.json)."""
    model, ckpt = load_checkpoint(Path(folder) / PRERANK_CHECKPOINT, "prerank", ds, data_spec)
    return model, FeatureSpec.load(ckpt.path.parent / PRERANK_FEATURES), ckpt


def load_reranker(path: str | Path, ds: Dataset, data_spec: str | None = None) -> tuple[RerankModel, Checkpoint]:
    model, ckpt = load_checkpoint(path, "rerank", ds, data_spec)
    assert isinstance(model, (PRM, PointwiseMLP)), type(model)
    return model, ckpt
