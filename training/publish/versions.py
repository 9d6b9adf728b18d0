"""The artifact root's versions: names, CURRENT, the lock, listing, pruning, rollback, announcing.

artifacts_root/<version>/ holds one published version (DESIGN.md §5), artifacts_root/CURRENT
the name of the live one. CURRENT is only ever replaced atomically (temp file + os.replace),
and only after the version it names loaded and passed a smoke run (training/publish/build.py for a
new version, rollback() here for an older one). The file names, the CURRENT reader and writer and
the lock are the contract's (service/contract/layout.py); here they raise PublishError.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from service.contract import layout
from service.contract.layout import CURRENT, MANIFEST, ContractError, RootLocked, fsync_dir, write_current
from service.contract.manifest import created_at

log = logging.getLogger(__name__)


class PublishError(RuntimeError):
    """A version could not be published; the message says which step failed and why."""


def default_version(fingerprint: str, sources: list[Path]) -> str:
    """UTC timestamp plus a 6-hex hash of the data fingerprint and checkpoint contents."""
    h = hashlib.sha256(fingerprint.encode())
    for src in sources:
        h.update(src.read_bytes())
    return f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{h.hexdigest()[:6]}"


def read_current(artifacts_root: str | Path) -> str | None:
    """Name of the live version, or None when artifacts_root/CURRENT does not exist; PublishError
    when CURRENT holds something that is not a version name (e.g. a path out of the root)."""
    try:
        return layout.read_current(artifacts_root)
    except ContractError as exc:
        raise PublishError(str(exc)) from None


def set_current(artifacts_root: str | Path, version: str) -> None:
    """Point artifacts_root/CURRENT at an existing version atomically (temp file + os.replace)."""
    root = Path(artifacts_root)
    if not (root / version / MANIFEST).is_file():
        raise PublishError(f"cannot point CURRENT at {version}: no {MANIFEST} in {root / version}")
    write_current(root, version)


def fsync_tree(path: Path) -> None:
    for p in path.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(path)


DEFAULT_KEEP = 5


def announce(redis_url: str | None, version: str) -> int | None:
    """notify_version when a Redis URL is known; a failure is a warning (replicas poll CURRENT)."""
    if not redis_url:
        return None
    import redis

    from service.notify import notify_version

    try:
        return notify_version(redis_url, version)
    except redis.RedisError as exc:
        log.warning("could not announce version %s on Redis (replicas will see CURRENT when they poll): %s",
                    version, exc)
        return None


@contextmanager
def artifacts_lock(root: Path) -> Iterator[None]:
    """Exclusive non-blocking flock on the root (layout.root_lock); PublishError when another holds it."""
    try:
        with layout.root_lock(root):
            yield
    except RootLocked as exc:
        raise PublishError(str(exc)) from None


def list_versions(root: Path) -> list[tuple[str, str]]:
    """(name, created_at) of every version folder with a readable manifest, oldest first."""
    out = []
    for p in root.iterdir() if root.is_dir() else ():
        if not p.is_dir() or p.name.startswith("."):
            continue
        created = created_at(p)
        if created is not None:  # else not a version (or a broken one): never listed, pruned or rolled back to
            out.append((p.name, created))
    return sorted(out, key=lambda v: (v[1], v[0]))


def previous_version(root: Path, current: str) -> str | None:
    """The newest version created before `current` (by manifest created_at)."""
    versions = list_versions(root)
    names = [name for name, _ in versions]
    if current not in names:
        return names[-1] if names else None
    i = names.index(current)
    return names[i - 1] if i > 0 else None


def prune_versions(root: Path, keep: int, protect: set[str]) -> list[str]:
    """Delete version folders beyond the newest `keep`, never one in `protect` nor one an experiment
    arm is pinned to (root/EXPERIMENT.json); returns their names. An experiment file that cannot
    be read prunes nothing (the workers may still serve the versions it named before)."""
    from service.experiments import ExperimentError, read_config

    try:
        config = read_config(root)
    except ExperimentError as exc:
        log.warning("nothing pruned: %s", exc)
        return []
    pinned = {a.version for a in config.arms if a.version is not None} if config is not None else set()
    names = [name for name, _ in list_versions(root)]
    doomed = [n for n in names[: max(0, len(names) - keep)] if n not in protect | pinned]
    for name in doomed:
        shutil.rmtree(root / name)
        log.info("pruned version %s", name)
    return doomed


@dataclass
class RollbackResult:
    previous: str
    current: str
    notified: int | None


def rollback(artifacts_root: str | Path, to: str | None = None, redis_url: str | None = None) -> RollbackResult:
    """Point CURRENT at `to` (default: the version before the live one) once it loads and
    passes a smoke run; PublishError (CURRENT unchanged) when it cannot be served."""
    root = Path(artifacts_root)
    with artifacts_lock(root):
        current = read_current(root)
        if current is None:
            raise PublishError(f"{root}: no CURRENT version to roll back from")
        target = to or previous_version(root, current)
        if target is None:
            raise PublishError(f"no version older than {current} in {root} to roll back to")
        if target == current:
            raise PublishError(f"{target} is already CURRENT")
        if target.startswith(".") or "/" in target or target == CURRENT:
            raise PublishError(f"{target!r} is not a version name")
        smoke(root / target, f"version {target} cannot be served")
        set_current(root, target)
    log.info("rolled back CURRENT from %s to %s", current, target)
    return RollbackResult(current, target, announce(redis_url, target))


def smoke(path: Path, failure: str = "the new version does not load") -> None:
    """Load the folder as the service will, build its Recommender and run one request per stage
    (service/smoke.py, the check the service's hot swap runs); PublishError(failure: why)."""
    from service.artifacts import ArtifactError
    from service.smoke import load_checked

    try:
        load_checked(path)
    except ArtifactError as exc:
        raise PublishError(f"{failure}: {exc}") from None
