"""One compute thread per worker: recommendations run off the event loop, so /healthz (and
any other cheap route) is answered while a long request computes.

Why one thread: the work is CPU-bound under the GIL, so more threads only contend; what we need
is an event loop that is free to answer. The thread sets its own BLAS / OpenMP thread counts
(threadpool_limits in its initializer: OpenMP counts are per calling thread, and a pool thread
left at the default spun up a team per call, 2-18 ms for a 0.1 ms search). The queue in front
of it is bounded: beyond `max_queue` waiting requests the caller gets ComputeBusy (503) at once
instead of a growing backlog.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from threadpoolctl import threadpool_limits

T = TypeVar("T")


class ComputeBusy(Exception):
    """More than max_queue requests are already waiting for the compute thread."""


class ComputeThread:
    def __init__(self, threads: int, max_queue: int) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.max_queue = max_queue
        self.pending = 0  # touched on the event loop only
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recsys-compute",
                                        initializer=functools.partial(threadpool_limits, threads))

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        if self.pending >= self.max_queue:
            raise ComputeBusy(f"{self.pending} requests already waiting for compute")
        self.pending += 1
        try:
            # in a copy of the caller's context: the request id reaches the thread's log lines
            job = functools.partial(contextvars.copy_context().run, fn, *args)
            return await asyncio.get_running_loop().run_in_executor(self._pool, job)
        finally:
            self.pending -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
