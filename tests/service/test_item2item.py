"""The item-to-item route at request time (service/item2item.py), on hand-made tables."""

from __future__ import annotations

import numpy as np
import pytest

from service.item2item import Item2ItemRoute, merge_routes, top_route

# 6 items; row i = the neighbours of item i
NB = np.array([[0, 0], [2, 3], [3, 0], [4, 1], [0, 0], [6, 0], [0, 0]], np.int32)
SC = np.array([[0, 0], [0.5, 0.25], [0.8, 0], [1.0, 0.1], [0, 0], [0.3, 0], [0, 0]], np.float32)


def route(**kw: float) -> Item2ItemRoute:
    return Item2ItemRoute(NB, SC, **kw)  # type: ignore[arg-type]


def test_route_scores_recent_items_with_decay_and_drops_banned() -> None:
    r = route(recent=2, decay=0.5)
    # history oldest first: 5, 1, 2 -> recent = 2 (age 0), 1 (age 1); 5 is too old
    items, scores = r.score(np.array([5, 1, 2]), banned=np.array([5, 1, 2]))
    # from 2: 3 (0.8); from 1 (x 0.5): 2 banned, 3 (0.25 * 0.5)
    assert items.tolist() == [3]
    assert scores.tolist() == pytest.approx([0.8 + 0.125])
    items, scores = r.score(np.array([5, 1, 3]), banned=np.array([]))
    # from 3: 4 (1.0), 1 (0.1); from 1 (x 0.5): 2 (0.25), 3 (0.125)
    assert items.tolist() == [1, 2, 3, 4]
    assert scores.tolist() == pytest.approx([0.1, 0.25, 0.125, 1.0])
    assert top_route(items, scores, 2)[0].tolist() == [4, 2]


def test_merge_pulls_the_neighbour_in_and_keeps_both_scores() -> None:
    items = np.eye(6, 2, dtype=np.float32) + 0.1  # (N, D): item 1 = [1.1, 0.1], item 2 = [0.1, 1.1], others 0.1
    user = np.array([[1.0, 0.0], [0.0, 0.5]], np.float32)  # (M, D)
    cand, fused, launchers = np.array([1, 5]), np.array([1.1, 0.1], np.float32), np.array([0, 0])
    r = route(recent=1, beta=2.0, candidates=2)
    # last item 3: neighbours 4 (1.0) and 1 (0.1); 3 itself is seen
    m = merge_routes(cand, fused, launchers, r, np.array([3]), np.array([3]), user, items)
    by_item = {int(i): j for j, i in enumerate(m.items)}
    assert set(by_item) == {1, 4, 5}
    j4, j1, j5 = by_item[4], by_item[1], by_item[5]
    # item 4 came from the route only: its retrieval score is max_l <u_l, e_4> computed exactly
    assert not m.by_faiss[j4] and m.retrieval[j4] == pytest.approx(max(0.1, 0.05))
    # merged = r + beta * sd(FAISS scores) * i2i / max i2i; sd([1.1, 0.1]) = 0.5
    assert m.i2i[j4] == pytest.approx(1.0) and m.merged[j4] == pytest.approx(0.1 + 2.0 * 0.5)
    # item 1: found by both, keeps both scores
    assert m.by_faiss[j1] and m.retrieval[j1] == pytest.approx(1.1) and m.i2i[j1] == pytest.approx(0.1)
    assert m.merged[j1] == pytest.approx(1.1 + 2.0 * 0.5 * 0.1)
    assert m.i2i[j5] == 0 and m.merged[j5] == pytest.approx(0.1)
    assert m.items.tolist() == [1, 4, 5]  # merged order


def test_bad_tables_and_settings_are_refused() -> None:
    with pytest.raises(ValueError, match=r"expected \(8, R\)"):
        Item2ItemRoute.from_arrays({"neighbours": NB, "scores": SC}, num_items=7)
    with pytest.raises(ValueError, match=r"outside 0\.\.6"):
        Item2ItemRoute.from_arrays({"neighbours": np.where(NB > 0, 9, 0).astype(np.int32), "scores": SC}, num_items=6)
    with pytest.raises(ValueError, match="decay"):
        route(decay=0.0)
