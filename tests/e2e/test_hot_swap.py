"""End to end: a live `recsys serve` (2 workers, real Redis) swaps versions under load.

A new version is published next to the live one (a copy under a new name: what matters here is
the swap, not the models), CURRENT is flipped and the change announced on Redis pub/sub, while
client threads keep sending requests: every request must succeed, and every worker must move
to the new version. A version folder that does not load is then made CURRENT: the service must
keep answering with the old version.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.notify import notify_version
from tests.e2e.test_serve import two_workers_on_redis
from tests.service.test_api import artifacts_root, catalog, copy_version  # noqa: F401  (module fixtures)
from training.publish.versions import set_current
from service.contract.layout import ITEMS_NPY


@pytest.fixture()
def live(artifacts_root: Path, redis_url: str, tmp_path: Path) -> Iterator[tuple[str, Path]]:  # noqa: F811
    root = tmp_path / "artifacts"
    root.mkdir()
    copy_version(root, artifacts_root / "v1", "v1")
    set_current(root, "v1")
    # pub/sub must do the work (the poll is 30 s)
    with two_workers_on_redis(root, redis_url, "v1", {"RECSYS_API_KEY": "", "RECSYS_RELOAD_POLL_S": "30"}) as base:
        yield base, root


def test_swap_under_load_drops_nothing(live: tuple[str, Path], redis_url: str, catalog: list[str]) -> None:  # noqa: F811
    base, root = live
    stop = threading.Event()
    seen: list[tuple[float, str]] = []
    failures: Counter[str] = Counter()

    def client(seed: int) -> None:
        with httpx.Client(base_url=base, timeout=10) as c:
            i = seed
            while not stop.is_set():
                i += 1
                try:
                    r = c.post("/v1/recommend", json={"history": catalog[i % 40:i % 40 + 5], "k": 5})
                except httpx.HTTPError as exc:
                    failures[type(exc).__name__] += 1
                    continue
                if r.status_code != 200:
                    failures[str(r.status_code)] += 1
                else:
                    seen.append((time.monotonic(), r.json()["model_version"]))

    threads = [threading.Thread(target=client, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        for name in ("v2", "v3"):
            copy_version(root, root / "v1", name)
            set_current(root, name)
            flipped = time.monotonic()
            assert notify_version(redis_url, name) == 2
            deadline = flipped + 20
            while True:  # every worker answers with the new version: the last old answer is before this
                time.sleep(0.3)
                recent = [v for t, v in seen[-20:] if t > flipped]
                if len(recent) >= 10 and set(recent) == {name}:
                    break
                assert time.monotonic() < deadline, f"not all workers moved to {name}: {Counter(recent)}"
        # a broken version becomes CURRENT: it is refused and v3 keeps serving
        copy_version(root, root / "v1", "v4")
        (root / "v4" / ITEMS_NPY).write_bytes(b"\x93NUMPY broken")
        set_current(root, "v4")
        notify_version(redis_url, "v4")
        time.sleep(1.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
    assert not failures, f"failed requests during the swaps: {dict(failures)}"
    versions = Counter(v for _, v in seen)
    assert versions["v1"] and versions["v2"] and versions["v3"] and "v4" not in versions
    assert seen[-1][1] == "v3"
    assert httpx.get(f"{base}/v1/version").json()["model_version"] == "v3"
