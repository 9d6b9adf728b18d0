"""The whole loop on a simulated world (issue 25, "A simulated world to test the whole loop"):
serve -> log -> retrain from the log -> publish -> hot swap, several rounds.

    python benchmarks/quality/online_loop.py --data synthetic:users=400,items=300 --rounds 4 \
        --requests 1500 --work DIR [--minutes 0.5] [--modes warm,scratch] [--out FILE]

The world: the synthetic generator's own truth (benchmarks/quality/experiment_ab.py world and
clicked_positions): a simulated user is one of the generator's users, asks with their history
(user_id + history, k = 10), wants one next item drawn from the true next-item distribution given
their interests and last item (items seen removed), and clicks it when the list shows it and they
examine that far (position p, 1-based, with probability 1 / log2(p + 1)). A click is sent as
POST /v1/events with the answer's request_id, and becomes the user's last item.

The service: the real app (service.main.create_app, in process through its HTTP routes) with the
file event log and impression log under WORK/log (RECSYS_LOG_DIR); after each retrain it swaps to
the new CURRENT by POST /v1/admin/reload.

Round 0 serves a deliberately weak version: `recsys retrain` on the base data alone with one epoch
per stage, no item-to-item route, published below the baselines (--allow-below-baseline).
Round r >= 1 serves the version `recsys retrain --data BASE --log log:WORK/log` published after
round r - 1 (every stage trained on the base data plus every event logged so far, through the
gate): with --modes warm (retrain's default) each stage starts from the live version's
checkpoints, with scratch (`--from-scratch`) anew; `--modes warm,scratch` runs the whole loop once
per mode, from the same seed, in WORK/<mode>. Per round: the online click-through of the served
version from GET /v1/online-metrics (hit rate@10 = impressions with a click; CTR@10 = clicks /
slots shown in the first 10, each with its 95% Wilson interval), the offline served NDCG@10 of the
version retrained after it (`recsys evaluate --artifacts`, its own data's leave-one-out test
users) and the retrain's wall time.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.quality.experiment_ab import K, SimUser, clicked_positions, world  # noqa: E402
from recsys_cli.main import main as cli  # noqa: E402
from service.contract.layout import read_current  # noqa: E402
from service.core.config import Settings  # noqa: E402
from service.main import create_app  # noqa: E402
from training.data.synthetic import SyntheticTruth  # noqa: E402
from training.report import finish_report  # noqa: E402

KEY = "loop-key"


@dataclass
class Round:
    round: int
    served: str
    impressions: int
    events: int
    hit_rate10: dict[str, Any]
    ctr10: dict[str, Any]
    logged_events: int  # in the durable log after this round
    retrained: str | None = None  # the version published after this round (None: refused or last round)
    retrained_ndcg10: float | None = None
    retrain_exit: int | None = None
    retrain_s: float | None = None  # wall time of that `recsys retrain`
    seconds: float = 0.0


def retrain(root: Path, work: Path, base: str, log: str | None, extra: list[str]) -> int:
    args = ["retrain", "--artifacts", str(root), "--data", base, "--work", str(work / "runs"), *extra]
    return int(cli(args + (["--log", log] if log else [])))


def served_ndcg10(root: Path, version: str, work: Path) -> float:
    out = work / f"evaluate-{version}.json"
    code = cli(["evaluate", "--artifacts", str(root), "--version", version, "--json", str(out)])
    if code:
        raise RuntimeError(f"recsys evaluate --artifacts {root} --version {version}: exit {code}")
    payload = json.loads(out.read_text())
    return float(payload["cuts"][payload["served_stages"][-1]]["NDCG@10"])


def serve_round(client: Any, users: list[SimUser], truth: SyntheticTruth, rnd: int, n: int,
                rng: np.random.Generator) -> tuple[str, int]:
    """n requests by random simulated users; their clicks sent as events. (served version, events)"""
    events, version = 0, ""
    for t in range(n):
        user = users[int(rng.integers(len(users)))]
        res = client.post("/v1/recommend", json={"user_id": user.user_id, "history": user.history[-200:], "k": K},
                          headers={"X-Request-ID": f"round{rnd}-{t}"})
        assert res.status_code == 200, res.text
        body = res.json()
        version = body["model_version"]
        shown = [it["item_id"] for it in body["items"]]
        for p in clicked_positions(user, truth, shown, rng):
            item = shown[p]
            r = client.post("/v1/events", json={"user_id": user.user_id, "item_id": item,
                                                "request_id": body["request_id"]}, headers={"X-API-Key": KEY})
            assert r.status_code == 202, r.text
            events += 1
            user.history.append(item)  # the world moves on: the click is the user's last item
            user.seen = np.append(user.seen, int(item))
    return version, events


def online(client: Any, version: str) -> tuple[int, dict[str, Any], dict[str, Any]]:
    r = client.get("/v1/online-metrics", headers={"X-API-Key": KEY})
    assert r.status_code == 200, r.text
    for g in r.json()["groups"]:
        if g["experiment"] is None and g["version"] == version:
            return int(g["impressions"]), g["hit_rate_at_k"][str(K)], g["ctr_at_k"][str(K)]
    raise RuntimeError(f"no online metrics for {version}")


def run_loop(base: str, work: Path, rounds: int, requests: int, retrain_args: list[str], weak_args: list[str],
             seed: int = 0, progress: bool = True) -> list[Round]:
    """The loop: round 0's weak version, then `rounds` rounds of serve -> log -> retrain -> swap."""
    root, log_dir = work / "artifacts", work / "log"
    users, truth = world(base)
    rng = np.random.default_rng(seed)
    code = retrain(root, work, base, None, weak_args)
    if code:
        raise RuntimeError(f"round 0's version: recsys retrain exit {code}")
    settings = Settings(artifacts=root, api_key=KEY, log_dir=log_dir, timeout_ms=60_000, reload_poll_s=0)
    from fastapi.testclient import TestClient
    from service.online_log import read_events

    out: list[Round] = []
    with TestClient(create_app(settings)) as client:
        for rnd in range(rounds):
            t0 = time.perf_counter()
            version, events = serve_round(client, users, truth, rnd, requests, rng)
            assert version == read_current(root)
            impressions, hit, ctr = online(client, version)
            logged = sum(1 for _ in read_events(f"{log_dir}"))
            row = Round(rnd, version, impressions, events, hit, ctr, logged)
            if rnd < rounds - 1:
                t1 = time.perf_counter()
                row.retrain_exit = retrain(root, work, base, f"log:{log_dir}", retrain_args)
                row.retrain_s = time.perf_counter() - t1
                live = read_current(root)
                if row.retrain_exit == 0 and live != version:
                    row.retrained = live
                    row.retrained_ndcg10 = served_ndcg10(root, live, work)
                r = client.post("/v1/admin/reload", headers={"X-API-Key": KEY})
                assert r.status_code == 200, r.text
            row.seconds = time.perf_counter() - t0
            out.append(row)
            if progress:
                print(format_row(row), flush=True)
    return out


HEADER = (f"{'round':>5}  {'served version':<26}  {'impr':>5}  {'clicks':>6}  {'hit rate@10 (95% CI)':>24}  "
          f"{'CTR@10 (95% CI)':>24}  {'log':>6}  {'retrained -> NDCG@10 (served, test)':<44}  {'retrain s':>9}  "
          f"{'wall s':>6}")


def _ci(w: dict[str, Any]) -> str:
    return "-" if w["rate"] is None else f"{w['rate']:.4f} [{w['low']:.4f}, {w['high']:.4f}]"


def format_row(r: Round) -> str:
    after = ("-" if r.retrain_exit is None else f"refused (exit {r.retrain_exit}), CURRENT stays" if r.retrained is None
             else f"{r.retrained} -> {r.retrained_ndcg10:.4f}")
    return (f"{r.round:>5}  {r.served:<26}  {r.impressions:>5}  {r.events:>6}  {_ci(r.hit_rate10):>24}  "
            f"{_ci(r.ctr10):>24}  {r.logged_events:>6}  {after:<44}  "
            f"{'-' if r.retrain_s is None else f'{r.retrain_s:.0f}':>9}  {r.seconds:>6.0f}")


MODES = {"warm": [], "scratch": ["--from-scratch"]}  # the retrain flags of each mode


def summary(runs: dict[str, list[Round]]) -> list[str]:
    """One line per round: each mode's CTR@10 and the NDCG@10 / retrain time of what it retrained."""
    lines = [f"{'round':>5}  " + "  ".join(f"{m + ' CTR@10':>14}  {m + ' NDCG@10':>15}  {m + ' retrain s':>17}"
                                           for m in runs)]
    for i in range(max(len(r) for r in runs.values())):
        cells = []
        for rows in runs.values():
            r = rows[i]
            ndcg = "-" if r.retrained_ndcg10 is None else f"{r.retrained_ndcg10:.4f}"
            secs = "-" if r.retrain_s is None else f"{r.retrain_s:.0f}"
            rate = "-" if r.ctr10["rate"] is None else f"{r.ctr10['rate']:.4f}"
            cells.append(f"{rate:>14}  {ndcg:>15}  {secs:>17}")
        lines.append(f"{i:>5}  " + "  ".join(cells))
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="synthetic:users=400,items=300", help="the base data (a synthetic spec)")
    p.add_argument("--work", type=Path, required=True, help="artifacts, log, checkpoints (an empty folder)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--requests", type=int, default=1500, help="requests per round")
    p.add_argument("--minutes", type=float, default=None, help="retrain's retrieval time ceiling per run")
    p.add_argument("--epochs", type=int, default=None, help="retrain's epoch cap per stage")
    p.add_argument("--modes", default="warm", help="comma-separated: warm (retrain's default) and/or scratch "
                                                   "(--from-scratch), one loop each in WORK/<mode> (default: warm)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    modes = args.modes.split(",")
    if not modes or any(m not in MODES for m in modes) or len(set(modes)) != len(modes):
        p.error(f"--modes: comma-separated, each one of {sorted(MODES)}, got {args.modes!r}")
    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    extra = [*(["--minutes", str(args.minutes)] if args.minutes else []),
             *(["--epochs", str(args.epochs)] if args.epochs else [])]
    weak = ["--epochs", "1", "--no-item2item", "--allow-below-baseline"]
    runs: dict[str, list[Round]] = {}
    for mode in modes:
        print(f"mode {mode}\n{HEADER}", flush=True)
        work = args.work / mode if len(modes) > 1 else args.work
        runs[mode] = run_loop(args.data, work, args.rounds, args.requests, [*extra, *MODES[mode]], weak, args.seed)
    lines = [f"$ python {shlex.join(sys.argv)}", "",
             f"base data {args.data}; k = {K}; {args.requests} requests per round; round 0 serves "
             f"`recsys retrain {' '.join(weak)}` on the base data alone; round r >= 1 the version "
             f"`recsys retrain --data BASE --log log:WORK/log{' ' + ' '.join(extra) if extra else ''}` published "
             "after round r - 1 (mode warm: its default, each stage from the live version's checkpoints; "
             "scratch: with --from-scratch)", ""]
    for mode, rows in runs.items():
        lines += [f"mode {mode}", HEADER, *map(format_row, rows), ""]
    if len(runs) > 1:
        lines += ["per round, side by side (NDCG@10, retrain s: the version retrained after the round)", *summary(runs), ""]
    lines += ["hit rate@10: impressions with a click / impressions; CTR@10: clicked slots / slots shown in the first 10 "
              "(GET /v1/online-metrics, 95% Wilson intervals); log: events in the durable log after the round; "
              "NDCG@10: recsys evaluate --artifacts on the retrained version's own data (base + log), served cut; "
              "retrain s: wall time of that recsys retrain"]
    finish_report(lines, t0, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
