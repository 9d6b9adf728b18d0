"""Plain-text tables and the JSON result files every command writes."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DEFAULT_COLUMNS = ("HR@1", "HR@10", "HR@50", "NDCG@10", "NDCG@50", "MRR", "Coverage@10")


def table(rows: Mapping[str, Mapping[str, float]], columns: Sequence[str] = DEFAULT_COLUMNS) -> str:
    """Rows keyed by model name; columns missing from a row print as '-'."""
    name_w = max([len("model"), *(len(r) for r in rows)])
    widths = [max(len(c), 7) for c in columns]
    head = "  ".join(["model".ljust(name_w), *(c.rjust(w) for c, w in zip(columns, widths))])
    lines = [head, "-" * len(head)]
    for name, metrics in rows.items():
        cells = []
        for c, w in zip(columns, widths):
            v = metrics.get(c)
            cells.append(_fmt(v).rjust(w))
        lines.append("  ".join([name.ljust(name_w), *cells]))
    return "\n".join(lines)


def _fmt(v: float | int | None) -> str:
    if v is None:
        return "-"
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    if v != 0 and abs(v) < 1e-3:
        return f"{v:.1e}"
    return f"{v:.4f}"


def write_json(path: str | Path, payload: Mapping[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def result(model: str, data: str, metrics: Mapping[str, float], **extra: Any) -> dict[str, Any]:
    """The shared result shape: {"model", "data", "metrics", ...extra}."""
    return {"model": model, "data": data, "metrics": dict(metrics), **extra}


def finish_report(lines: Sequence[str], started: float, out: str | Path | None) -> None:
    """A benchmark's last step: its lines and then "wall time N s" (since perf_counter() was
    `started`), printed, and written to `out` when given (its folder made)."""
    text = "\n".join([*lines, f"wall time {time.perf_counter() - started:.0f} s"]) + "\n"
    print(text)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def save_benchmark(out: str | Path, text: str) -> None:
    """Write a benchmark's printed text, preceded by the command line that produced it."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    path.write_text(f"$ python {command}\n{text}")


@contextmanager
def timed(label: str, timings: dict[str, float]) -> Iterator[None]:
    """Record the wall time of a block under `label` and report it on stderr."""
    start = time.perf_counter()
    yield
    timings[label] = round(time.perf_counter() - start, 3)
    print(f"[{label}] {timings[label]:.2f}s", file=sys.stderr)
