import pytest
import torch

from models.sasrec import MultiLauncherSASRec, SASRecConfig


def make(M: int, init: str = "copy_last", **kw: object) -> MultiLauncherSASRec:
    torch.manual_seed(0)
    cfg = SASRecConfig(num_items=40, maxlen=8, dim=16, num_heads=2, dropout=0.0, num_launchers=M,
                       launcher_init=init, **kw)  # type: ignore[arg-type]
    return MultiLauncherSASRec(cfg).eval()


@pytest.mark.parametrize("M", [0, 1, 3])
def test_shapes_and_train_serve_agreement(M: int) -> None:
    model = make(M)
    seq = torch.randint(1, 41, (5, 8))
    seq[0, :5] = 0
    out = model(seq)
    assert out.shape == (5, 8, max(M, 1), 16)
    user = model.encode_user(seq)
    assert user.shape == (5, max(M, 1), 16)
    # the training view at the last position is exactly the serving view
    torch.testing.assert_close(out[:, -1], user, rtol=1e-5, atol=1e-5)
    assert model.item_embeddings().shape == (40, 16)


@pytest.mark.parametrize("M", [0, 2])
def test_extra_left_padding_changes_nothing(M: int) -> None:
    model = make(M)
    seq = torch.randint(1, 41, (3, 5))
    padded = torch.cat([torch.zeros(3, 3, dtype=torch.long), seq], dim=1)
    torch.testing.assert_close(model.encode_user(seq), model.encode_user(padded), rtol=1e-5, atol=1e-5)


def test_causality_launchers_at_t_ignore_later_items() -> None:
    model = make(2)
    seq = torch.randint(1, 41, (2, 8))
    changed = seq.clone()
    changed[:, 5:] = torch.randint(1, 41, (2, 3))
    a, b = model(seq), model(changed)
    torch.testing.assert_close(a[:, :5], b[:, :5])  # positions 0..4 cannot see items 5..7
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_launchers_differ_and_copy_last_uses_last_item() -> None:
    model = make(3, "copy_last")
    seq = torch.randint(1, 41, (2, 6))
    u = model.encode_user(seq)
    assert not torch.allclose(u[:, 0], u[:, 1])
    indep = make(3, "independent")
    indep.load_state_dict(model.state_dict())
    # same weights, only the launcher init differs -> different user vectors
    assert not torch.allclose(indep.encode_user(seq), u)


def test_longer_than_maxlen_keeps_the_tail() -> None:
    model = make(1)
    seq = torch.randint(1, 41, (2, 12))
    torch.testing.assert_close(model.encode_user(seq), model.encode_user(seq[:, -8:]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_items": 0}, "num_items must be >= 1"),
        ({"num_items": 5, "dim": 10, "num_heads": 3}, "multiple of num_heads"),
        ({"num_items": 5, "dropout": 1.0}, "dropout must be in"),
        ({"num_items": 5, "num_launchers": -1}, "num_launchers must be >= 0"),
        ({"num_items": 5, "launcher_init": "random"}, "launcher_init must be"),
    ],
)
def test_bad_config_names_the_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SASRecConfig(**kwargs)
