"""The coordinate search over the item-to-item route's request settings (beta, candidates, recent,
decay): at publish on the served retrieval cut (training/publish/route_tuning.py, whose module
doc describes the search) and when the rankers' training lists are made
(training/stages/prerank/lists.py), so the rankers learn on the route as it is served."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence

from service.item2item import DEFAULT_SERVING
from training.eval.served_eval import METRIC

Setting = dict[str, float]
# the values tried per setting, swept in ORDER. beta reaches 64, where the route's order decides
# (route scores are scaled to max 1 and FAISS's spread to sd(r), so 64 sd outweighs any encoder gap):
# where the encoder is far weaker than the route (an under-trained one), the cut may follow the route.
# 16 was the top value chosen on both the synthetic default and ml-100k with the demo's budget, so a
# grid ending there was binding
GRID: dict[str, tuple[float, ...]] = {
    "beta": (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0),
    "candidates": (20, 50),
    "recent": (1, 3, 8),
    "decay": (0.6, 1.0),
}
ORDER = ("beta", "candidates", "recent", "decay")
START: Setting = {k: float(v) for k, v in DEFAULT_SERVING.items()}  # the ml-100k choice: a sensible start
MAX_PASSES = 3
TOP = 10  # NDCG@10: ranks past this are misses

Measure = Callable[[Setting], float]
"""settings -> NDCG@10 of the retrieval cut served with them."""


def check_grid(grid: Mapping[str, Sequence[float]], start: Setting) -> None:
    """ValueError naming a setting that is missing, unknown, empty or whose start is not in it."""
    if set(grid) != set(ORDER):
        raise ValueError(f"route tuning grid must set exactly {sorted(ORDER)}, got {sorted(grid)}")
    for name in ORDER:
        if not grid[name]:
            raise ValueError(f"route tuning grid: {name} has no values")
        if start[name] not in grid[name]:
            raise ValueError(f"route tuning start {name}={start[name]} is not among its grid values {list(grid[name])}")


def coordinate_search(measure: Measure, grid: Mapping[str, Sequence[float]] = GRID,
                      start: Setting | None = None) -> tuple[Setting, list[dict[str, float]]]:
    """The best setting found (see the module doc) and every setting measured with its NDCG@10.
    Each setting is measured once; the best is the highest NDCG@10 of all measured, ties to the
    cheaper setting (rank below)."""
    start = dict(START if start is None else start)
    check_grid(grid, start)
    seen: dict[tuple[float, ...], float] = {}
    tried: list[dict[str, float]] = []

    def key(s: Setting) -> tuple[float, ...]:
        return tuple(float(s[name]) for name in ORDER)

    def rank(s: Setting) -> tuple[float, ...]:  # smaller is better: NDCG@10, then the cheaper setting
        return (-seen[key(s)], s["beta"], s["candidates"], s["recent"], -s["decay"])

    def score(s: Setting) -> float:
        if key(s) not in seen:
            seen[key(s)] = float(measure(s))
            tried.append({**s, METRIC: seen[key(s)]})
        return seen[key(s)]

    best = start
    score(best)
    settled: set[str] = set()  # settings swept at the current best without a move
    for name in itertools.islice(itertools.cycle(ORDER), MAX_PASSES * len(ORDER)):
        moved = False
        for value in grid[name]:
            s = {**best, name: float(value)}
            score(s)
            if rank(s) < rank(best):
                best, moved = s, True
        settled = {name} if moved else settled | {name}
        if settled == set(ORDER):  # no single setting improves on best
            break
    return best, tried
