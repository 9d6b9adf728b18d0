"""ONNX export of the retrieval encoder, checked against eager PyTorch (the item index: training/publish/build.py)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from training.checkpoints import RetrievalModel
from models.sasrec import EncodeUser
from service.contract.layout import ITEMS_NPY, RETRIEVAL_ONNX, onnx_data

log = logging.getLogger(__name__)

# ONNX Runtime fuses and reorders float32 reductions (attention, LayerNorm, GEMM accumulation),
# so outputs differ from eager PyTorch by rounding: ~1e-6 relative on O(1) LayerNorm outputs.
# 1e-4 absolute + relative leaves two orders of magnitude of headroom and still catches any
# real graph difference (a wrong mask or position moves outputs by 1e-2 or more).
PARITY_ATOL = 1e-4
PARITY_RTOL = 1e-4


def export_retrieval(model: RetrievalModel, out_dir: str | Path) -> tuple[Path, Path]:
    """Write retrieval.onnx (item_seq int64 (B, L) -> user_vectors float32 (B, M, D), dynamic B
    and 1 <= L <= maxlen) and items.npy ((N, D) float32, row r = item r + 1)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    maxlen = model.config.maxlen
    example = torch.ones(2, maxlen, dtype=torch.long)
    onnx_path = out / RETRIEVAL_ONNX
    batch = torch.export.Dim("batch", min=1, max=65536)
    seq = torch.export.Dim("seq", min=1, max=maxlen)
    # the exporter logs a warning per missing optional torchvision op and prints progress
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            EncodeUser(model),
            (example,),
            input_names=["item_seq"],
            output_names=["user_vectors"],
            dynamic_shapes={"item_seq": {0: batch, 1: seq}},
            dynamo=True,
            verbose=False,
        )
    assert program is not None
    # weights (the (N + 1, D) item table above all) in retrieval.onnx.data: ONNX Runtime maps that
    # file instead of parsing it out of the graph (1M items: session 5-6 s -> ~0 s, and no private
    # copy of the table per worker; service/artifacts.py)
    for stale in (onnx_path, onnx_path.with_name(onnx_data(onnx_path.name))):
        stale.unlink(missing_ok=True)
    program.save(str(onnx_path), external_data=True)
    items_path = out / ITEMS_NPY
    np.save(items_path, model.item_embeddings().detach().numpy().astype(np.float32))
    return onnx_path, items_path


def retrieval_parity(
    model: RetrievalModel, onnx_path: str | Path, batches: tuple[tuple[int, int], ...] = ((1, 1), (1, 0), (7, 0)),
    seed: int = 0,
) -> float:
    """Max |ONNX - eager| over random left-padded histories; (B, L) with L = 0 meaning maxlen.

    Raises AssertionError when outside PARITY_ATOL / PARITY_RTOL.
    """
    rng = np.random.default_rng(seed)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for B, L in batches:
        L = L or model.config.maxlen
        seq = rng.integers(1, model.config.num_items + 1, size=(B, L))
        pad = rng.integers(0, L, size=B)  # left padding per row, at least one real item
        seq[np.arange(L)[None, :] < pad[:, None]] = 0
        got = sess.run(None, {"item_seq": seq.astype(np.int64)})[0]
        with torch.no_grad():
            want = model.encode_user(torch.from_numpy(seq)).numpy()
        np.testing.assert_allclose(got, want, atol=PARITY_ATOL, rtol=PARITY_RTOL)
        worst = max(worst, float(np.abs(got - want).max()))
    return worst
