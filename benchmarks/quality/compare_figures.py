"""Compare the figures of two benchmarks/quality/fixed_seed_figures.sh runs (before / after): every number of
the training results, the exported manifest and `recsys evaluate --artifacts`, timings left out.

    python benchmarks/quality/compare_figures.py OUT_BEFORE OUT_AFTER
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FILES = ("upstream.json", "retrieval.json", "prerank.json", "rerank.json", "evaluate.json", "artifacts/v1/manifest.json")
# wall times and throughput differ from run to run; paths differ between the two output folders
SKIP = ("seconds", "p50_ms", "p95_ms", "p99_ms", "sequences_per_s", "created_at", "source", "path")


def numbers(x: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(x, dict):
        for k, v in x.items():
            yield from numbers(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(x, list) and all(isinstance(v, (int, float)) for v in x):
        yield prefix, tuple(x)
    elif isinstance(x, (int, float)):
        yield prefix, x


def main(before: Path, after: Path) -> int:
    same, diffs = 0, []
    for name in FILES:
        a = {k: v for k, v in numbers(json.loads((before / name).read_text())) if not any(s in k for s in SKIP)}
        b = {k: v for k, v in numbers(json.loads((after / name).read_text())) if not any(s in k for s in SKIP)}
        for key in sorted(set(a) | set(b)):
            if a.get(key) == b.get(key):
                same += 1
            else:
                diffs.append(f"DIFF {name}:{key}: before {a.get(key)} after {b.get(key)}")
    ev_a = json.loads((before / "evaluate.json").read_text())["cuts"]
    ev_b = json.loads((after / "evaluate.json").read_text())["cuts"]
    print(f"{'cut':10s} {'metric':12s} {'before':>10s} {'after':>10s}")
    for cut, m in ev_a.items():
        for metric in ("HR@10", "NDCG@10", "HR@50", "NDCG@50", "Coverage@10"):
            print(f"{cut:10s} {metric:12s} {m[metric]:10.6f} {ev_b[cut][metric]:10.6f}")
    print("\n".join(diffs))
    print(f"{same} numbers equal, {len(diffs)} differ (timings and paths left out) across {', '.join(FILES)}")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
