import pytest
import torch

from models.prm import PAD_LOGIT, PRM, PointwiseMLP, PointwiseMLPConfig, PRMConfig, RerankModel, build_reranker

F, P, L = 5, 3, 8


def make(kind: str, **kw: object) -> RerankModel:
    torch.manual_seed(0)
    if kind == "mlp":
        return PointwiseMLP(PointwiseMLPConfig(F, P, hidden=(16, 8), dropout=0.0, max_len=L, **kw)).eval()  # type: ignore[arg-type]
    pv = 0 if kind == "base" else P
    return PRM(PRMConfig(F, pv, d_model=16, heads=2, layers=2, ffn_dim=32, dropout=0.0, max_len=L, **kw)).eval()  # type: ignore[arg-type]


def inputs(B: int, n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, n, F, generator=g), torch.randn(B, n, P, generator=g), torch.randn(B, n, generator=g),
            torch.ones(B, n, dtype=torch.bool))


def pad(x: tuple[torch.Tensor, ...], extra: int) -> tuple[torch.Tensor, ...]:
    """Append `extra` padding entries (random features, mask False) to every list."""
    feats, pv, score, mask = x
    B = feats.shape[0]
    return (torch.cat([feats, torch.randn(B, extra, F)], 1), torch.cat([pv, torch.randn(B, extra, P)], 1),
            torch.cat([score, torch.randn(B, extra)], 1), torch.cat([mask, torch.zeros(B, extra, dtype=torch.bool)], 1))


@pytest.mark.parametrize("kind", ["prm", "base", "mlp"])
def test_shapes_and_padding_logits(kind: str) -> None:
    model = make(kind)
    x = inputs(4, L)
    x[3][1, 5:] = False
    out = model(*x)
    assert out.shape == (4, L) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert (out[1, 5:] == PAD_LOGIT).all()
    assert (out[1, :5] > PAD_LOGIT / 2).all()


@pytest.mark.parametrize("kind", ["prm", "base", "mlp"])
def test_appending_padding_changes_no_real_score(kind: str) -> None:
    model = make(kind)
    x = inputs(3, 5)
    with torch.no_grad():
        short = model(*x)
        long = model(*pad(x, 3))
    torch.testing.assert_close(long[:, :5], short, rtol=1e-5, atol=1e-5)
    # the same holds in training mode (the slow, non-fused attention path), dropout being 0
    model.train()
    torch.testing.assert_close(model(*pad(x, 3))[:, :5], model(*x), rtol=1e-5, atol=1e-5)


def test_padding_features_are_ignored_and_empty_list_is_finite() -> None:
    model = make("prm")
    a = pad(inputs(2, 4), 4)
    b = (a[0].clone(), a[1].clone(), a[2].clone(), a[3])
    b[0][:, 4:] += 100.0
    b[2][:, 4:] -= 50.0
    torch.testing.assert_close(model(*a), model(*b))
    empty = (a[0], a[1], a[2], torch.zeros_like(a[3]))
    model.train()
    out = model(*empty)  # no real entry: every key would be masked; must not produce NaN
    assert (out == PAD_LOGIT).all()
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_pointwise_mlp_is_permutation_equivariant() -> None:
    model = make("mlp")
    x = inputs(2, L)
    perm = torch.randperm(L, generator=torch.Generator().manual_seed(1))
    permuted = tuple(t[:, perm] for t in x)
    torch.testing.assert_close(model(*permuted), model(*x)[:, perm])


def test_prm_with_position_is_not_permutation_equivariant_without_it_is() -> None:
    x = inputs(2, L)
    perm = torch.randperm(L, generator=torch.Generator().manual_seed(1))
    permuted = tuple(t[:, perm] for t in x)
    with torch.no_grad():
        model = make("prm")
        assert not torch.allclose(model(*permuted), model(*x)[:, perm], atol=1e-3)
        no_pos = make("prm", use_position=False)
        torch.testing.assert_close(no_pos(*permuted), no_pos(*x)[:, perm], rtol=1e-5, atol=1e-5)


def test_prm_reads_the_list_and_base_ignores_pv() -> None:
    x = inputs(1, L)
    changed = (x[0].clone(), x[1], x[2], x[3])
    changed[0][0, -1] += 1.0  # change one candidate only
    with torch.no_grad():
        prm, mlp = make("prm"), make("mlp")
        assert not torch.allclose(prm(*changed)[0, :-1], prm(*x)[0, :-1])  # others' scores move
        torch.testing.assert_close(mlp(*changed)[0, :-1], mlp(*x)[0, :-1])  # pointwise: they do not
        base = make("base")
        torch.testing.assert_close(base(x[0], torch.randn(1, L, 7), x[2], x[3]), base(*x))
        torch.testing.assert_close(base(x[0], torch.zeros(1, L, 1), x[2], x[3]), base(*x))
        assert not torch.allclose(prm(x[0], torch.randn(1, L, P), x[2], x[3]), prm(*x))


def test_longer_than_max_len_raises() -> None:
    with pytest.raises(ValueError, match="list length 9 exceeds max_len 8"):
        make("prm")(*inputs(1, L + 1))


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"item_dim": 0}, "item_dim must be >= 1, got 0"),
        ({"pv_dim": -1}, "pv_dim must be >= 0 (0 = no personalised vector), got -1"),
        ({"d_model": 30, "heads": 4}, "d_model (30) must be a positive multiple of heads (4)"),
        ({"heads": 0}, "d_model (64) must be a positive multiple of heads (0)"),
        ({"layers": 0}, "layers must be >= 1, got 0"),
        ({"ffn_dim": 0}, "ffn_dim must be >= 1, got 0"),
        ({"dropout": 1.0}, "dropout must be in [0, 1), got 1.0"),
        ({"max_len": 0}, "max_len must be >= 1, got 0"),
    ],
)
def test_bad_prm_config_raises(kw: dict, message: str) -> None:
    args = {"item_dim": 4, **kw}
    with pytest.raises(ValueError) as err:
        PRMConfig(**args)
    assert str(err.value) == message


def test_bad_mlp_config_raises() -> None:
    with pytest.raises(ValueError, match=r"hidden must be a non-empty tuple of positive ints, got \(8, 0\)"):
        PointwiseMLPConfig(4, hidden=(8, 0))
    with pytest.raises(ValueError, match="item_dim must be >= 1, got -2"):
        PointwiseMLPConfig(-2)


def test_build_reranker_and_seeded_init_is_deterministic() -> None:
    cfg = PRMConfig(F, P, d_model=16, ffn_dim=32, max_len=L)
    assert isinstance(build_reranker(cfg), PRM)
    assert isinstance(build_reranker(PointwiseMLPConfig(F, P)), PointwiseMLP)
    torch.manual_seed(3)
    a = build_reranker(cfg)
    torch.manual_seed(3)
    b = build_reranker(cfg)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, msg=name)
    assert cfg.input_dim == F + P + 1 and cfg.to_dict()["pv_dim"] == P
