"""The eager end-to-end table (training/stages/rerank/end_to_end.py): the re-ranker only reorders
the pre-rank top N. Its agreement with the served evaluation: tests/training/eval/test_served_eval.py."""

from __future__ import annotations

import torch
from torch import nn

from service.contract.rerank_inputs import PVStats
from tests.training.stages.rerank.test_upstream import one_thread, tiny  # noqa: F401  (fixtures)
from training.stages.rerank.end_to_end import end_to_end
from training.stages.rerank.sampling import ImpressionConfig


class ByPosition(nn.Module):
    """Scores each entry by its position: sign -1 keeps the given (pre-rank) order, +1 reverses it."""

    def __init__(self, sign: float) -> None:
        super().__init__()
        self.sign = sign

    def forward(self, item_feats: torch.Tensor, pv: torch.Tensor, init: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L = item_feats.shape[:2]
        return self.sign * torch.arange(L, dtype=torch.float32).expand(B, L)  # (B, L)


def test_reordering_the_top_n_changes_only_the_order(tiny) -> None:  # noqa: F811
    pipe, loo, _, _ = tiny
    P = pipe.prerank.cfg.heads * len(pipe.prerank.cfg.hidden)
    cfg = ImpressionConfig(list_len=10, candidates=30)
    out = end_to_end(pipe, loo, {"keep": ByPosition(-1.0), "reverse": ByPosition(1.0)},  # type: ignore[dict-item]
                     PVStats((0.0,) * P, (1.0,) * P), cfg, ks=(1, 10, 30))
    assert set(out) == {"prerank", "rerank_keep", "rerank_reverse"}
    assert out["rerank_keep"] == out["prerank"]  # the given order, kept: the same table
    for name in ("prerank", "rerank_reverse"):  # the same top N and top C, whatever their order
        assert out[name]["HR@10"] == out["prerank"]["HR@10"] and out[name]["HR@30"] == out["prerank"]["HR@30"]
        assert out[name]["users"] == loo.eval_users.size and out[name]["Recall@30"] == out[name]["HR@30"]
