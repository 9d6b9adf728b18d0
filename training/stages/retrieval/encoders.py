"""The retrieval encoders, keyed by name: what `--encoder` chooses and what a checkpoint records.

Every encoder has the contract of models.sasrec.MultiLauncherSASRec (forward (B, L, M, D) at
every position, encode_user (B, M, D), item_embeddings (N, D), the input table
`item_embedding` (N + 1, D), a frozen `config` with num_items, maxlen, dim, num_launchers), so
the trainer, the ONNX export, the item index and max-fusion serve any of them unchanged.
"""

from __future__ import annotations

from typing import Any, Union, cast

from models.hstu import HSTUConfig
from models.mind import MINDConfig
from models.sasrec import SASRecConfig
from training.checkpoints import ModelKind, RetrievalModel, stage_kinds

RetrievalConfig = Union[SASRecConfig, HSTUConfig, MINDConfig]
__all__ = ["ENCODERS", "RetrievalConfig", "RetrievalModel", "build_model", "encoder_of", "served_vectors"]

# name -> (config, model): the retrieval part of the one checkpoint registry (training/checkpoints.py)
ENCODERS: dict[str, ModelKind] = stage_kinds("retrieval")


def encoder_of(obj: Any) -> str:
    """The encoder name of a model or a config."""
    for e in ENCODERS.values():
        if isinstance(obj, (e.config, e.model)):
            return e.name
    raise ValueError(f"not a retrieval encoder or its config: {type(obj).__name__}")


def served_vectors(config: RetrievalConfig) -> int:
    """M of the served user vectors (B, M, D), the manifest's dims.num_launchers: plain SASRec
    (num_launchers = 0) serves one vector, its last item state."""
    return max(config.num_launchers, 1)


def build_model(config: RetrievalConfig) -> RetrievalModel:
    """A fresh model for a config (the encoder is the config's type)."""
    return cast(RetrievalModel, ENCODERS[encoder_of(config)].build(config))
