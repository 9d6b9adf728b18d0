"""The artifact root's versions: names, CURRENT, the lock, listing, pruning, rollback, announcing.

artifacts_root/<version>/ holds one published version (DESIGN.md §5), artifacts_root/CURRENT
the name of the live one. CURRENT is only ever replaced atomically (temp file + os.replace),
and only after the version it names loaded and passed a smoke run (training/publish/build.py for a
new version, rollback() here for an older one).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


MANIFEST = "manifest.json"


CATALOG = "catalog.npz"


CURRENT = "CURRENT"


VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


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
    path = Path(artifacts_root) / CURRENT
    if not path.is_file():
        return None
    try:
        name = path.read_bytes()[:256].decode("utf-8").strip()
    except UnicodeDecodeError:
        name = "<not UTF-8>"
    if not VERSION_RE.match(name) or name == CURRENT:
        raise PublishError(f"{path}: invalid version name {name!r} (must match {VERSION_RE.pattern})")
    return name


def set_current(artifacts_root: str | Path, version: str) -> None:
    """Point artifacts_root/CURRENT at an existing version atomically (temp file + os.replace)."""
    root = Path(artifacts_root)
    if not (root / version / MANIFEST).is_file():
        raise PublishError(f"cannot point CURRENT at {version}: no {MANIFEST} in {root / version}")
    tmp = root / f".{CURRENT}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(version + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / CURRENT)
    fsync_dir(root)


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, default=_jsonable) + "\n")


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    if isinstance(x, (tuple, np.ndarray)):
        return list(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def fsync_tree(path: Path) -> None:
    for p in path.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(path)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


LOCK = ".reindex.lock"


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
    """Exclusive non-blocking flock on root/.reindex.lock; PublishError when another holds it."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PublishError(f"{root / LOCK}: another reindex or rollback is running") from None
        yield
    finally:
        os.close(fd)


def list_versions(root: Path) -> list[tuple[str, str]]:
    """(name, created_at) of every version folder with a readable manifest, oldest first."""
    out = []
    for p in root.iterdir() if root.is_dir() else ():
        if not p.is_dir() or p.name.startswith("."):
            continue
        try:
            out.append((p.name, str(json.loads((p / MANIFEST).read_text())["created_at"])))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a version (or a broken one): never listed, pruned or rolled back to
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
    """Delete version folders beyond the newest `keep`, never one in `protect`; returns their names."""
    names = [name for name, _ in list_versions(root)]
    doomed = [n for n in names[: max(0, len(names) - keep)] if n not in protect]
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
