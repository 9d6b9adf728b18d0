"""Per-stage compute of several versions on the same histories, interleaved in one run.

    python benchmarks/serving/stage_floor.py --artifacts A B ... --data SPEC [--reps 2000] [--rounds 3]
        [--route-candidates N] [--retrieval-k K]

The floor of benchmarks/serving/load_test.py (encode, search, fuse, the item-to-item merge, pre-rank
(with the pair features and their prior where the version has them), re-rank; one thread, no HTTP
or store; pairfeat = service/pair_features.py alone, candidates = the median list length) for each version's CURRENT, on the leave-one-out test histories of SPEC. The
versions take turns for --rounds rounds, so a noisy machine slows them alike; p50 per stage is
the median over every round's requests. Ratios are against the first version.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_test import floor  # noqa: E402

from training.data.sources import load  # noqa: E402
from training.data.splits import LeaveOneOut  # noqa: E402

# pairfeat: the pair features alone (part of prerank, timed again apart, not in sum); candidates: C per request
STAGES = ("encode", "search", "fuse", "item2item", "prerank", "rerank", "sum", "pairfeat", "candidates")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", nargs="+", required=True, type=Path)
    ap.add_argument("--data", required=True)
    ap.add_argument("--reps", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--route-candidates", type=int, help="override item2item.serving candidates (e.g. 50: ~250 per list)")
    ap.add_argument("--retrieval-k", type=int, default=200, help="FAISS candidates per request (the service's default 200)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    ds = load(a.data)
    loo = LeaveOneOut(ds)
    histories = [[str(ds.item_ids[i]) for i in row if i] for row in loo.histories("test", maxlen=50)]
    runs: dict[Path, dict[str, list[np.ndarray]]] = {p: {s: [] for s in STAGES} for p in a.artifacts}
    for _ in range(a.rounds):
        for p in a.artifacts:
            for stage, ms in floor(p, histories, a.reps, a.route_candidates, a.retrieval_k).items():
                runs[p][stage].append(ms)
    lines = [f"# python {' '.join(shlex.quote(x) for x in sys.argv)}",
             f"# p50 ms per stage ({a.rounds} interleaved rounds x {a.reps} requests, one thread)",
             f"{'version':<40} " + " ".join(f"{s:>8}" for s in STAGES) + "  sum/first"]
    first = None
    for p, stages in runs.items():
        p50 = {s: float(np.median(np.concatenate(v))) for s, v in stages.items()}
        first = first or p50["sum"]
        lines.append(f"{str(p)[-40:]:<40} " + " ".join(f"{p50[s]:8.3f}" for s in STAGES) + f"  {p50['sum'] / first:8.3f}")
    text = "\n".join(lines)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
