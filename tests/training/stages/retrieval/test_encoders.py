"""Encoder choice in the retrieval trainer, sampled softmax with logQ correction, MIND's loss."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.hstu import HSTU, HSTUConfig
from models.mind import MIND, MINDConfig
from models.sasrec import MultiLauncherSASRec, SASRecConfig
from training.data.sources import load
from training.data.splits import LeaveOneOut
from training.checkpoints import REGISTRY, load_retrieval
from training.stages.retrieval.encoders import build_model, encoder_of
from training.publish.onnx.retrieval import export_retrieval, retrieval_parity
from training.eval.metrics import evaluate_retrieval
from training.eval.baselines import Popularity
from training.publish.item_side import extend_retrieval
from training.stages.retrieval.losses import NegativeSampler, label_aware_loss, max_fusion_loss
from training.stages.retrieval.train import (
    RetrievalTrainConfig,
    evaluate_model,
    save_checkpoint,
    train_retrieval,
)


def test_logq_correction_hand_computed() -> None:
    # 1 launcher, D = 1, 4 items; negatives 2 (drawn twice) and 3 (once) out of K = 3 draws
    items = torch.tensor([[0.0], [1.0], [2.0], [-1.0], [0.5]])
    user = torch.tensor([[[1.0]]])
    target = torch.tensor([1])
    q = torch.tensor([0.5, 0.25])  # per-draw probabilities of items 2 and 3
    c = torch.tensor([2.0, 1.0])
    negatives = torch.tensor([2, 3])
    log_q = torch.log(3 * q / c)
    loss, _ = max_fusion_loss(user, items, target, negatives, log_q)
    # by hand: positive s = 1; negatives 2 - log(3 * 0.5 / 2) and -1 - log(3 * 0.25 / 1)
    s = [1.0, 2.0 - math.log(0.75), -1.0 - math.log(0.75)]
    expected = -s[0] + math.log(sum(math.exp(v) for v in s))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    uncorrected, _ = max_fusion_loss(user, items, target, negatives)
    assert uncorrected.item() != pytest.approx(loss.item(), rel=1e-3)  # the correction is applied


def test_logq_sampled_loss_estimates_the_full_softmax() -> None:
    # sum over draws of exp(s) / (K q) is unbiased for the catalog's sum: the mean sampled loss
    # with logQ approaches the full loss from below (Jensen), far closer than without it
    torch.manual_seed(0)
    n, d = 200, 8
    items = torch.cat([torch.zeros(1, d), torch.randn(n, d)])
    user = torch.randn(16, 1, d)
    target = torch.randint(1, n + 1, (16,))
    full, _ = max_fusion_loss(user, items, target)
    counts = np.r_[0, np.random.default_rng(0).integers(1, 50, n)]
    sampler = NegativeSampler("popularity", counts, num_negatives=400)
    plain = NegativeSampler("popularity", counts, num_negatives=400, logq=False)
    rng = np.random.default_rng(1)
    with_q = np.mean([max_fusion_loss(user, items, target, *sampler.draw(rng))[0].item() for _ in range(30)])
    without = np.mean([max_fusion_loss(user, items, target, *plain.draw(rng))[0].item() for _ in range(30)])
    assert abs(with_q - full.item()) < 0.15 * full.item()
    assert abs(with_q - full.item()) < abs(without - full.item())


def test_samplers_draw_and_correct() -> None:
    counts = np.array([0, 10, 0, 30, 60])
    rng = np.random.default_rng(0)
    pop = NegativeSampler("popularity", counts, num_negatives=5000)
    ids, log_q = pop.draw(rng)
    assert 2 not in ids.tolist() and 0 not in ids.tolist()  # never a padding or a zero-count item
    assert log_q is not None
    # log(K q / c) is near 0 when each item is drawn about K q times
    assert np.abs(log_q.numpy()).max() < 0.2
    uni = NegativeSampler("uniform", counts, num_negatives=8)
    np.testing.assert_allclose(uni.q[1:], 0.25)
    inb = NegativeSampler("in-batch", counts, num_negatives=0)
    ids, log_q = inb.draw(rng, np.array([[0, 3, 3], [4, 1, 3]]))
    assert ids.tolist() == [1, 3, 4]
    # K = 5 targets, q = popularity (the batch's targets are draws from it), c = 1, 3, 1
    np.testing.assert_allclose(log_q.numpy(), np.log(5 * np.array([0.1, 0.3, 0.6]) / [1, 3, 1]), rtol=1e-6)
    with pytest.raises(ValueError, match="sampler must be one of"):
        NegativeSampler("zipf", counts, 5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_negatives must be 0 with sampler 'in-batch'"):
        RetrievalTrainConfig(num_negatives=5, sampler="in-batch")


def test_label_aware_loss_hand_computed() -> None:
    items = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    user = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])  # K = 2 interests
    target = torch.tensor([1])
    loss, best = label_aware_loss(user, items, target, power=1.0)
    a = torch.softmax(torch.tensor([2.0, 0.0]), 0)  # <u_k, e_1> = 2, 0
    v = a[0] * user[0, 0] + a[1] * user[0, 1]
    logits = items[1:] @ v
    assert loss.item() == pytest.approx(F.cross_entropy(logits[None], torch.tensor([0])).item(), rel=1e-6)
    assert best.tolist() == [0]
    # power 0 averages the interests
    loss0, _ = label_aware_loss(user, items, target, power=0.0)
    v0 = user[0].mean(0)
    assert loss0.item() == pytest.approx(F.cross_entropy((items[1:] @ v0)[None], torch.tensor([0])).item(), rel=1e-6)
    # sampled path with logQ: negatives 2 and 3, no accidental hit
    lq = torch.tensor([0.5, -0.5])
    ls, _ = label_aware_loss(user, items, target, 1.0, torch.tensor([2, 3]), lq)
    s = torch.stack([items[1] @ v, items[2] @ v - 0.5, items[3] @ v + 0.5])
    assert ls.item() == pytest.approx((torch.logsumexp(s, 0) - s[0]).item(), rel=1e-6)


def test_registry_builds_each_encoder() -> None:
    cfgs = [SASRecConfig(num_items=9), HSTUConfig(num_items=9), MINDConfig(num_items=9, num_interests=2)]
    for cfg, cls, name in zip(cfgs, (MultiLauncherSASRec, HSTU, MIND), ("sasrec", "hstu", "mind")):
        model = build_model(cfg)
        assert isinstance(model, cls) and encoder_of(model) == name == encoder_of(cfg)
        kind = REGISTRY[f"retrieval/{name}"]  # what a checkpoint of this encoder records
        again = kind.build(kind.config_from_dict(cfg.to_dict()))
        assert type(again) is cls and again.config == cfg


@pytest.fixture(scope="module")
def split() -> LeaveOneOut:
    return LeaveOneOut(load("synthetic:users=800,items=300,seed=5"))


@pytest.mark.parametrize(
    "cfg_fn, train",
    [
        (lambda n: HSTUConfig(num_items=n, maxlen=20, dim=32, num_heads=2, head_dim=16, dropout=0.2), {}),
        (lambda n: MINDConfig(num_items=n, maxlen=20, dim=32, num_interests=2, dropout=0.2), {}),
        (lambda n: HSTUConfig(num_items=n, maxlen=20, dim=32, num_heads=2, head_dim=16, dropout=0.2),
         {"num_negatives": 100, "sampler": "popularity"}),
        (lambda n: MINDConfig(num_items=n, maxlen=20, dim=32, num_interests=2, dropout=0.2), {"sampler": "in-batch"}),
    ],
    ids=["hstu-full", "mind-full", "hstu-popularity", "mind-in-batch"],
)
def test_encoders_train_beat_popularity_and_round_trip(split, cfg_fn, train, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg = cfg_fn(split.num_items)
    res = train_retrieval(
        split, cfg, RetrievalTrainConfig(epochs=10, batch_size=64, lr=3e-3, patience=4, **train), progress=False
    )
    metrics = evaluate_model(res.model, split)
    pop = evaluate_retrieval(Popularity(split), split, progress=False)
    assert metrics["NDCG@10"] > 1.5 * pop["NDCG@10"], (metrics["NDCG@10"], pop["NDCG@10"])
    save_checkpoint(tmp_path, res.model, split.dataset, "synthetic", {})
    model, ckpt = load_retrieval(tmp_path, split.dataset)
    assert ckpt.name == encoder_of(cfg) and type(model) is type(res.model) and model.config == cfg
    seq = torch.from_numpy(split.histories("test", maxlen=20)[:8])
    torch.testing.assert_close(model.encode_user(seq), res.model.encode_user(seq))
    # reindex grows the catalog of any encoder, keeping the trained rows
    table = np.concatenate([model.item_embedding.weight.detach().numpy(), np.ones((3, 32), np.float32)])
    grown = extend_retrieval(model, table)
    assert type(grown) is type(model) and grown.config.num_items == split.num_items + 3
    torch.testing.assert_close(grown.encode_user(seq), model.encode_user(seq))


def test_cli_encoder_and_sampler(tmp_path: Path) -> None:
    out, js = tmp_path / "ckpt", tmp_path / "m.json"
    proc = subprocess.run(
        [sys.executable, "-m", "recsys_cli", "train", "retrieval", "--data", "synthetic:users=200,items=80",
         "--encoder", "mind", "--interests", "2", "--num-negatives", "20", "--sampler", "popularity",
         "--epochs", "2", "--maxlen", "10", "--dim", "16", "--out", str(out), "--json", str(js), "--threads", "1",
         "--quiet"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(js.read_text())
    assert payload["model"] == "mind(K=2)" and payload["model_config"]["num_interests"] == 2
    assert payload["train_config"]["sampler"] == "popularity" and payload["train_config"]["logq"] is True
    model, ckpt = load_retrieval(out, load("synthetic:users=200,items=80"))
    assert isinstance(model, MIND) and ckpt.kind.key == "retrieval/mind"
    assert retrieval_parity(model, export_retrieval(model, tmp_path / "onnx")[0]) < 1e-4
    bad = subprocess.run(
        [sys.executable, "-m", "recsys_cli", "train", "retrieval", "--data", "synthetic:users=50,items=20",
         "--encoder", "mind", "--interests", "0", "--out", str(out)],
        capture_output=True, text=True,
    )
    assert bad.returncode == 2 and "num_interests must be >= 1, got 0" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("encoder", ["hstu", "mind", "sasrec-plain"])
def test_publish_and_serve_any_encoder(encoder: str, tmp_path: Path) -> None:
    """A version with an HSTU, MIND or plain (launchers 0) SASRec retriever publishes, loads and
    answers through the unchanged service path (ONNX user vectors (1, M, D), FAISS, max-fusion,
    pre-rank); plain SASRec serves one user vector, so its manifest says M = 1."""
    import logging

    from service.artifacts import load_current, smoke_run
    from tests.training.publish.test_build import BELOW_OK, TINY, make_checkpoints
    from training.publish.publisher import publish

    torch.set_num_threads(1)
    logging.getLogger("torch.onnx").setLevel(logging.WARNING)
    ret, pre, _ = make_checkpoints(TINY, tmp_path / "ckpt")
    ds = load(TINY)
    torch.manual_seed(0)
    cfg = {"hstu": HSTUConfig(num_items=ds.num_items, maxlen=20, dim=16, num_blocks=1, head_dim=8),
           "mind": MINDConfig(num_items=ds.num_items, maxlen=20, dim=16, num_interests=3),
           "sasrec-plain": SASRecConfig(num_items=ds.num_items, maxlen=20, dim=16, num_blocks=1, num_launchers=0),
           }[encoder]
    save_checkpoint(ret, build_model(cfg), ds, TINY, {"metrics": {"NDCG@10": 0.05}})
    publish(TINY, ret, pre, None, tmp_path / "artifacts", version="v1", max_regression=None, gate=BELOW_OK)
    v = load_current(tmp_path / "artifacts")
    M = max(cfg.num_launchers, 1)
    assert v.manifest.to_dict()["dims"]["num_launchers"] == M and v.manifest.to_dict()["retrieval"]["model"] == type(build_model(cfg)).__name__
    shapes = smoke_run(v)
    assert shapes["retrieval"] == (1, M, 16)
