"""The whole loop on a tiny simulated world, 2 rounds (issue 25 item 6; the benchmark is
benchmarks/quality/online_loop.py): simulated users request lists from the real app with the file
event log on, click by the generator's truth and send events with the request_id; `recsys retrain`
reads the log, publishes through the gate, the app swaps to it; the online metrics have each round."""

from __future__ import annotations

from pathlib import Path

from benchmarks.quality.online_loop import run_loop
from service.contract.layout import MANIFEST, read_current
from service.contract.manifest import Manifest
from service.online_log import read_events
from training.checkpoints import read_checkpoint
from training.data.sources import load

BASE = "synthetic:users=60,items=40,categories=8,seed=1"
REQUESTS = 150


def test_two_rounds_serve_log_retrain_publish_and_swap(tmp_path: Path) -> None:
    # the retrain warm-starts from round 0's version (its default). The baseline gate is left out: on
    # 59 validation users it is a coin flip (measured: warm-started, served NDCG@10 0.4197 against
    # item2item's 0.4038 with a paired SE of 0.031, refused; from scratch 0.4056 against 0.4038, SE
    # 0.0013, published), and what this test checks is the loop, not the gate
    rows = run_loop(BASE, tmp_path, rounds=2, requests=REQUESTS, retrain_args=["--epochs", "2", "--allow-below-baseline"],
                    weak_args=["--epochs", "1", "--no-item2item", "--allow-below-baseline"], progress=False)
    first, second = rows
    root = tmp_path / "artifacts"
    # round 0's clicks are in the durable log, and the online metrics joined them to its impressions
    assert first.events > 0 and first.logged_events == first.events
    assert first.impressions == REQUESTS and first.hit_rate10["successes"] == first.events
    # the retrain read them: the new version was trained on base + every logged event, published, served
    assert first.retrain_exit == 0 and first.retrained is not None and first.retrained_ndcg10 is not None
    assert second.served == first.retrained == read_current(root) != first.served
    spec = Manifest.load(root / first.retrained / MANIFEST).data.spec
    # ... starting from round 0's checkpoints: every item's row copied by id (the catalog did not grow)
    runs = [Path(str(Manifest.load(root / v / MANIFEST).retrieval.source)).parent for v in (first.served, first.retrained)]
    warm = read_checkpoint(runs[1] / "retrieval" / "checkpoint.pt").extra["warm_start"]  # `tail`: one retriever
    assert warm == {"from": str(runs[0] / "retrieval"), "keys": "items", "copied": 40, "new": 0, "dropped": 0}
    assert spec is not None
    logged = list(read_events(f"{tmp_path / 'log'}"))
    assert len(load(spec).items) == len(load(BASE).items) + len(logged[:first.logged_events])
    # the second round is measured on the new version, its events appended to the same log
    assert second.impressions == REQUESTS and second.hit_rate10["rate"] is not None
    assert second.logged_events == first.events + second.events
