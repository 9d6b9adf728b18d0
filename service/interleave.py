"""Team-draft interleaving (Radlinski, Kurup & Joachims, "How does clickthrough data reflect
retrieval quality?", CIKM 2008, Algorithm 2), written from its definition.

Two rankers A and B each pick a team of items, as captains pick players: in every round the team
with fewer picks goes next, and when both have picked as many, a fair coin decides; a team picks
its highest-ranked item not already in the merged list. A click on the merged list is credited to
the team that contributed the clicked item; the ranker whose team got more clicks wins the
impression (a tie credits neither). Because each team's items sit at the positions they would
have had under fair alternation, position bias cancels in expectation.

When one list runs out of new items the other fills the remaining slots (the paper stops there;
an answer must still have k items when it can). The coin flips come from the generator handed in,
seeded per request by the caller, so an answer can be reproduced.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

T = TypeVar("T")

TEAM_A = 0
TEAM_B = 1


@dataclass(frozen=True)
class Pick:
    """One slot of the merged list: `index` into the contributing team's list (A's or B's)."""

    item: object
    team: int  # TEAM_A or TEAM_B
    index: int


def team_draft(a: Sequence[T], b: Sequence[T], k: int, rng: np.random.Generator) -> list[Pick]:
    """Merge rankings `a` and `b` (best first, each without repeats) into at most k picks."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    lists = (a, b)
    merged: list[Pick] = []
    taken: set[object] = set()
    cursor = [0, 0]  # the next position of each list to look at
    teams = [0, 0]  # picks per team

    def next_new(team: int) -> int | None:
        src = lists[team]
        while cursor[team] < len(src) and src[cursor[team]] in taken:
            cursor[team] += 1
        return cursor[team] if cursor[team] < len(src) else None

    while len(merged) < k:
        heads = (next_new(TEAM_A), next_new(TEAM_B))
        if heads[TEAM_A] is None and heads[TEAM_B] is None:
            break
        if heads[TEAM_A] is None:
            team = TEAM_B
        elif heads[TEAM_B] is None:
            team = TEAM_A
        elif teams[TEAM_A] != teams[TEAM_B]:
            team = TEAM_A if teams[TEAM_A] < teams[TEAM_B] else TEAM_B
        else:
            team = TEAM_A if rng.random() < 0.5 else TEAM_B  # the coin: only when the teams are level
        index = heads[team]
        assert index is not None
        item = lists[team][index]
        merged.append(Pick(item, team, index))
        taken.add(item)
        teams[team] += 1
    return merged


def credit(picks: Sequence[Pick], clicked: Sequence[int]) -> tuple[int, int]:
    """Clicks credited to (A, B) for the clicked positions (0-based) of the merged list."""
    counts = [0, 0]
    for pos in clicked:
        counts[picks[pos].team] += 1
    return counts[TEAM_A], counts[TEAM_B]


def winner(picks: Sequence[Pick], clicked: Sequence[int]) -> int | None:
    """TEAM_A or TEAM_B: the team with more credited clicks; None on a tie (no clicks included)."""
    ca, cb = credit(picks, clicked)
    return None if ca == cb else (TEAM_A if ca > cb else TEAM_B)
