"""Team-draft interleaving (service/interleave.py) against the properties of its definition
(Radlinski et al. 2008): fair alternation, no repeats, each team in its own order, seeded coins,
clicks credited to the contributing team, and no preference from clicks that ignore the items."""

from __future__ import annotations

import math

import numpy as np
import pytest

from service.interleave import TEAM_A, TEAM_B, credit, team_draft, winner


def _rankings(rng: np.random.Generator, n_items: int, length: int) -> tuple[list[int], list[int]]:
    """Two rankings over the same small catalog, so they overlap."""
    return (rng.permutation(n_items)[:length].tolist(), rng.permutation(n_items)[:length].tolist())


@pytest.mark.parametrize("k", [1, 2, 5, 10])
def test_team_draft_properties(k: int) -> None:
    rng = np.random.default_rng(0)
    for trial in range(300):
        a, b = _rankings(rng, 15, k + int(rng.integers(0, 5)))  # each list has >= k items
        picks = team_draft(a, b, k, np.random.default_rng(trial))
        items = [p.item for p in picks]
        assert len(items) == k and len(set(items)) == k  # k items, none twice
        teams = [p.team for p in picks]
        for n in range(1, k + 1):  # fair alternation at every prefix: the teams differ by at most one pick
            assert abs(teams[:n].count(TEAM_A) - teams[:n].count(TEAM_B)) <= 1
        assert max(teams.count(TEAM_A), teams.count(TEAM_B)) <= math.ceil(k / 2)
        for p in picks:  # the pick is that team's own item, at the index recorded
            assert (a if p.team == TEAM_A else b)[p.index] == p.item
        for team, src in ((TEAM_A, a), (TEAM_B, b)):
            idx = [p.index for p in picks if p.team == team]
            assert idx == sorted(idx)  # a team's items keep their order in its ranking
        for n, p in enumerate(picks):  # each pick is the team's best item not already shown
            src = a if p.team == TEAM_A else b
            earlier = set(items[:n])
            assert p.item == next(x for x in src if x not in earlier)


def test_identical_rankings_come_back_unchanged() -> None:
    a = list(range(20))
    for seed in range(20):
        picks = team_draft(a, list(a), 10, np.random.default_rng(seed))
        assert [p.item for p in picks] == a[:10]


def test_short_lists_fill_from_the_other_and_stop_when_both_run_out() -> None:
    picks = team_draft([1, 2], [3, 4, 5, 6, 7], 6, np.random.default_rng(0))
    assert sorted(p.item for p in picks) == [1, 2, 3, 4, 5, 6]
    assert len(team_draft([1, 2], [2, 1], 10, np.random.default_rng(0))) == 2
    assert team_draft([], [], 3, np.random.default_rng(0)) == []
    with pytest.raises(ValueError, match="k must be >= 0"):
        team_draft([1], [2], -1, np.random.default_rng(0))


def test_coin_flips_follow_the_seed() -> None:
    a, b = list(range(0, 40, 2)), list(range(1, 40, 2))  # disjoint: only the coins decide the order
    runs = {seed: [p.team for p in team_draft(a, b, 10, np.random.default_rng(seed))] for seed in range(400)}
    assert runs[7] == [p.team for p in team_draft(a, b, 10, np.random.default_rng(7))]  # same seed, same list
    assert len({tuple(t) for t in runs.values()}) > 20  # different seeds, different lists
    first_a = sum(t[0] == TEAM_A for t in runs.values())
    assert abs(first_a - 200) < 4 * math.sqrt(400 * 0.25)  # a fair coin picks first


def test_credit_goes_to_the_team_that_contributed_the_clicked_item() -> None:
    a, b = [10, 11, 12, 13], [20, 21, 22, 23]
    picks = team_draft(a, b, 4, np.random.default_rng(3))
    pos_a = [i for i, p in enumerate(picks) if p.item in a]
    pos_b = [i for i, p in enumerate(picks) if p.item in b]
    assert credit(picks, pos_a) == (len(pos_a), 0)
    assert credit(picks, pos_b) == (0, len(pos_b))
    assert winner(picks, pos_a[:1]) == TEAM_A and winner(picks, pos_b[:1]) == TEAM_B
    assert winner(picks, [pos_a[0], pos_b[0]]) is None and winner(picks, []) is None
    # a shared item counts for the team that placed it in the merged list
    shared = team_draft([1, 2, 3], [1, 4, 5], 3, np.random.default_rng(0))
    assert credit(shared, [0]) == ((1, 0) if shared[0].team == TEAM_A else (0, 1))


def test_clicks_blind_to_the_items_prefer_neither_ranker() -> None:
    """A user who clicks positions, not items (position bias only), must not make either ranker
    win: the property that makes team draft unbiased."""
    rng = np.random.default_rng(1)
    wins = [0, 0]
    for trial in range(2000):
        a, b = _rankings(rng, 30, 10)
        picks = team_draft(a, b, 10, np.random.default_rng(trial))
        examine = rng.random(10) < 1.0 / np.log2(np.arange(2, 12))  # clicks fall off with position
        w = winner(picks, np.flatnonzero(examine & (rng.random(10) < 0.3)).tolist())
        if w is not None:
            wins[w] += 1
    n = sum(wins)
    assert n > 500
    assert abs(wins[TEAM_A] - n / 2) < 4 * math.sqrt(n * 0.25)


def test_clicks_on_the_better_rankers_items_make_it_win() -> None:
    """The other direction: a user who clicks only items A ranks in its top 3 makes A win."""
    rng = np.random.default_rng(2)
    wins = [0, 0]
    for trial in range(300):
        a, b = _rankings(rng, 30, 10)
        picks = team_draft(a, b, 10, np.random.default_rng(trial))
        w = winner(picks, [i for i, p in enumerate(picks) if p.item in a[:3]])
        if w is not None:
            wins[w] += 1
    assert wins[TEAM_A] > 3 * wins[TEAM_B]
