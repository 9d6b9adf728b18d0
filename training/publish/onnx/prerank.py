"""Pre-ranker export: prerank_user.onnx (the user tower) and prerank_items.npy (the catalog's
item heads), read by service/prerank.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.cascade import PairPrior, RetrievalPrior
from models.layers import Fields
from service.contract.layout import PRERANK_FEATURES as FEATURES
from service.contract.layout import PRERANK_ITEMS as ITEMS_NPY
from service.contract.layout import PRERANK_MANIFEST as MANIFEST
from service.contract.layout import PRERANK_USER_ONNX as USER_ONNX
from service.contract.pair_features import PAIR_FEATURES
from training.data.features import EncodedFields, FeatureSpec
from training.stages.prerank.train import HeadTowers, has_heads, to_fields


class UserPart(nn.Module):
    """The exported user side: (user_sparse, user_dense, user_multi) -> user_heads (B, L, H, d)."""

    def __init__(self, model: HeadTowers) -> None:
        super().__init__()
        self.model = model

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor, multi: torch.Tensor) -> torch.Tensor:
        return self.model.user_heads(Fields(sparse, dense, multi))


def export_prerank(model: nn.Module, spec: FeatureSpec, catalog: EncodedFields, out_dir: str | Path,
                   prior: RetrievalPrior | PairPrior | None = None,
                   route: dict[str, float] | None = None) -> dict[str, str]:
    """Write prerank_user.onnx, prerank_items.npy and prerank_manifest.json.

    prerank_user.onnx: user_sparse int64 (B, S), user_dense float32 (B, Dn), user_multi int64
    (B, K) -> user_heads float32 (B, L, H, d). prerank_items.npy: float32 (N + 1, H, d), the
    item heads of the whole catalog, row 0 (padding) zero. Serving: service.prerank.
    """
    if not has_heads(model):
        raise ValueError(f"{type(model).__name__} has no precomputable item side and is never served")
    import onnx  # deferred: export-only dependency

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    cfg = spec.user.fields_config()
    example = (
        torch.zeros(2, len(cfg.sparse_vocab), dtype=torch.long),
        torch.zeros(2, cfg.num_dense),
        torch.zeros(2, sum(cfg.multi_width), dtype=torch.long),
    )
    names = ["user_sparse", "user_dense", "user_multi"]
    # the exporter restores the wrapper's train/eval mode afterwards, recursively: keep it eval
    torch.onnx.export(
        UserPart(model).eval(), example, out / USER_ONNX, input_names=names, output_names=["user_heads"],
        dynamic_axes={**{n: {0: "batch"} for n in names}, "user_heads": {0: "batch"}}, dynamo=False,
    )
    onnx.checker.check_model(str(out / USER_ONNX))
    with torch.no_grad():
        items = model.item_heads(to_fields(catalog)).numpy().astype(np.float32)  # (N + 1, H, d)
    items[0] = 0.0
    np.save(out / ITEMS_NPY, items)
    with torch.no_grad():
        uh = model.user_heads(Fields(*example))
    pair = isinstance(prior, PairPrior)
    manifest = {
        "model": type(model).__name__,
        "inputs": {"user_sparse": ["B", example[0].shape[1], "int64"], "user_dense": ["B", example[1].shape[1], "float32"],
                   "user_multi": ["B", example[2].shape[1], "int64"]},
        "outputs": {"user_heads": ["B", *uh.shape[1:], "float32"]},
        "items": {"file": ITEMS_NPY, "shape": list(items.shape), "dtype": "float32", "padding_row": 0},
        "features": FEATURES,
        "score": ("tower_weight * " if prior is not None else "")
                 + "(sum over layers and user heads of the max over item heads of the dot product)"
                 + ((" + pair prior over the pair features (service/contract/pair_features.py)" if pair else
                     " + weight * fused retrieval score + launcher_bias[launcher]") if prior is not None else ""),
        "retrieval_prior": None if prior is None or pair else prior.serving(),
        **({"pair_prior": {**prior.serving(PAIR_FEATURES), **({"route": route} if route else {})}}
           if isinstance(prior, PairPrior) else {}),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return {"user_onnx": str(out / USER_ONNX), "items": str(out / ITEMS_NPY), "manifest": str(out / MANIFEST)}
