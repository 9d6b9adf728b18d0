"""Pre-ranking modules: shapes, the IntTower score by hand, LightSE, bad configs."""

from __future__ import annotations

import math

import pytest
import torch

from models.dcnv2 import DCNv2, DCNv2Config
from models.inttower import IntTower, IntTowerConfig
from models.layers import FieldEmbedding, Fields, FieldsConfig, LightSE, late_interaction_score, masked_mean
from models.two_tower import TwoTower, TwoTowerConfig

USER = FieldsConfig(sparse_vocab=(10, 5), multi_vocab=(12,), multi_width=(4,), num_dense=2)
ITEM = FieldsConfig(sparse_vocab=(12,), multi_vocab=(7,), multi_width=(3,), num_dense=1)


def fields(cfg: FieldsConfig, n: int, seed: int = 0) -> Fields:
    g = torch.Generator().manual_seed(seed)
    sparse = torch.stack([torch.randint(0, v, (n,), generator=g) for v in cfg.sparse_vocab], dim=1)
    multi = torch.cat([torch.randint(0, v, (n, w), generator=g) for v, w in zip(cfg.multi_vocab, cfg.multi_width)], 1)
    return Fields(sparse, torch.randn(n, cfg.num_dense, generator=g), multi)


def test_inttower_shapes_and_forward_equals_head_score() -> None:
    torch.manual_seed(0)
    model = IntTower(IntTowerConfig(USER, ITEM, embed_dim=8, hidden=(16, 12, 8), heads=3, head_dim=5)).eval()
    u, i = fields(USER, 6, 1), fields(ITEM, 6, 2)
    with torch.no_grad():
        uh, ih = model.user_heads(u), model.item_heads(i)
    assert uh.shape == (6, 3, 3, 5)  # (B, L, H, d): one set of heads per hidden layer
    assert ih.shape == (6, 3, 5)  # (N, H, d): last item layer only
    with torch.no_grad():
        logits = model(u, i)
    assert logits.shape == (6,)
    # eq.: sum over layers and user heads of max over item heads, written as loops
    expected = torch.zeros(6)
    for b in range(6):
        for layer in range(3):
            for h in range(3):
                expected[b] += max(float(uh[b, layer, h] @ ih[b, g]) for g in range(3))
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    # broadcasting: every user against every item == aligned forward on the diagonal
    grid = model.score(uh[:, None], ih[None, :])  # (B, N)
    torch.testing.assert_close(torch.diagonal(grid), logits)


def test_late_interaction_hand_case() -> None:
    uh = torch.tensor([[[[1.0, 0.0], [0.0, 2.0]]]])  # (1, L=1, H=2, d=2)
    ih = torch.tensor([[[3.0, 1.0], [-1.0, 4.0]]])  # (1, G=2, d=2)
    # head 1: max(3, -1) = 3; head 2: max(2, 8) = 8
    assert late_interaction_score(uh, ih).item() == pytest.approx(11.0)


def test_two_tower_dot_and_heads_layout() -> None:
    torch.manual_seed(0)
    model = TwoTower(TwoTowerConfig(USER, ITEM, embed_dim=8, hidden=(16, 8), out_dim=6)).eval()
    u, i = fields(USER, 4, 3), fields(ITEM, 4, 4)
    uh, ih = model.user_heads(u), model.item_heads(i)
    assert uh.shape == (4, 1, 1, 6) and ih.shape == (4, 1, 6)
    torch.testing.assert_close(model(u, i), late_interaction_score(uh, ih), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(u, i), model.score(uh, ih))


def test_dcnv2_shape_and_depends_on_both_sides() -> None:
    torch.manual_seed(0)
    model = DCNv2(DCNv2Config(USER, ITEM, embed_dim=8, cross_layers=2, hidden=(16,))).eval()
    u, i = fields(USER, 5, 5), fields(ITEM, 5, 6)
    out = model(u, i)
    assert out.shape == (5,)
    assert not torch.allclose(out, model(u, fields(ITEM, 5, 7)))


def test_lightse_uniform_weights_and_ablation() -> None:
    se = LightSE(4)
    with torch.no_grad():
        se.excitation.weight.zero_()
        se.excitation.bias.zero_()
    e = torch.randn(3, 4, 5)
    torch.testing.assert_close(se(e), e * (1 + 1 / 4))  # softmax of zeros = 1/F per field
    cfg = IntTowerConfig(USER, ITEM, lightse=False)
    assert not any("_se" in name for name, _ in IntTower(cfg).named_parameters())
    assert any("_se" in name for name, _ in IntTower(IntTowerConfig(USER, ITEM)).named_parameters())


def test_field_embedding_masks_padding_in_multi() -> None:
    cfg = FieldsConfig(sparse_vocab=(3,), multi_vocab=(5,), multi_width=(3,), num_dense=1)
    emb = FieldEmbedding(cfg, 4)
    f = Fields(torch.tensor([[2]]), torch.tensor([[0.5]]), torch.tensor([[3, 0, 4]]))
    out = emb(f)
    assert out.shape == (1, 3, 4)  # (B, F, D): sparse, multi, dense
    torch.testing.assert_close(out[0, 1], (emb.multi[0].weight[3] + emb.multi[0].weight[4]) / 2)
    torch.testing.assert_close(out[0, 2], 0.5 * emb.dense_w[0] + emb.dense_b[0])
    empty = masked_mean(torch.ones(1, 2, 4), torch.zeros(1, 2, dtype=torch.bool))
    assert torch.equal(empty, torch.zeros(1, 4))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: IntTowerConfig(USER, ITEM, heads=0), "heads must be >= 1, got 0"),
        (lambda: IntTowerConfig(USER, ITEM, head_dim=-2), "head_dim must be >= 1, got -2"),
        (lambda: IntTowerConfig(USER, ITEM, hidden=()), r"hidden must be a non-empty tuple .*got \(\)"),
        (lambda: TwoTowerConfig(USER, ITEM, dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
        (lambda: TwoTowerConfig(USER, ITEM, out_dim=0), "out_dim must be >= 1, got 0"),
        (lambda: DCNv2Config(USER, ITEM, cross_layers=-1), "cross_layers must be >= 0, got -1"),
        (lambda: FieldsConfig(sparse_vocab=(1,)), r"sparse_vocab sizes must be >= 2 \(padding \+ OOV\), got 1"),
        (lambda: FieldsConfig(multi_vocab=(5,), multi_width=()), "multi_width has 0 entries but multi_vocab has 1"),
        (lambda: FieldsConfig(), "a tower needs at least one field"),
    ],
)
def test_bad_config_raises_value_error_naming_the_value(make, message: str) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=message):
        make()


def test_config_round_trip() -> None:
    for cfg in (IntTowerConfig(USER, ITEM, heads=2, lightse=False), TwoTowerConfig(USER, ITEM), DCNv2Config(USER, ITEM)):
        assert type(cfg).from_dict(cfg.to_dict()) == cfg
    assert math.isclose(IntTowerConfig(USER, ITEM).dropout, 0.2)
