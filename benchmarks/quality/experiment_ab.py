"""A/B test vs team-draft interleaving between two published versions, on simulated users who click
by the synthetic generator's own ground truth (issue 25, "Must show").

    python benchmarks/quality/experiment_ab.py --artifacts DIR [--good V] [--worse V] \
        [--runs RUNS] [--impressions 1000] [--repeats 3] [--out FILE]

DIR holds a version trained on the synthetic data (`recsys demo --no-serve --artifacts DIR`): the
good arm is CURRENT (or --good). The deliberately worse arm (--worse, else built here once and
published beside it as `random-init`) is the same pipeline with random-init weights
(tests.training.publish.test_build.make_checkpoints), published below the baselines on purpose;
with --runs, also the good version's own checkpoints published without the item-to-item route
(`no-route`: the trained sequence model alone, near popularity on this data), a smaller gap.

The world: training.data.synthetic.generate_world on the version's data spec. A simulated user
is one of the generator's users, asking with their logged history (user_id + history, k = 10).
They then want one next item, drawn from the generator's true next-item distribution given their
interests and last item (training/data/synthetic.py SyntheticTruth.next_item_probs, items they
have seen removed), and click it if the list shows it and they look that far down (position p,
1-based, is examined with probability 1 / log2(p + 1)). Nothing else is clicked.

The service: the real app (service.main.create_app, in process through its HTTP routes) with the
experiment started by PUT /v1/admin/experiment, so users are hashed to arms by the service and
interleaved lists are merged by it; clicks are credited from the answers' own `arm` / per-item
`source`. (The per-arm figures are computed here from the answers: the online metrics of the
impression log, issue 25 item 3, are another branch's.)

Per repeat (experiment seed = repeat: other user splits, other coin flips, other clicks):
- A/B: per-arm click-through (impressions with a click / impressions) with 95% intervals, and the
  difference; the better arm is called at the first look (every --check-every impressions) where
  |difference| > Z_SEQ standard errors.
- Interleaving: per impression +1 / -1 / 0 for the arm whose items got more clicks; the better
  arm is called at the first look where |mean| > Z_SEQ standard errors.
- The same two procedures between the good version and itself (A/A): how often either calls a
  winner that is not there, within the budget.
Z_SEQ = 3.0 instead of 1.96 because the data are looked at many times (a constant boundary in
the spirit of Pocock's; the A/A rows show its false-call rate).
"""

from __future__ import annotations

import argparse
import logging
import math
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fastapi.testclient import TestClient  # noqa: E402

from service.contract.layout import MANIFEST, read_current, write_current  # noqa: E402
from service.contract.manifest import Manifest  # noqa: E402
from service.core.config import Settings  # noqa: E402
from service.main import create_app  # noqa: E402
from training.data.synthetic import SyntheticTruth, generate_world, parse_synthetic_spec  # noqa: E402
from training.report import finish_report  # noqa: E402

KEY = "bench-key"
K = 10
Z_SEQ = 3.0
Z95 = 1.96
WORSE = "random-init"
NO_ROUTE = "no-route"


@dataclass
class SimUser:
    user_id: str
    truth_index: int
    history: list[str]  # external item ids, oldest first
    seen: np.ndarray  # (n,) 0-based truth indices


def publish_random_init(root: Path, spec: str, good: str) -> str:
    """Publish random-init weights on the same data as `good` (below the baselines, allowed), then
    put CURRENT back."""
    import torch

    from tests.training.publish.test_build import BELOW_OK, make_checkpoints
    from training.publish.publisher import publish

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        ret, pre, rer = make_checkpoints(spec, Path(tmp))
        publish(spec, ret, pre, rer, root, version=WORSE, item2item=None, gate=BELOW_OK, max_regression=None)
    write_current(root, good)
    return WORSE


def publish_without_route(root: Path, spec: str, good: str, runs: Path) -> str:
    """Publish the good version's own checkpoints (runs/retrieval, prerank, rerank) without the
    item-to-item route: a trained but weaker model (the sequence model alone), then put CURRENT back."""
    from training.publish.publisher import publish
    from training.eval.served_eval import ServingGate

    publish(spec, runs / "retrieval", runs / "prerank", runs / "rerank", root, version=NO_ROUTE, item2item=None,
            gate=ServingGate(allow_below_baseline=True), max_regression=None)
    write_current(root, good)
    return NO_ROUTE


def world(spec: str) -> tuple[list[SimUser], SyntheticTruth]:
    if not (spec == "synthetic" or spec.startswith("synthetic:")):
        raise SystemExit(f"the version was trained on {spec!r}: this simulation needs the synthetic data")
    ds, truth = generate_world(parse_synthetic_spec(spec.partition(":")[2]))
    users = []
    for row in range(len(ds.user_ids)):
        hist = [str(ds.item_ids[i]) for i in ds.items[ds.offsets[row]:ds.offsets[row + 1]]]
        users.append(SimUser(str(ds.user_ids[row]), int(ds.user_ids[row]), hist,
                             np.array([int(x) for x in hist], dtype=np.int64)))
    return users, truth


def clicked_positions(user: SimUser, truth: SyntheticTruth, shown: list[str], rng: np.random.Generator) -> list[int]:
    """0-based positions the user clicks: the wanted item, if shown and examined."""
    probs = truth.next_item_probs(user.truth_index, int(user.history[-1])).copy()
    probs[user.seen] = 0.0
    want = str(rng.choice(probs.size, p=probs / probs.sum()))
    if want in shown:
        p = shown.index(want)
        if rng.random() < 1.0 / math.log2(p + 2):
            return [p]
    return []


def first_call(scores: np.ndarray, check_every: int, min_n: int) -> int | None:
    """Interleaving: the first look n (a multiple of check_every) where |mean| > Z_SEQ * SE."""
    for n in range(min_n, scores.size + 1, check_every):
        s = scores[:n]
        se = s.std(ddof=1) / math.sqrt(n)
        if se > 0 and abs(s.mean()) > Z_SEQ * se:
            return n
    return None


def first_call_ab(arm_of: np.ndarray, clicks: np.ndarray, check_every: int, min_n: int) -> int | None:
    """A/B: the first look n where the difference of click-through exceeds Z_SEQ * SE."""
    for n in range(min_n, clicks.size + 1, check_every):
        diff, se = diff_ci(arm_of[:n], clicks[:n])
        if se > 0 and abs(diff) > Z_SEQ * se:
            return n
    return None


def ctr(clicks: np.ndarray) -> tuple[float, float]:
    """(rate, 95% half-width) of a 0/1 array."""
    n = max(clicks.size, 1)
    p = float(clicks.mean()) if clicks.size else 0.0
    return p, Z95 * math.sqrt(max(p * (1 - p), 1e-12) / n)


def diff_ci(arm_of: np.ndarray, clicks: np.ndarray) -> tuple[float, float]:
    """(B - A click-through, its standard error); arm_of: 0 = A, 1 = B."""
    a, b = clicks[arm_of == 0], clicks[arm_of == 1]
    if a.size < 2 or b.size < 2:
        return 0.0, 0.0
    pa, pb = a.mean(), b.mean()
    return float(pb - pa), math.sqrt(pa * (1 - pa) / a.size + pb * (1 - pb) / b.size)


def run_pair(client: TestClient, users: list[SimUser], truth: SyntheticTruth, a: str, b: str, repeat: int,
             n: int) -> dict[str, np.ndarray]:
    """n A/B impressions and n interleaved ones between versions a (arm "A") and b (arm "B")."""
    out: dict[str, np.ndarray] = {}
    for mode in ("ab", "interleave"):
        arms = [{"name": "A", "version": a}, {"name": "B", "version": b}]
        if mode == "ab":
            arms = [{**arm, "share": 0.5} for arm in arms]
        r = client.put("/v1/admin/experiment", json={"name": f"bench-{mode}", "mode": mode, "seed": repeat,
                                                     "arms": arms}, headers={"X-API-Key": KEY})
        assert r.status_code == 200, r.text
        rng = np.random.default_rng([repeat, 0 if mode == "ab" else 1])
        arm_of, clicks, score = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64)
        credit = np.zeros((n, 2), np.int64)
        for t in range(n):
            user = users[int(rng.integers(len(users)))]
            res = client.post("/v1/recommend", json={"user_id": user.user_id, "history": user.history, "k": K},
                              headers={"X-Request-ID": f"r{repeat}-{mode}-{t}"})
            assert res.status_code == 200, res.text
            body = res.json()
            shown = [it["item_id"] for it in body["items"]]
            pos = clicked_positions(user, truth, shown, rng)
            clicks[t] = int(bool(pos))
            if mode == "ab":
                arm_of[t] = 0 if body["arm"] == "A" else 1
                expected = a if body["arm"] == "A" else b
                assert body["model_version"] == expected
            else:
                for p in pos:
                    credit[t, 0 if body["items"][p]["source"] == "A" else 1] += 1
                score[t] = int(np.sign(credit[t, 1] - credit[t, 0]))  # +1: B's items got more clicks
        if mode == "ab":
            out["ab_arm"], out["ab_click"] = arm_of, clicks
        else:
            out["il_score"], out["il_credit"], out["il_click"] = score, credit, clicks
    return out


def report(label: str, a: str, b: str, runs: list[dict[str, np.ndarray]], check_every: int, min_n: int) -> list[str]:
    lines = [f"== {label}: arm A = {a}, arm B = {b} ==", "",
             "A/B (each user in one arm; click-through = impressions with a click / impressions, 95% CI)",
             f"{'repeat':>6}  {'impr A':>6}  {'CTR A':>15}  {'impr B':>6}  {'CTR B':>15}  {'B - A (95% CI)':>22}  "
             f"{'called at':>9}  winner"]
    ab_calls, il_calls = [], []
    for i, run in enumerate(runs):
        arm, clk = run["ab_arm"], run["ab_click"]
        (pa, ha), (pb, hb) = ctr(clk[arm == 0]), ctr(clk[arm == 1])
        diff, se = diff_ci(arm, clk)
        call = first_call_ab(arm, clk, check_every, min_n)
        ab_calls.append(call)
        winner = "-" if call is None else ("B" if diff_ci(arm[:call], clk[:call])[0] > 0 else "A")
        lines.append(f"{i:>6}  {int((arm == 0).sum()):>6}  {pa:.4f} ± {ha:.4f}  {int((arm == 1).sum()):>6}  "
                     f"{pb:.4f} ± {hb:.4f}  {diff:+.4f} ± {Z95 * se:.4f}  {call if call else 'never':>9}  {winner}")
    lines += ["", "Interleaving (team draft; per impression +1 if B's items got more clicks, -1 if A's, 0 on a tie)",
              f"{'repeat':>6}  {'impr':>6}  {'credited CTR A':>15}  {'credited CTR B':>15}  {'wins A':>6}  "
              f"{'wins B':>6}  {'ties':>6}  {'mean (95% CI)':>18}  {'called at':>9}  winner"]
    for i, run in enumerate(runs):
        s, cr = run["il_score"], run["il_credit"]
        n = s.size
        mean, half = float(s.mean()), Z95 * float(s.std(ddof=1)) / math.sqrt(n)
        call = first_call(s, check_every, min_n)
        il_calls.append(call)
        winner = "-" if call is None else ("B" if s[:call].mean() > 0 else "A")
        pa, pb = ctr((cr[:, 0] > 0).astype(np.int64)), ctr((cr[:, 1] > 0).astype(np.int64))
        lines.append(f"{i:>6}  {n:>6}  {pa[0]:.4f} ± {pa[1]:.4f}  {pb[0]:.4f} ± {pb[1]:.4f}  "
                     f"{int((s < 0).sum()):>6}  {int((s > 0).sum()):>6}  {int((s == 0).sum()):>6}  "
                     f"{mean:+.4f} ± {half:.4f}  {call if call else 'never':>9}  {winner}")

    def summary(calls: list[int | None]) -> str:
        made = [c for c in calls if c is not None]
        med = f"median {int(np.median(made))}" if made else "no call"
        return f"called in {len(made)}/{len(calls)} repeats, {med} impressions ({', '.join(map(str, calls))})"

    lines += ["", f"impressions to call it (|stat| > {Z_SEQ} SE at a look every {check_every}, from {min_n}):",
              f"  A/B:          {summary(ab_calls)}", f"  interleaving: {summary(il_calls)}", ""]
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", type=Path, required=True)
    p.add_argument("--good", default=None, help="the good version (default: CURRENT)")
    p.add_argument("--worse", action="append", default=None,
                   help=f"a worse version (repeatable; default: {WORSE!r}, published here when missing)")
    p.add_argument("--runs", type=Path, default=None,
                   help=f"the good version's checkpoints (`recsys demo --out`): also compare with them published "
                        f"without the item-to-item route ({NO_ROUTE!r})")
    p.add_argument("--impressions", type=int, default=1000, help="per method, per repeat")
    p.add_argument("--aa-impressions", type=int, default=None, help="per method, per A/A repeat (default: same)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--check-every", type=int, default=10)
    p.add_argument("--min-impressions", type=int, default=20)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    root: Path = args.artifacts
    good = args.good or read_current(root)
    if good is None:
        raise SystemExit(f"{root}: no CURRENT")
    spec = Manifest.load(root / good / MANIFEST).data.spec or ""
    t0 = time.perf_counter()
    worse = list(args.worse or [WORSE if (root / WORSE).is_dir() else publish_random_init(root, spec, good)])
    if args.runs is not None:
        worse.append(NO_ROUTE if (root / NO_ROUTE).is_dir() else publish_without_route(root, spec, good, args.runs))
    users, truth = world(spec)
    lines = [f"$ python {shlex.join(sys.argv)}", "",
             f"data {spec}: {len(users)} simulated users; k = {K}; the good version {good}, the worse {', '.join(worse)}", ""]
    settings = Settings(artifacts=root, api_key=KEY, timeout_ms=60_000, reload_poll_s=0)  # no stage skipped
    with TestClient(create_app(settings)) as client:
        pairs = [(f"good vs worse ({w})", good, w, args.impressions) for w in worse]
        pairs.append(("A/A: good vs itself", good, good, args.aa_impressions or args.impressions))
        for label, a, b, n in pairs:
            runs = [run_pair(client, users, truth, a, b, r, n) for r in range(args.repeats)]
            lines += report(label, a, b, runs, args.check_every, args.min_impressions)
            print("\n".join(lines[-(8 + 2 * args.repeats):]), flush=True)
        client.delete("/v1/admin/experiment", headers={"X-API-Key": KEY})
    finish_report(lines, t0, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
