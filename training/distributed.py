"""Data-parallel training under `torchrun` (DESIGN §8): gloo process group, rank-0 duties, sharding.

Launched by torchrun, a command runs once per rank with RANK / LOCAL_RANK / WORLD_SIZE set;
without WORLD_SIZE everything here is a no-op for a single process (rank 0 of 1), so the
training loops call these helpers unconditionally.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# long enough for rank 0 to run a validation pass while the other ranks wait on its broadcast
TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class Launch:
    """Where this process sits in a torchrun launch."""

    rank: int
    local_rank: int
    world_size: int


def torchrun_launch() -> Launch | None:
    """The torchrun environment (RANK, LOCAL_RANK, WORLD_SIZE), or None when not launched by it."""
    if "WORLD_SIZE" not in os.environ:
        return None
    try:
        launch = Launch(
            rank=int(os.environ.get("RANK", "0")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            world_size=int(os.environ["WORLD_SIZE"]),
        )
    except ValueError as exc:
        raise ValueError(f"bad torchrun environment: {exc}") from None
    if launch.world_size < 1 or not 0 <= launch.rank < launch.world_size:
        raise ValueError(f"bad torchrun environment: RANK={launch.rank}, WORLD_SIZE={launch.world_size}")
    return launch


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def process_group(threads: int | None = None) -> Iterator[Launch]:
    """Join torchrun's gloo process group for the duration of the block (always left on exit).

    Threads: `threads` if given; under torchrun otherwise cores // world size per rank, so the
    ranks of one machine do not oversubscribe it (torchrun itself would set OMP_NUM_THREADS=1).
    Not launched by torchrun: a single process, no process group, threads only if given.
    """
    launch = torchrun_launch()
    if launch is None:
        if threads:
            torch.set_num_threads(threads)
        yield Launch(rank=0, local_rank=0, world_size=1)
        return
    torch.set_num_threads(threads or max(1, _cores() // launch.world_size))
    dist.init_process_group("gloo", rank=launch.rank, world_size=launch.world_size, timeout=TIMEOUT)
    if launch.rank != 0:  # one rank reports; the others only warn
        logging.getLogger().setLevel(logging.WARNING)
    try:
        yield launch
        # leave together: a CI run saw rank 1 abort at exit ("terminate called without an active
        # exception", SIGABRT) while rank 0 was still evaluating; a gloo rank torn down while its
        # peer's pairs are live can end that way (pytorch/pytorch#28126). Not reached on an error,
        # so a failing rank never waits here
        dist.barrier()
    finally:
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_rank0() -> bool:
    return rank() == 0


def all_reduce_sum(values: np.ndarray) -> np.ndarray:
    """Element-wise sum of `values` over all ranks (float64; identity for one process)."""
    out = torch.as_tensor(np.asarray(values, dtype=np.float64))
    if world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.numpy()


def broadcast_from_rank0(values: Sequence[float]) -> list[float]:
    """Rank 0's `values` on every rank: decisions taken once (early stop, time limit) are shared."""
    out = torch.tensor(list(values), dtype=torch.float64)
    if world_size() > 1:
        dist.broadcast(out, src=0)
    return out.tolist()


def rank_batches(order: np.ndarray, batch_size: int, rank: int, world_size: int) -> Iterator[np.ndarray]:
    """This rank's rows of each global batch of `order`: rows rank, rank + W, ... of the batch.

    All ranks iterate the same global permutation, so they run the same number of steps (DDP
    needs that) and, over one epoch, the shards cover `order` exactly once; a rank's batch is
    global batch / world size rows, so the effective batch is that of one process. A rank may
    get an empty batch when the last global batch has fewer rows than there are ranks.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
    for start in range(0, order.size, batch_size):
        yield order[start : start + batch_size][rank::world_size]
