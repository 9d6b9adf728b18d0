"""Experiments between published versions (DESIGN.md §8): A/B splits and team-draft interleaving.

An experiment names two or more arms, each a published version (or, with no version, the live
version CURRENT names: that arm follows hot swaps, rollbacks and the publish gate as the service
always did), and a traffic share per arm:

    {"name": "exp1", "mode": "ab", "seed": 0,
     "arms": [{"name": "control"}, {"name": "new", "version": "v20260101", "share": 0.5}]}

A user is hashed to an arm (blake2b of experiment name, seed and user id: the same user lands
in the same arm in every worker and after every restart, and a new seed reshuffles users), so
the unit is the user: a request without `user_id` is not in the experiment and is served as
before. In `interleave` mode (exactly two arms, shares unused) every request in the experiment
runs both arms and merges their lists by team draft (service/interleave.py); each item says
which arm contributed it, so a click is credited to that arm.

Where the experiment lives: artifacts/EXPERIMENT.json (service.contract.layout.EXPERIMENT),
written by `PUT /v1/admin/experiment` (write key) or by hand. Every worker reads it at start-up
and again when CURRENT is polled or a version notice arrives, and loads every arm's version
(a pinned arm's version is loaded once per worker and shared by arms that name it; the live
version's Recommender is reused when a pin names it). A pinned version whose folder goes away
ends the experiment in that worker (logged): an arm serves only while its version exists.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from service.artifacts import ArtifactError, version_folder
from service.contract.layout import EXPERIMENT, MANIFEST, VERSION_RE, write_atomic
from service.metrics import Metrics
from service.pipeline import Recommender
from service.smoke import load_checked

logger = logging.getLogger(__name__)

MAX_ARMS = 8
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
SHARE_TOLERANCE = 1e-6  # shares are written by people in decimals: 0.3 + 0.3 + 0.4 != 1.0 exactly
Loc = tuple[str | int, ...]


class ArmConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN, description="the arm's name, as answers report it")
    version: str | None = Field(default=None, pattern=VERSION_RE.pattern,
                                description="a published version's name; absent: the live version CURRENT names "
                                            "(follows hot swaps and rollbacks)")
    share: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False,
                                description="the fraction of users this arm serves (mode ab; the shares sum to 1); "
                                            "unused by interleave")


class ExperimentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN)
    mode: Literal["ab", "interleave"] = Field(default="ab", description="ab: each user served by one arm; "
                                              "interleave: both arms' lists merged by team draft per request")
    arms: list[ArmConfig] = Field(min_length=2, max_length=MAX_ARMS)
    seed: int = Field(default=0, ge=0, lt=2 ** 63, strict=True, description="reshuffles users between arms and "
                                                                            "the interleaving coin flips")

    @field_validator("arms")
    @classmethod
    def _arms(cls, arms: list[ArmConfig], info: ValidationInfo) -> list[ArmConfig]:
        """Unique names; interleave: exactly 2 arms; ab: every arm has a share and they sum to 1.
        (A failure's loc is `arms`; the message names the arm's field.)"""
        seen: dict[str, int] = {}
        for i, arm in enumerate(arms):
            if arm.name in seen:
                raise ValueError(f"arms.{i}.name {arm.name!r} repeats arms.{seen[arm.name]}.name")
            seen[arm.name] = i
        if info.data.get("mode") == "interleave":
            if len(arms) != 2:
                raise ValueError(f"interleave merges exactly 2 arms, got {len(arms)}")
            return arms
        missing = [i for i, a in enumerate(arms) if a.share is None]
        if missing:
            raise ValueError(f"arms.{missing[0]}.share is missing: mode ab needs a share for every arm")
        total = sum(a.share or 0.0 for a in arms)
        if abs(total - 1.0) > SHARE_TOLERANCE:
            raise ValueError(f"arms.*.share sum to {total:g}, not 1")
        return arms


class ExperimentError(ValueError):
    """An experiment that cannot run; `loc` is the field's path in the configuration."""

    def __init__(self, loc: Loc, message: str) -> None:
        super().__init__(f"{'.'.join(map(str, loc))}: {message}" if loc else message)
        self.loc = loc
        self.message = message


def unit_hash(*parts: object) -> int:
    """A 64-bit hash of `parts` that every process and Python version agrees on (hash() is salted
    per process)."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def bucket(experiment: str, seed: int, user_id: str) -> float:
    """The user's point in [0, 1) for this experiment and seed."""
    return unit_hash("arm", experiment, seed, user_id) / 2.0 ** 64


@dataclass(frozen=True)
class Experiment:
    """A running experiment: its configuration and the Recommender of every pinned version.

    `pinned` maps a version name to its Recommender; arms without a version use the live one,
    handed in per request (so a hot swap moves them at once)."""

    config: ExperimentConfig
    pinned: dict[str, Recommender] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def interleaved(self) -> bool:
        return self.config.mode == "interleave"

    def arm_for(self, user_id: str) -> ArmConfig:
        """The arm that serves `user_id` (mode ab): the first whose cumulative share passes the
        user's bucket."""
        point = bucket(self.config.name, self.config.seed, user_id)
        edge = 0.0
        for arm in self.config.arms:
            edge += arm.share or 0.0
            if point < edge:
                return arm
        return self.config.arms[-1]  # shares summing to 1 - 1e-7: the rounding gap goes to the last arm

    def recommender(self, arm: ArmConfig, live: Recommender) -> Recommender:
        return live if arm.version is None else self.pinned[arm.version]

    def coin_seed(self, user_id: str, request_id: str | None) -> int:
        """The interleaving coin's seed for one request: reproducible from the request id."""
        return unit_hash("coin", self.config.name, self.config.seed, user_id, request_id or "")

    def rng(self, user_id: str, request_id: str | None) -> np.random.Generator:
        return np.random.default_rng(self.coin_seed(user_id, request_id))

    def versions(self, live: Recommender) -> dict[str, str]:
        """arm name -> the version it serves now."""
        return {a.name: self.recommender(a, live).model_version for a in self.config.arms}

    def loaded(self, live: Recommender) -> list[Recommender]:
        """The distinct Recommenders this worker holds for the experiment, the live one included."""
        out = {id(live): live}
        out.update((id(r), r) for r in self.pinned.values())
        return list(out.values())


def parse_config(data: Any) -> ExperimentConfig:
    """ExperimentConfig from JSON-ready data; ExperimentError naming the first bad field."""
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        raise ExperimentError(tuple(err["loc"]), err["msg"]) from None


def read_config(root: Path) -> ExperimentConfig | None:
    """root/EXPERIMENT.json, or None when there is none; ExperimentError when it is unreadable."""
    path = root / EXPERIMENT
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ExperimentError((), f"{path}: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ExperimentError((), f"{path}: not JSON: {exc}") from None
    try:
        return parse_config(data)
    except ExperimentError as exc:
        raise ExperimentError(exc.loc, f"{path}: {exc.message}") from None


def write_config(root: Path, config: ExperimentConfig | None) -> None:
    """Replace root/EXPERIMENT.json atomically; None removes it (no experiment)."""
    path = root / EXPERIMENT
    if config is None:
        path.unlink(missing_ok=True)
    else:
        write_atomic(path, config.model_dump_json(indent=2, exclude_none=True) + "\n")


def load_experiment(config: ExperimentConfig, root: Path, live: Recommender,
                    load: Callable[[Path], Recommender], reuse: Iterable[Recommender] = ()) -> Experiment:
    """Load every pinned arm's version (blocking); ExperimentError naming `arms.<i>.version` when
    one is not published or does not load. A version already held (the live one, or one in
    `reuse`: the previous experiment's) is shared rather than loaded again."""
    held = {r.model_version: r for r in reuse}
    held[live.model_version] = live
    pinned: dict[str, Recommender] = {}
    for i, arm in enumerate(config.arms):
        name = arm.version
        if name is None or name in pinned:
            continue
        if name in held:
            pinned[name] = held[name]
            continue
        try:
            folder = version_folder(root, name)  # confined to the artifacts root, as CURRENT's version
        except ArtifactError as exc:
            raise ExperimentError(("arms", i, "version"), str(exc)) from None
        if not (folder / MANIFEST).is_file():
            raise ExperimentError(("arms", i, "version"), f"no published version {name!r} under {root}")
        try:
            pinned[name] = load(folder)
        except ArtifactError as exc:
            raise ExperimentError(("arms", i, "version"), f"version {name!r} does not load: {exc}") from None
    return Experiment(config, pinned)


def version_bytes(rec: Recommender) -> int:
    """Bytes of the version's files: what its mapped arrays and sessions can bring into memory."""
    return sum(p.stat().st_size for p in rec.v.path.iterdir() if p.is_file())


class ExperimentHolder:
    """Owns `state.experiment`: starts, replaces and ends the experiment of this worker.

    `apply` (the admin route) validates, loads, writes EXPERIMENT.json and swaps; `refresh`
    (after each CURRENT poll or version notice) follows the file other workers wrote and ends
    the experiment when a pinned version's folder is gone. The swap is one reference assignment,
    as for versions: a request in flight finishes with the experiment it started with."""

    def __init__(self, state: Any, root: Path, make_recommender: Callable[[Any], Recommender]) -> None:
        self.state = state
        self.root = root
        self.make_recommender = make_recommender
        self._lock = asyncio.Lock()
        self._seen: tuple[int, int] | None = None  # (mtime_ns, size) of the file last read
        self._last_error: str | None = None

    @property
    def current(self) -> Experiment | None:
        exp: Experiment | None = getattr(self.state, "experiment", None)
        return exp

    def _load(self, folder: Path) -> Recommender:
        return load_checked(folder, self.make_recommender)

    def _signature(self) -> tuple[int, int] | None:
        try:
            st = (self.root / EXPERIMENT).stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size

    def _swap(self, exp: Experiment | None) -> None:
        self.state.experiment = exp

    def start_sync(self) -> None:
        """At start-up (blocking): run the experiment the file names; a bad one is logged and
        the service starts without it (the versions it serves are still checked)."""
        self._seen = self._signature()
        try:
            config = read_config(self.root)
            exp = None if config is None else load_experiment(config, self.root, self.state.recommender,
                                                              self._load)
        except ExperimentError as exc:
            logger.error("experiment not started: %s", exc)
            self._last_error = str(exc)
            return
        self._swap(exp)
        if exp is not None:
            logger.info("experiment %s (%s): %s", exp.name, exp.config.mode, exp.versions(self.state.recommender))

    async def apply(self, config: ExperimentConfig | None) -> Experiment | None:
        """Start (or replace, or with None end) the experiment here and in the file; raises
        ExperimentError (nothing changed) when an arm's version is not there or does not load."""
        async with self._lock:
            live: Recommender = self.state.recommender
            exp = None
            if config is not None:
                old = self.current
                exp = await asyncio.to_thread(load_experiment, config, self.root, live, self._load,
                                              old.pinned.values() if old else ())
            await asyncio.to_thread(write_config, self.root, config)
            self._seen = self._signature()
            self._last_error = None
            self._swap(exp)
            logger.info("experiment %s", "ended" if exp is None else
                        f"{exp.name} ({exp.config.mode}) started: {exp.versions(live)}")
            return exp

    async def refresh(self) -> None:
        """Follow EXPERIMENT.json when it changed; end the experiment when a pinned version's
        folder is gone. Never raises for a bad file (logged once)."""
        async with self._lock:
            exp = self.current
            gone = [v for v in (exp.pinned if exp else {}) if not (self.root / v / MANIFEST).is_file()]
            if exp is not None and gone:
                logger.error("experiment %s ended: version %s is no longer published", exp.name, gone[0])
                self._swap(None)
            sig = self._signature()
            if sig == self._seen:
                return
            try:
                config = read_config(self.root)
                if config is not None and exp is not None and config == exp.config and not gone:
                    new: Experiment | None = exp
                else:
                    new = None if config is None else await asyncio.to_thread(
                        load_experiment, config, self.root, self.state.recommender, self._load,
                        exp.pinned.values() if exp else ())
            except ExperimentError as exc:
                if str(exc) != self._last_error:
                    logger.error("experiment file not applied (keeping the running one): %s", exc)
                self._last_error = str(exc)
                self._seen = sig
                return
            self._seen = sig
            self._last_error = None
            if new is not exp:
                self._swap(new)
                logger.info("experiment %s", "ended" if new is None else
                            f"{new.name} ({new.config.mode}): {new.versions(self.state.recommender)}")


def report(metrics: Metrics, live: Recommender, exp: Experiment | None) -> None:
    """Bring the experiment and loaded-version gauges up to date (read at /metrics scrape time,
    so a hot swap of the live version shows without a hook)."""
    held = exp.loaded(live) if exp is not None else [live]
    metrics.set_loaded({r.model_version: version_bytes(r) for r in held})
    if exp is None:
        metrics.set_experiment(None, "", {})
    else:
        arms = {a.name: (exp.recommender(a, live).model_version, 1.0 if exp.interleaved else a.share or 0.0)
                for a in exp.config.arms}
        metrics.set_experiment(exp.name, exp.config.mode, arms)


def share_summary(exp: Experiment, live: Recommender) -> list[dict[str, Any]]:
    """Each arm as GET /v1/admin/experiment shows it: name, version served now, share."""
    return [{"name": a.name, "version": exp.recommender(a, live).model_version,
             "pinned": a.version is not None, "share": a.share} for a in exp.config.arms]

