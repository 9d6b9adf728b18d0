"""The retrieval encoders, keyed by name: what `--encoder` chooses and what a checkpoint records.

Every encoder has the contract of models.sasrec.MultiLauncherSASRec (forward (B, L, M, D) at
every position, encode_user (B, M, D), item_embeddings (N, D), the input table
`item_embedding` (N + 1, D), a frozen `config` with num_items, maxlen, dim, num_launchers), so
the trainer, the ONNX export, the item index and max-fusion serve any of them unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

from models.hstu import HSTU, HSTUConfig
from models.mind import MIND, MINDConfig
from models.sasrec import MultiLauncherSASRec, SASRecConfig

RetrievalModel = Union[MultiLauncherSASRec, HSTU, MIND]
RetrievalConfig = Union[SASRecConfig, HSTUConfig, MINDConfig]


@dataclass(frozen=True)
class Encoder:
    name: str
    config: type
    model: type


ENCODERS: dict[str, Encoder] = {
    e.name: e
    for e in (
        Encoder("sasrec", SASRecConfig, MultiLauncherSASRec),
        Encoder("hstu", HSTUConfig, HSTU),
        Encoder("mind", MINDConfig, MIND),
    )
}


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
    return ENCODERS[encoder_of(config)].model(config)


def model_from_dict(encoder: str, config: dict[str, Any]) -> RetrievalModel:
    """The model a checkpoint describes: its encoder name and its saved config."""
    if encoder not in ENCODERS:
        raise ValueError(f"unknown retrieval encoder {encoder!r}; known: {sorted(ENCODERS)}")
    e = ENCODERS[encoder]
    return e.model(e.config(**config))
