"""Online metrics per version and experiment arm, from the joined impression and event logs
(DESIGN.md §8; the records: service/contract/online_log.py).

Attribution: an event with a ``request_id`` is credited to that impression when it showed the
item; any other event goes to the user's latest impression at most ``window_s`` before it that
showed the item (no such impression: the event is counted as unattributed). Every attributed
event is a click; one item of one impression counts once however many events it gets.

Per group (experiment, arm, version), with 95 % Wilson score intervals (z = 1.96) on every rate:

- ``impressions``: lists logged (a sampled log: each stands for 1 / sampled lists);
- ``ctr_at_position[p]``: clicked / shown at 0-based position p;
- ``ctr_at_k[k]``: clicked / shown among the first k positions (slots);
- ``hit_rate_at_k[k]``: impressions with at least one click among their first k / impressions;
- ``coverage``: distinct items served, and their share of the catalog when its size is known.

Interleaved impressions (items carrying a ``source``) also credit each click to its source, and
each impression to the source with more clicks (``wins``; equal clicks = ``ties``); the win share
of each source among decided impressions gets a Wilson interval.

The join is incremental: :meth:`OnlineJoin.add_impression` / :meth:`OnlineJoin.add_event` in log
order; state older than the window is dropped as time advances.
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from service.contract.online_log import Impression, LoggedEvent, load_event, load_impression
from service.online_log import LogReader

Z95 = 1.96
KS = (1, 5, 10, 20)
Group = tuple[str | None, str | None, str]  # experiment, arm, version


def wilson(successes: int, n: int, z: float = Z95) -> dict[str, float | int | None]:
    """{rate, low, high, successes, n}: the Wilson score interval of successes / n (None rates for n = 0)."""
    if n <= 0:
        return {"rate": None, "low": None, "high": None, "successes": successes, "n": n}
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return {"rate": p, "low": max(centre - half, 0.0), "high": min(centre + half, 1.0), "successes": successes,
            "n": n}


@dataclass
class _Counts:
    impressions: int = 0
    shown: dict[int, int] = field(default_factory=lambda: defaultdict(int))  # position -> slots shown
    clicked: dict[int, int] = field(default_factory=lambda: defaultdict(int))  # position -> slots clicked
    hits: dict[int, int] = field(default_factory=lambda: defaultdict(int))  # k -> impressions with a click < k
    items: set[str] = field(default_factory=set)


@dataclass
class _Open:
    """An impression still inside the attribution window."""

    imp: Impression
    group: Group
    positions: dict[str, int]  # item -> first position
    clicked: set[int] = field(default_factory=set)
    by_source: dict[str, int] = field(default_factory=dict)  # interleaving: source -> clicks


class OnlineJoin:
    """Impressions and events in, per-group counts out. Not thread-safe (OnlineMetrics locks)."""

    def __init__(self, window_s: float, ks: tuple[int, ...] = KS) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s: must be > 0, got {window_s}")
        self.window_s, self.ks = window_s, ks
        self.counts: dict[Group, _Counts] = defaultdict(_Counts)
        self.events = 0
        self.attributed = {"request_id": 0, "window": 0}
        self.duplicate_clicks = 0
        self._by_request: dict[str, _Open] = {}
        self._by_user: dict[str, deque[_Open]] = defaultdict(deque)
        self._order: deque[_Open] = deque()  # by arrival, to expire
        self._credit: dict[tuple[str | None, str], int] = defaultdict(int)  # (experiment, source) -> clicks
        self._wins: dict[tuple[str | None, str], int] = defaultdict(int)
        self._ties: dict[str | None, int] = defaultdict(int)
        self._latest = 0.0

    def add_impression(self, imp: Impression) -> None:
        group = (imp.experiment, imp.arm, imp.version)
        c = self.counts[group]
        c.impressions += 1
        for it in imp.items:
            c.shown[it.position] += 1
            c.items.add(it.item_id)
        positions: dict[str, int] = {}
        for it in imp.items:
            positions.setdefault(it.item_id, it.position)
        o = _Open(imp, group, positions)
        self._by_request[imp.request_id] = o
        if imp.user_id is not None:
            self._by_user[imp.user_id].append(o)
        self._order.append(o)
        self._advance(imp.ts)

    def add_event(self, ev: LoggedEvent) -> bool:
        """Attribute one event; True when credited to an impression."""
        self.events += 1
        o = self._by_request.get(ev.request_id) if ev.request_id is not None else None
        how = "request_id"
        if o is None or ev.item_id not in o.positions:
            o, how = self._latest_showing(ev), "window"
        self._advance(ev.ts)
        if o is None:
            return False
        self.attributed[how] += 1
        self._click(o, o.positions[ev.item_id])
        return True

    def _latest_showing(self, ev: LoggedEvent) -> _Open | None:
        for o in reversed(self._by_user.get(ev.user_id, ())):
            if o.imp.ts <= ev.ts + 1.0 and ev.ts - o.imp.ts <= self.window_s and ev.item_id in o.positions:
                return o  # +1 s: the client's clock may run a little behind the server's
        return None

    def _click(self, o: _Open, pos: int) -> None:
        if pos in o.clicked:
            self.duplicate_clicks += 1
            return
        c = self.counts[o.group]
        before = min(o.clicked, default=math.inf)
        o.clicked.add(pos)
        c.clicked[pos] += 1
        for k in self.ks:
            if pos < k <= before:
                c.hits[k] += 1
        source = next((it.source for it in o.imp.items if it.position == pos), None)
        if source is not None:
            exp = o.imp.experiment
            old = _winner(o.by_source)
            o.by_source[source] = o.by_source.get(source, 0) + 1
            self._credit[(exp, source)] += 1
            new = _winner(o.by_source)
            if old != new:
                self._tally(exp, old, -1)
                self._tally(exp, new, +1)

    def _tally(self, exp: str | None, outcome: str | None, d: int) -> None:
        if outcome == "":
            self._ties[exp] += d
        elif outcome is not None:
            self._wins[(exp, outcome)] += d

    def _advance(self, ts: float) -> None:
        """Drop impressions that no later event can reach (older than the window)."""
        self._latest = max(self._latest, ts)
        horizon = self._latest - self.window_s - 1.0
        while self._order and self._order[0].imp.ts < horizon:
            o = self._order.popleft()
            if self._by_request.get(o.imp.request_id) is o:
                del self._by_request[o.imp.request_id]
            uid = o.imp.user_id
            if uid is not None:
                q = self._by_user[uid]
                while q and q[0].imp.ts < horizon:
                    q.popleft()
                if not q:
                    del self._by_user[uid]

    def snapshot(self, catalog_sizes: Mapping[str, int] | None = None, experiment: str | None = None,
                 only_experiment: bool = False) -> dict[str, Any]:
        """The metrics as JSON-ready dicts; only_experiment: the groups of `experiment` alone."""
        sizes = catalog_sizes or {}
        groups = []
        for (exp, arm, version), c in sorted(self.counts.items(), key=lambda kv: tuple(map(str, kv[0]))):
            if only_experiment and exp != experiment:
                continue
            shown_k = {k: sum(n for p, n in c.shown.items() if p < k) for k in self.ks}
            clicked_k = {k: sum(n for p, n in c.clicked.items() if p < k) for k in self.ks}
            size = sizes.get(version)
            groups.append({
                "experiment": exp, "arm": arm, "version": version, "impressions": c.impressions,
                "ctr_at_position": {str(p): wilson(c.clicked.get(p, 0), c.shown[p]) for p in sorted(c.shown)},
                "ctr_at_k": {str(k): wilson(clicked_k[k], shown_k[k]) for k in self.ks},
                "hit_rate_at_k": {str(k): wilson(c.hits.get(k, 0), c.impressions) for k in self.ks},
                "coverage": {"items": len(c.items), "catalog": size,
                             "share": None if not size else len(c.items) / size}})
        out: dict[str, Any] = {"interval": "wilson, 95% (z=1.96)", "window_s": self.window_s, "groups": groups,
                               "events": self.events, "attributed": dict(self.attributed),
                               "duplicate_clicks": self.duplicate_clicks}
        sources = sorted({s for (e, s) in self._credit if not only_experiment or e == experiment}
                         | {s for (e, s) in self._wins if not only_experiment or e == experiment})
        if sources:
            exps = sorted({e for (e, _s) in self._credit} | {e for (e, _s) in self._wins}, key=str)
            inter = {}
            for e in exps:
                if only_experiment and e != experiment:
                    continue
                decided = sum(n for (x, _s), n in self._wins.items() if x == e)
                inter[str(e)] = {"ties": self._ties.get(e, 0), "decided": decided, "sources": {
                    s: {"clicks": self._credit.get((e, s), 0), "wins": self._wins.get((e, s), 0),
                        "win_share": wilson(self._wins.get((e, s), 0), decided)} for s in sources}}
            out["interleaving"] = inter
        return out


def _winner(by_source: Mapping[str, int]) -> str | None:
    """The source with the most clicks, "" for a tie, None before any click."""
    if not by_source:
        return None
    ranked = sorted(by_source.values(), reverse=True)
    if len(ranked) > 1 and ranked[0] == ranked[1]:
        return ""
    return max(by_source, key=lambda s: by_source[s])


class OnlineMetrics:
    """The service's view: tails both logs into one OnlineJoin, at most every min_interval_s.

    Each replica reads the whole shared log, so every replica reports the same (global) figures:
    aggregate the Prometheus series with max, not sum, across replicas."""

    def __init__(self, impressions: LogReader, events: LogReader, window_s: float,
                 before_read: Callable[[], object] | None = None, min_interval_s: float = 1.0) -> None:
        self.impressions, self.events = impressions, events
        self.join = OnlineJoin(window_s)
        self.before_read = before_read  # e.g. flush this worker's impression queue first
        self.min_interval_s = min_interval_s
        self.bad_records = 0
        self._lock = threading.Lock()
        self._last = -math.inf

    def refresh(self, force: bool = False) -> None:
        """Read what both logs gained since the last refresh and join it in time order
        (impressions before events at equal times), so an event finds the impressions before it."""
        with self._lock:
            now = time.monotonic()
            if not force and now - self._last < self.min_interval_s:
                return
            self._last = now
            if self.before_read is not None:
                self.before_read()
            records: list[tuple[float, int, Impression | LoggedEvent]] = []
            for kind, reader, load in ((0, self.impressions, load_impression), (1, self.events, load_event)):
                for line in reader.read_new():
                    try:
                        rec = load(line)
                    except ValueError:
                        self.bad_records += 1
                        continue
                    records.append((rec.ts, kind, rec))
            records.sort(key=lambda r: (r[0], r[1]))  # stable: log order within a time
            for _ts, _kind, rec in records:
                if isinstance(rec, Impression):
                    self.join.add_impression(rec)
                else:
                    self.join.add_event(rec)

    def snapshot(self, catalog_sizes: Mapping[str, int] | None = None, experiment: str | None = None,
                 only_experiment: bool = False) -> dict[str, Any]:
        with self._lock:
            out = self.join.snapshot(catalog_sizes, experiment, only_experiment)
        out["bad_records"] = self.bad_records
        return out
