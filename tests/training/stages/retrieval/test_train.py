import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.sasrec import SASRecConfig
from training.eval.baselines import Popularity
from training.data.sources import load
from training.data.splits import LeaveOneOut
from service.index import load_index, search_fused
from service.contract.layout import INDEX_FAISS
from training.publish.onnx.retrieval import export_retrieval, retrieval_parity
from training.eval.metrics import evaluate_retrieval
from training.stages.retrieval.losses import max_fusion_loss
from training.checkpoints import CheckpointError, load_retrieval
from training.stages.retrieval.train import (
    RetrievalTrainConfig,
    evaluate_model,
    save_checkpoint,
    train_retrieval,
)


def test_max_fusion_loss_hand_computed() -> None:
    # 2 launchers, 3 items (+ padding row 0), D = 1
    items = torch.tensor([[0.0], [1.0], [2.0], [-1.0]])
    user = torch.tensor([[[1.0], [-1.0]]])  # launcher scores: l0 = e, l1 = -e
    target = torch.tensor([3])  # s_0(3) = -1, s_1(3) = 1 -> best launcher 1
    loss, best = max_fusion_loss(user, items, target)
    assert best.tolist() == [1]
    # negatives i != y (1, 2): max-fused scores max(1, -1) = 1 and max(2, -2) = 2
    logits = torch.tensor([-1.0, 1.0, 1.0, 2.0])
    expected = -(logits[1] - torch.logsumexp(logits, 0))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_max_fusion_with_one_launcher_is_cross_entropy() -> None:
    torch.manual_seed(0)
    items = torch.randn(6, 4)
    user = torch.randn(5, 1, 4)
    target = torch.randint(1, 6, (5,))
    loss, _ = max_fusion_loss(user, items, target)
    logits = user[:, 0] @ items.T
    logits[:, 0] = -math.inf
    assert loss.item() == pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-6)
    # the general path with two identical launchers: the target's score counts twice below
    loss2, _ = max_fusion_loss(user.repeat(1, 2, 1), items, target)
    s_y = logits.gather(1, target[:, None])  # (P, 1)
    others = logits.scatter(1, target[:, None], -math.inf)  # i != y, padding already -inf
    expected = (torch.logsumexp(torch.cat([s_y, s_y, others], 1), 1) - s_y[:, 0]).mean()
    assert loss2.item() == pytest.approx(expected.item(), rel=1e-5)


def test_sampled_softmax_masks_accidental_hits() -> None:
    items = torch.randn(5, 3)
    user = torch.randn(2, 2, 3)
    target = torch.tensor([1, 2])
    negatives = torch.tensor([1, 3, 4])
    loss, _ = max_fusion_loss(user, items, target, negatives)
    assert torch.isfinite(loss)


@pytest.fixture(scope="module")
def small_run() -> tuple[LeaveOneOut, object]:
    torch.set_num_threads(1)
    split = LeaveOneOut(load("synthetic:users=800,items=300,seed=5"))
    cfg = SASRecConfig(num_items=split.num_items, maxlen=20, dim=32, dropout=0.2, num_launchers=2)
    res = train_retrieval(split, cfg, RetrievalTrainConfig(epochs=12, batch_size=64, lr=3e-3, patience=4), progress=False)
    return split, res


def test_trained_model_beats_popularity_on_fixed_seed(small_run) -> None:
    split, res = small_run
    metrics = evaluate_model(res.model, split)
    pop = evaluate_retrieval(Popularity(split), split, progress=False)
    assert metrics["NDCG@10"] > 2.0 * pop["NDCG@10"]
    assert 0.0 <= metrics["LauncherEntropy"] <= math.log(2) + 1e-9
    assert res.history[-1].sequences_per_s > 0


def test_training_is_deterministic_per_seed(small_run) -> None:
    split, res = small_run
    cfg = res.model.config
    again = train_retrieval(split, cfg, RetrievalTrainConfig(epochs=2, batch_size=64, lr=3e-3, seed=0), progress=False)
    twice = train_retrieval(split, cfg, RetrievalTrainConfig(epochs=2, batch_size=64, lr=3e-3, seed=0), progress=False)
    assert [e.loss for e in again.history] == [e.loss for e in twice.history]


def test_checkpoint_and_onnx_round_trip(small_run, tmp_path: Path) -> None:
    split, res = small_run
    save_checkpoint(tmp_path, res.model, split.dataset, "synthetic:users=800,items=300,seed=5", {"metrics": {}})
    model, ckpt = load_retrieval(tmp_path, split.dataset)
    assert ckpt.fingerprint == split.dataset.fingerprint and ckpt.kind.key == "retrieval/sasrec"
    for a, b in zip(model.state_dict().values(), res.model.state_dict().values()):
        assert torch.equal(a, b)
    onnx_path, items_path = export_retrieval(model, tmp_path)
    assert retrieval_parity(model, onnx_path) < 1e-4
    items = np.load(items_path)
    assert items.shape == (split.num_items, 32) and items.dtype == np.float32
    users = model.encode_user(torch.from_numpy(split.histories("test", maxlen=20)[:50])).detach().numpy()
    info = build_item_index(items, users, tmp_path)
    assert info["kind"] == "flat" and info["recall@100"] == 1.0 and info["ntotal"] == split.num_items
    # the index and the eager model agree on each user's best item (max over launchers)
    index = load_index(tmp_path / "index.faiss")
    fused = search_fused(index, users, k=1)
    want = np.einsum("bmd,nd->bmn", users, items).max(axis=1).argmax(axis=1) + 1
    np.testing.assert_array_equal(fused.items[:, 0], want)


def build_item_index(items: np.ndarray, user_vectors: np.ndarray, out_dir: Path, k: int = 100) -> dict[str, object]:
    """index.faiss over `items` (N, D) and its recall@k against exact search with the launcher
    vectors `user_vectors` (B, M, D) as queries (what training/publish/build.py does for a version)."""
    from service.index import index_params, save_index
    from service.index_build import IndexSpec, ann_recall, build_index, choose_kind

    index = build_index(items, IndexSpec(kind=choose_kind(items.shape[0])))
    queries = user_vectors.reshape(-1, user_vectors.shape[-1])
    recall = ann_recall(index, items, queries, k=min(k, items.shape[0]))
    save_index(index, out_dir / INDEX_FAISS)
    return {**index_params(index), f"recall@{min(k, items.shape[0])}": recall, "file": INDEX_FAISS}


def test_bad_checkpoint_paths(small_run, tmp_path: Path) -> None:
    ds = small_run[0].dataset
    with pytest.raises(FileNotFoundError, match="no checkpoint.pt there"):
        load_retrieval(tmp_path, ds)
    torch.save({"kind": "prerank"}, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="checkpoint.pt: not a checkpoint layout this code knows"):
        load_retrieval(tmp_path, ds)


def test_train_retrieval_cli(tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    js = tmp_path / "m.json"
    proc = subprocess.run(
        [sys.executable, "-m", "recsys_cli", "train", "retrieval", "--data", "synthetic:users=200,items=80",
         "--launchers", "2", "--launcher-init", "independent", "--epochs", "2", "--maxlen", "10", "--dim", "16",
         "--average-best", "2", "--out", str(out), "--json", str(js), "--threads", "1", "--quiet"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(js.read_text())
    assert payload["model"] == "ml-sasrec(M=2,independent)"
    assert {"HR@10", "NDCG@10", "HR@100", "Coverage@10", "LauncherEntropy"} <= set(payload["metrics"])
    training = load_retrieval(out, load("synthetic:users=200,items=80"))[1].extra["training"]
    # the two epochs' average was validated: recorded whether or not it was kept
    assert training["averaged_score"] is not None and training["averaged_epochs"] in ([], [1, 2], [2, 1])
    for flags, message in ((["--launchers", "-2"], "num_launchers must be >= 0"),
                           (["--average-best", "0"], "average (--average-best) must be >= 1, got 0")):
        bad = subprocess.run(
            [sys.executable, "-m", "recsys_cli", "train", "retrieval", "--data", "synthetic:users=50,items=20",
             *flags, "--out", str(out)],
            capture_output=True, text=True,
        )
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr


def test_warm_start_copies_weights_and_spreads_launchers(small_run) -> None:
    from training.stages.retrieval.train import warm_start

    split, res = small_run
    src = res.model  # M = 2, copy_last
    cfg = SASRecConfig(**{**src.config.to_dict(), "num_launchers": 4})
    torch.manual_seed(1)
    from models.sasrec import MultiLauncherSASRec

    model = MultiLauncherSASRec(cfg)
    warm_start(model, src)
    assert torch.equal(model.item_embedding.weight, src.item_embedding.weight)
    assert torch.equal(model.blocks[0].attn.q.weight, src.blocks[0].attn.q.weight)
    # launcher j starts near source launcher j mod 2, and no two are identical
    assert torch.allclose(model.launchers[2], src.launchers[0], atol=0.05)
    assert not torch.equal(model.launchers[0], model.launchers[2])
    bad = MultiLauncherSASRec(SASRecConfig(**{**src.config.to_dict(), "dim": 16}))
    with pytest.raises(ValueError, match="dim is 16 here, 32 in the source"):
        warm_start(bad, src)
