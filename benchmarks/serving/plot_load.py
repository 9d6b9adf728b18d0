"""PNG of latency percentiles against request rate from benchmarks/serving/load_test.py JSON outputs.

    python benchmarks/serving/plot_load.py benchmarks/serving/results/load_*.json --out benchmarks/serving/results/load_latency.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--p99-limit-ms", type=float, default=100.0)
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.runs), figsize=(5 * len(args.runs), 4), squeeze=False, sharey=True)
    for ax, path in zip(axes[0], args.runs):
        run = json.loads(path.read_text())
        rates = [r["rate"] for r in run["rates"]]
        for key, style in (("p50", "-o"), ("p95", "-s"), ("p99", "-^")):
            ax.plot(rates, [r[key] for r in run["rates"]], style, label=key, markersize=4)
        ax.axhline(args.p99_limit_ms, color="grey", linestyle="--", linewidth=1, label=f"{args.p99_limit_ms:.0f} ms")
        ax.set_yscale("log")
        ax.set_title(f"{run['name'].split('(')[0]}: {run['items']:,} items")
        ax.set_xlabel("offered rate (requests/s)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("latency from scheduled send (ms)")
    axes[0][0].legend()
    fig.suptitle("POST /v1/recommend on loopback, 2-core machine (benchmarks/serving/load_test.py)")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
