"""Data-parallel retrieval training under torchrun (2 gloo ranks on CPU)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from training import distributed
from training.eval.baselines import Popularity
from training.data.sources import load
from training.data.splits import LeaveOneOut
from training.eval.metrics import evaluate_retrieval
from training.checkpoints import load_retrieval
from training.stages.retrieval.train import (
    RetrievalTrainConfig,
    training_pairs,
    evaluate_model,
    train_retrieval,
)

RECSYS = Path(sys.executable).parent / "recsys"  # the venv's console script


def torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
        "--no-python", str(RECSYS), "train", "retrieval", "--threads", "1", "--quiet", *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize(("n", "batch_size", "world"), [(10, 4, 2), (9, 4, 2), (9, 4, 3), (5, 4, 2), (7, 3, 1)])
def test_rank_shards_cover_each_row_once_per_epoch(n: int, batch_size: int, world: int) -> None:
    order = np.random.default_rng(n).permutation(n)
    shards = [list(distributed.rank_batches(order, batch_size, r, world)) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # every rank runs the same number of steps
    rows = np.concatenate([b for s in shards for b in s])
    np.testing.assert_array_equal(np.sort(rows), np.arange(n))
    for step in zip(*shards):  # a rank's batch is the global batch / world size
        assert max(b.size for b in step) <= -(-batch_size // world)
    with pytest.raises(ValueError, match="rank must be in 0..1, got 2"):
        next(distributed.rank_batches(order, batch_size, 2, 2))


def test_without_torchrun_there_is_no_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed.process_group() as launch:
        assert launch.world_size == 1 and not torch.distributed.is_initialized()
        assert distributed.is_rank0()
        np.testing.assert_array_equal(distributed.all_reduce_sum(np.array([1.0, 2.0])), [1.0, 2.0])
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2, WORLD_SIZE=2"):
        distributed.torchrun_launch()


def test_two_process_torchrun_matches_one_process(tmp_path: Path) -> None:
    data = "synthetic:users=600,items=150,seed=4"
    proc = torchrun(
        "--data", data, "--out", str(tmp_path), "--launchers", "2", "--maxlen", "20", "--dim", "16",
        "--dropout", "0", "--epochs", "8", "--batch-size", "64", "--lr", "5e-3", "--patience", "3",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("ml-sasrec(M=2,copy_last)") == 1  # rank 0 alone prints the table
    split = LeaveOneOut(load(data))
    model, ckpt = load_retrieval(tmp_path, split.dataset)
    payload = ckpt.extra
    assert payload["world_size"] == 2
    assert not any(k.startswith("module.") for k in ckpt.state_dict)
    pop = evaluate_retrieval(Popularity(split), split, progress=False)["NDCG@10"]
    assert payload["metrics"]["NDCG@10"] > 2.0 * pop
    # without dropout the split batches give the one-process gradients: the same losses up to
    # float summation order, a gap Adam then widens (rel 4e-4 by epoch 8), so a tight check on
    # the first epochs and a quality one at the end
    torch.set_num_threads(1)
    one = train_retrieval(split, model.config, RetrievalTrainConfig(**payload["train_config"]), progress=False)
    losses = [e["loss"] for e in payload["training"]["history"]]
    assert losses[:3] == pytest.approx([e.loss for e in one.history[:3]], rel=1e-5)
    assert payload["training"]["best_epoch"] == one.best_epoch
    assert payload["metrics"]["NDCG@10"] == pytest.approx(evaluate_model(one.model, split)["NDCG@10"], abs=0.02)


def test_ranks_agree_to_stop_on_the_time_limit_with_an_empty_shard(tmp_path: Path) -> None:
    data = "synthetic:users=400,items=100,seed=1"
    n = len(training_pairs(LeaveOneOut(load(data)), 10)[0])
    batch_size = next(b for b in range(16, n) if n % b == 1)  # the last global batch leaves rank 1 empty
    proc = torchrun(
        "--data", data, "--out", str(tmp_path), "--maxlen", "10", "--dim", "8", "--epochs", "50",
        "--batch-size", str(batch_size), "--max-minutes", "1e-6",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = load_retrieval(tmp_path, load(data))[1].extra
    assert payload["training"]["epochs_run"] == 1
    assert np.isfinite(payload["training"]["history"][0]["loss"])
