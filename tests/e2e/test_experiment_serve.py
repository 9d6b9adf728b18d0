"""End to end: a live `recsys serve` (2 workers, real Redis) serving an experiment of two versions.

The experiment is in artifacts/EXPERIMENT.json at start: every worker loads both versions and
answers name the experiment and the user's arm. An admin PUT then switches it to interleaving:
the worker that took the PUT writes the file and announces it on Redis, and the other worker
follows without waiting for its (30 s) poll.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.contract.layout import CURRENT, EXPERIMENT
from service.experiments import Experiment, ExperimentConfig
from tests.e2e.test_serve import two_workers_on_redis
from tests.service.test_api import artifacts_root, catalog, copy_version  # noqa: F401  (module fixtures)

AB = {"name": "exp1", "mode": "ab", "seed": 5,
      "arms": [{"name": "live", "share": 0.5}, {"name": "pinned", "version": "v2", "share": 0.5}]}
KEY = "e2e-key"


@pytest.fixture()
def live(artifacts_root: Path, redis_url: str, tmp_path: Path) -> Iterator[str]:  # noqa: F811
    root = tmp_path / "artifacts"
    root.mkdir()
    copy_version(root, artifacts_root / "v1", "v1")
    copy_version(root, root / "v1", "v2")
    (root / CURRENT).write_text("v1\n")
    (root / EXPERIMENT).write_text(json.dumps(AB))
    with two_workers_on_redis(root, redis_url, "v1", {"RECSYS_API_KEY": KEY, "RECSYS_RELOAD_POLL_S": "30"}) as base:
        yield base


def test_live_server_serves_an_experiment_of_two_versions(live: str, catalog: list[str]) -> None:  # noqa: F811
    exp = Experiment(ExperimentConfig.model_validate(AB))
    with httpx.Client(base_url=live, timeout=10) as c:
        by_arm: dict[str, set[str]] = {}
        for i in range(30):
            user = f"user-{i}"
            out = c.post("/v1/recommend", json={"user_id": user, "history": catalog[i % 20:i % 20 + 4], "k": 5}).json()
            assert (out["experiment"], out["arm"]) == ("exp1", exp.arm_for(user).name)
            by_arm.setdefault(out["arm"], set()).add(out["model_version"])
        assert by_arm == {"live": {"v1"}, "pinned": {"v2"}}
        metrics = c.get("/metrics").text
        assert "recsys_versions_loaded 2.0" in metrics
        assert 'recsys_experiment_arm_info{arm="pinned",experiment="exp1",mode="ab",version="v2"} 0.5' in metrics

        il = {"name": "il", "mode": "interleave", "seed": 1, "arms": [{"name": "live"}, {"name": "pinned",
                                                                                         "version": "v2"}]}
        assert c.put("/v1/admin/experiment", json=il).status_code == 401
        r = c.put("/v1/admin/experiment", json=il, headers={"X-API-Key": KEY})
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 10
        streak = 0
        while streak < 20:  # consecutive answers from both workers, interleaved
            assert time.monotonic() < deadline, "a worker did not follow the new experiment"
            # a new connection each time: a kept-alive one would stay with one worker
            out = httpx.post(f"{live}/v1/recommend", json={"user_id": f"u{streak}", "history": catalog[:4],
                                                            "k": 6}).json()
            streak = streak + 1 if out.get("experiment") == "il" else 0
            if streak:
                assert out["arm"] == "live+pinned" and {it["source"] for it in out["items"]} == {"live", "pinned"}
