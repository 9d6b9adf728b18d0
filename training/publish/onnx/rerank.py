"""ONNX export of the re-ranker (PRM, PRM-BASE or the pointwise MLP) and its parity check.

rerank.onnx, dynamic batch B >= 1 and list length 1 <= L <= config.max_len:
    item_feats  float32 (B, L, F_item)
    pv          float32 (B, L, P)   P = config.pv_dim, or 1 when pv_dim = 0 (see below)
    init_score  float32 (B, L), or (B, L, S) when config.num_scores = S > 1
    mask        bool    (B, L)      True = real candidate
 -> scores      float32 (B, L)      logits; padding entries hold models.prm.PAD_LOGIT
The list softmax of `scores` is the predicted click distribution; the service only sorts.

A zero-width tensor input is awkward (ONNX Runtime and most clients dislike 0-sized
dimensions, and the exporter would drop an unused input), so a model without a personalised
vector (PRM-BASE) still takes a (B, L, 1) `pv` input: feed zeros, it is ignored. Every
artifact therefore has the same four inputs. (The graph keeps `pv` alive by adding
0 * pv.sum() to the output; ONNX Runtime's cost for that is a few hundred FLOPs.)
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from models.prm import PAD_LOGIT, RerankModel
from service.contract.layout import RERANK_ONNX
from training.stages.rerank.train import ListData

INPUT_NAMES = ("item_feats", "pv", "init_score", "mask")
OUTPUT_NAME = "scores"

# ONNX Runtime fuses and reorders float32 reductions (attention softmax, LayerNorm, GEMM
# accumulation), so real entries' logits differ from eager PyTorch by rounding: ~1e-6 on O(1)
# logits. 1e-4 absolute + relative leaves two orders of magnitude of headroom and still
# catches a real graph difference (a dropped padding mask or a shifted position moves the
# logits by 1e-2 or more). Padding entries must be exactly PAD_LOGIT on both sides.
PARITY_ATOL = 1e-4
PARITY_RTOL = 1e-4


def score_shape(model: RerankModel, B: int, L: int) -> tuple[int, ...]:
    """Shape of the `init_score` input: (B, L) for one score, (B, L, S) for several."""
    S = model.config.num_scores
    return (B, L) if S == 1 else (B, L, S)


def pv_width(model: RerankModel) -> int:
    """Width of the exported `pv` input: pv_dim, or 1 for a model without PV."""
    return max(model.config.pv_dim, 1)


class _RerankGraph(nn.Module):
    """The exported function: the model's forward, with an ignored `pv` kept as an input."""

    def __init__(self, model: RerankModel) -> None:
        super().__init__()
        self.model = model
        self.keep_pv = model.config.pv_dim == 0

    def forward(
        self, item_feats: torch.Tensor, pv: torch.Tensor, init_score: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        scores = self.model(item_feats, pv, init_score, mask)  # (B, L)
        if self.keep_pv:
            # tie the unused input into the graph so the exporter keeps it (the contract says four inputs)
            scores = scores + 0.0 * pv.sum(dim=-1)
        return scores


def export_rerank(model: RerankModel, out_dir: str | Path) -> Path:
    """Write out_dir/rerank.onnx (see the module docstring for the contract); returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    was_training = model.training
    model.eval()
    L = cfg.max_len
    example = (
        torch.randn(2, L, cfg.item_dim),
        torch.zeros(2, L, pv_width(model)),
        torch.randn(*score_shape(model, 2, L)),
        torch.ones(2, L, dtype=torch.bool),
    )
    batch = torch.export.Dim("batch", min=1, max=65536)
    length = torch.export.Dim("list_len", min=1, max=L)
    dyn = {name: {0: batch, 1: length} for name in INPUT_NAMES}
    path = out / RERANK_ONNX
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            _RerankGraph(model),
            example,
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_shapes=dyn,
            dynamo=True,
            verbose=False,
        )
    assert program is not None
    program.save(str(path))
    model.train(was_training)
    return path


def random_lists(model: RerankModel, B: int, L: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random ONNX feeds of shape (B, L): right-padded lists of random real length 1..L."""
    cfg = model.config
    lengths = rng.integers(1, L + 1, size=B)
    mask = np.arange(L)[None, :] < lengths[:, None]
    return {
        "item_feats": rng.standard_normal((B, L, cfg.item_dim)).astype(np.float32),
        "pv": rng.standard_normal((B, L, pv_width(model))).astype(np.float32),
        "init_score": rng.standard_normal(score_shape(model, B, L)).astype(np.float32),
        "mask": mask,
    }


def rerank_parity(
    model: RerankModel,
    onnx_path: str | Path,
    shapes: tuple[tuple[int, int], ...] = ((1, 1), (1, 0), (3, 7), (8, 0)),
    seed: int = 0,
) -> float:
    """Max |ONNX - eager| over real entries of random padded lists; (B, L), L = 0 meaning max_len.

    Raises AssertionError when a real entry is outside PARITY_ATOL / PARITY_RTOL or a
    padding entry is not PAD_LOGIT.
    """
    rng = np.random.default_rng(seed)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    model.eval()
    worst = 0.0
    for B, L in shapes:
        feeds = random_lists(model, B, L or model.config.max_len, rng)
        got = sess.run([OUTPUT_NAME], feeds)[0]
        with torch.no_grad():
            want = model(*(torch.from_numpy(feeds[n]) for n in INPUT_NAMES)).numpy()
        assert got.shape == want.shape == feeds["mask"].shape, (got.shape, want.shape)
        real = feeds["mask"]
        np.testing.assert_allclose(got[real], want[real], atol=PARITY_ATOL, rtol=PARITY_RTOL)
        np.testing.assert_array_equal(got[~real], np.float32(PAD_LOGIT))
        np.testing.assert_array_equal(want[~real], np.float32(PAD_LOGIT))
        worst = max(worst, float(np.abs(got[real] - want[real]).max()))
    return worst


def list_parity(model: RerankModel, onnx_path: str | Path, data: ListData, n: int = 256) -> float:
    """Max |ONNX - eager| over the real entries of the first n lists of `data` (real features, as
    served); AssertionError outside PARITY_ATOL / PARITY_RTOL, as rerank_parity."""
    part = data.take(slice(0, n))
    pv = part.pv if model.config.pv_dim else np.zeros((*part.mask.shape, pv_width(model)), np.float32)
    feeds = {"item_feats": part.item_feats, "pv": pv, "init_score": part.scores(), "mask": part.mask}
    got = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run([OUTPUT_NAME], feeds)[0]
    model.eval()
    with torch.no_grad():
        want = model(*part.tensors()).numpy()
    np.testing.assert_allclose(got[part.mask], want[part.mask], atol=PARITY_ATOL, rtol=PARITY_RTOL)
    return float(np.abs(got[part.mask] - want[part.mask]).max())
