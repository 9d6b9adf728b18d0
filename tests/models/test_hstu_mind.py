"""HSTU and MIND: shapes, causality, padding, config errors, and ONNX Runtime parity."""

from pathlib import Path

import numpy as np
import pytest
import torch

from models.hstu import HSTU, HSTUConfig
from models.mind import MIND, MINDConfig, squash
from training.publish.onnx.retrieval import export_retrieval, retrieval_parity


def make(kind: str, **kw: object) -> HSTU | MIND:
    torch.manual_seed(0)
    if kind == "hstu":
        return HSTU(HSTUConfig(num_items=40, maxlen=8, dim=16, num_heads=2, head_dim=8, dropout=0.0, **kw)).eval()  # type: ignore[arg-type]
    return MIND(MINDConfig(num_items=40, maxlen=8, dim=16, num_interests=3, dropout=0.0, **kw)).eval()  # type: ignore[arg-type]


@pytest.mark.parametrize("kind, M", [("hstu", 1), ("mind", 3)])
def test_shapes_and_train_serve_agreement(kind: str, M: int) -> None:
    model = make(kind)
    seq = torch.randint(1, 41, (5, 8))
    seq[0, :5] = 0
    out = model(seq)
    assert out.shape == (5, 8, M, 16)
    user = model.encode_user(seq)
    assert user.shape == (5, M, 16)
    assert model.config.num_launchers == M
    torch.testing.assert_close(out[:, -1], user, rtol=1e-5, atol=1e-5)
    assert model.item_embeddings().shape == (40, 16)


@pytest.mark.parametrize("kind", ["hstu", "mind"])
def test_extra_left_padding_and_long_histories(kind: str) -> None:
    model = make(kind)
    seq = torch.randint(1, 41, (3, 5))
    padded = torch.cat([torch.zeros(3, 3, dtype=torch.long), seq], dim=1)
    torch.testing.assert_close(model.encode_user(seq), model.encode_user(padded), rtol=1e-5, atol=1e-5)
    long = torch.randint(1, 41, (2, 12))
    torch.testing.assert_close(model.encode_user(long), model.encode_user(long[:, -8:]))


@pytest.mark.parametrize("kind", ["hstu", "mind"])
def test_causal_positions_ignore_later_items(kind: str) -> None:
    model = make(kind)
    seq = torch.randint(1, 41, (2, 8))
    changed = seq.clone()
    changed[:, 5:] = torch.randint(1, 41, (2, 3))
    a, b = model(seq), model(changed)
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_hstu_attention_is_pointwise_not_softmax() -> None:
    # softmax attention over identical items gives the same output whatever their number;
    # pointwise SiLU attention sums the contributions, so repeating the item changes the state
    model = make("hstu", abs_positions=False)
    with torch.no_grad():
        model.blocks[0].rab.zero_()
    one = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 7]])
    many = torch.tensor([[0, 0, 0, 0, 7, 7, 7, 7]])
    assert not torch.allclose(model.encode_user(one), model.encode_user(many), atol=1e-4)


def test_hstu_relative_position_bias_is_used() -> None:
    model = make("hstu")
    seq = torch.randint(1, 41, (2, 8))
    before = model.encode_user(seq)
    with torch.no_grad():
        model.blocks[0].rab[:, 3].add_(2.0)  # distance 3 only
    assert not torch.allclose(before, model.encode_user(seq), atol=1e-5)


def test_squash_keeps_direction_and_bounds_norm() -> None:
    z = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.3, 0.4]])
    s = squash(z)
    norms = s.norm(dim=-1)
    assert norms[0].item() == pytest.approx(25 / 26, rel=1e-5)  # |z|^2 / (1 + |z|^2), |z| = 5
    assert norms[1].item() == pytest.approx(0.0, abs=1e-6)
    assert norms[2].item() == pytest.approx(0.25 / 1.25, rel=1e-4)
    torch.testing.assert_close(s[0] / norms[0], z[0] / 5)


def test_mind_interests_differ_and_routing_init_is_saved() -> None:
    model = make("mind")
    seq = torch.randint(1, 41, (2, 8))
    u = model.encode_user(seq)
    assert not torch.allclose(u[:, 0], u[:, 1], atol=1e-4)
    assert "routing_init" in model.state_dict()
    other = MIND(MINDConfig(num_items=40, maxlen=8, dim=16, num_interests=3, dropout=0.0, init_seed=1)).eval()
    other.load_state_dict(model.state_dict())  # the buffer travels with the weights
    torch.testing.assert_close(other.encode_user(seq), u)


@pytest.mark.parametrize(
    "cls, kwargs, message",
    [
        (HSTUConfig, {"num_items": 0}, "num_items must be >= 1"),
        (HSTUConfig, {"num_items": 5, "head_dim": 0}, "head_dim"),
        (HSTUConfig, {"num_items": 5, "dropout": 1.0}, "dropout must be in"),
        (MINDConfig, {"num_items": 5, "num_interests": 0}, "num_interests must be >= 1, got 0"),
        (MINDConfig, {"num_items": 5, "routing_iters": 0}, "routing_iters must be >= 1, got 0"),
        (MINDConfig, {"num_items": 5, "label_power": -1.0}, "label_power must be >= 0"),
    ],
)
def test_bad_config_names_the_value(cls: type, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


@pytest.mark.parametrize("kind", ["hstu", "mind"])
def test_onnx_parity(kind: str, tmp_path: Path) -> None:
    """ONNX Runtime vs eager within training.publish.onnx.retrieval's PARITY_ATOL/RTOL (retrieval_parity raises)."""
    model = make(kind)
    with torch.no_grad():  # away from the init so a wrong graph cannot hide behind near-zero outputs
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    onnx_path, items_path = export_retrieval(model, tmp_path)
    worst = retrieval_parity(model, onnx_path, batches=((1, 1), (1, 0), (4, 5), (7, 0)))
    assert worst < 1e-4
    np.testing.assert_array_equal(np.load(items_path), model.item_embeddings().detach().numpy())
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"item_seq": np.array([[0, 0, 3, 9]], dtype=np.int64)})[0]
    assert out.shape == (1, model.config.num_launchers, 16)
