"""PNG figures for `--plot`: a training run's per-epoch curves (`recsys train <stage> --plot`) and a
version's served cuts beside the trivial baselines (`recsys evaluate --plot`).

matplotlib (in the `train` and `bench` extras) is imported only when a figure is drawn, and drawn
on a `Figure` of its own (no pyplot: no global state, no display needed). Each function returns
the figure; `save` writes it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

LOSS = "loss"
VALID_PREFIX = "valid_"  # validation metrics in every trainer's history (valid_ndcg10, valid_AUC, ...)
BASELINE_COLOR, CUT_COLOR, SERVED_COLOR = "#9e9e9e", "#7aa6d6", "#1f5fa8"
CUT_LABELS = {"retrieval": "retrieval", "prerank": "+ prerank", "rerank": "+ rerank"}
# the trainers' history keys as the tables print them
METRIC_NAMES = {"ndcg10": "NDCG@10", "slate_acc": "slate accuracy"}


def require() -> None:
    """Import matplotlib now (ModuleNotFoundError if absent): a command checks before hours of
    training, not after."""
    import matplotlib  # noqa: F401


def _figure(ncols: int, width: float = 4.2, height: float = 3.4) -> tuple["Figure", list[Any]]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def history_figure(runs: Mapping[str, Sequence[Mapping[str, Any]]], title: str) -> "Figure":
    """Training loss and each validation metric against the epoch, one line per run.

    runs: run name -> its per-epoch history, rows like {"epoch": 1, "loss": 0.8, "valid_ndcg10": 0.1}
    (the trainers' `history`). A row without a loss (an epoch-0 score of the weights as given)
    adds only its validation point; non-numeric and NaN values are left out.
    """
    from matplotlib.ticker import MaxNLocator

    metrics = sorted({k for h in runs.values() for row in h for k in row
                      if k.startswith(VALID_PREFIX) and _number(row[k]) is not None})
    panels = [LOSS, *metrics]
    fig, axes = _figure(len(panels))
    for ax, key in zip(axes, panels):
        for name, history in runs.items():
            points = [(row["epoch"], _number(row.get(key))) for row in history]
            xs = [e for e, v in points if v is not None]
            ys = [v for _, v in points if v is not None]
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, label=name)
        metric = key.removeprefix(VALID_PREFIX)
        ax.set_title("training loss" if key == LOSS else f"validation {METRIC_NAMES.get(metric, metric)}")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize="small")
    fig.suptitle(title)
    return fig


def served_figure(cuts: Mapping[str, Mapping[str, float]], baselines: Mapping[str, Mapping[str, float]],
                  served: Sequence[str], title: str, metrics: Sequence[str] = ("NDCG@10", "HR@10")) -> "Figure":
    """One horizontal bar per served cut (retrieval, + prerank, + rerank) and per trivial baseline
    on the same users, one panel per metric; the cut served by default is the dark bar, marked *."""
    rows: list[tuple[str, Mapping[str, float], str]] = []
    for name, m in cuts.items():
        last = bool(served) and name == served[-1]
        rows.append((CUT_LABELS.get(name, name) + (" *" if last else ""), m, SERVED_COLOR if last else CUT_COLOR))
    rows += [(f"baseline {name}", m, BASELINE_COLOR) for name, m in baselines.items()]
    fig, axes = _figure(len(metrics), width=4.6, height=0.9 + 0.42 * len(rows))
    for ax, metric in zip(axes, metrics):
        labels = [r[0] for r in rows][::-1]  # first row on top
        values = [float(r[1].get(metric, math.nan)) for r in rows][::-1]
        bars = ax.barh(labels, values, color=[r[2] for r in rows][::-1])
        ax.bar_label(bars, fmt="%.4f", padding=2, fontsize="small")
        ax.set_title(metric)
        ax.set_xlim(0, max([v for v in values if math.isfinite(v)] or [1.0]) * 1.25)
        ax.grid(axis="x", alpha=0.3)
        if ax is not axes[0]:
            ax.tick_params(labelleft=False)
    fig.suptitle(title)
    return fig


def at_k_figure(rows: Mapping[str, Mapping[str, float]], title: str, families: Sequence[str] = ("HR", "NDCG")) -> "Figure":
    """HR@K and NDCG@K against K (log scale), one line per model: `recsys evaluate` of a baseline."""
    fig, axes = _figure(len(families))
    for ax, family in zip(axes, families):
        for name, m in rows.items():
            ks = sorted(int(k.split("@")[1]) for k in m if k.startswith(f"{family}@"))
            ax.plot(ks, [m[f"{family}@{k}"] for k in ks], marker="o", label=name)
        ax.set_xscale("log")
        ax.set_xlabel("K")
        ax.set_title(f"{family}@K")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    return fig


def save(fig: "Figure", path: str | Path) -> Path:
    """Write the figure as PNG (parent folders made); the path written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)
    return path
