"""Hot swap of the served artifact version (DESIGN.md §5, §8).

A `VersionWatcher` reloads when artifacts/CURRENT names another version: told over Redis
pub/sub (service.notify.VERSION_CHANNEL) when Redis is configured, and by polling CURRENT every
`reload_poll_s` in any case (a lost message or a Redis outage only delays the swap). The new
version is loaded, smoke-run and wrapped in a new Recommender off the event loop; only then is
`app.state.recommender` replaced, one reference assignment, so a request in flight finishes on
the version it started with and no request sees a half-loaded one. A version that fails to load
is logged once, counted once and not retried until its folder changes (a signature of its file
names, sizes and modification times: a folder completed in place after CURRENT named it is
picked up at the next poll), CURRENT changes again or an admin reload asks for it. Each worker
reports the version CURRENT names beside the one it serves (`drift()`: /readyz and the
recsys_version_drift gauge), so replicas that serve different versions show it. The polling and pub/sub loops survive any exception (a bug included): it is logged
once per distinct failure and the loop goes on, so a corrupt version never stops a later good
one from being picked up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis

from service.artifacts import ArtifactError, current_version, version_folder
from service.contract.layout import CURRENT
from service.experiments import ExperimentHolder
from service.metrics import Metrics
from service.notify import VERSION_CHANNEL
from service.pipeline import Recommender
from service.smoke import load_checked

logger = logging.getLogger(__name__)

PUBSUB_RETRY_S = 2.0  # wait before re-subscribing after Redis went away
_ABS_PATH = re.compile(r"(?<![\w.<>-])/(?:[^\s:'\"/]+/)*[^\s:'\"/]*")  # an absolute path in a message


@dataclass(frozen=True)
class ReloadResult:
    previous: str
    current: str
    changed: bool


class ReloadError(Exception):
    """The version CURRENT names could not be loaded; the old one is still served. `public` is
    the message for an HTTP body: the version and the file, no absolute path, no file content."""

    def __init__(self, msg: str, public: str | None = None) -> None:
        super().__init__(msg)
        self.public = public if public is not None else msg


Signature = tuple[tuple[str, int, int], ...]


def folder_signature(folder: Path) -> Signature:
    """(name, size, mtime_ns) of every entry of a version folder, sorted; () when it cannot be
    listed. A folder completed or repaired in place gets a new signature."""
    entries = []
    try:
        with os.scandir(folder) as it:
            for e in it:
                try:
                    st = e.stat()
                except OSError:
                    continue
                entries.append((e.name, st.st_size, st.st_mtime_ns))
    except OSError:
        return ()
    return tuple(sorted(entries))


def public_reason(exc: Exception, root: Path, head: str) -> str:
    """The 409 body's text, `head: <message>`, with the artifacts root (as given and resolved)
    cut off every path, and any other absolute path reduced to its last part."""
    text = str(exc)
    for prefix in sorted({str(root.resolve()), str(root.absolute()), str(root)}, key=len, reverse=True):
        text = text.replace(prefix + os.sep, "").replace(prefix, "<artifacts>")
    text = _ABS_PATH.sub(lambda m: os.path.basename(m.group(0).rstrip("/")) or "/", text)
    return f"{head}: {text}"


class VersionWatcher:
    """Owns the swap of `state.recommender`; one reload at a time."""

    def __init__(self, state: Any, root: Path, make_recommender: Callable[[Any], Recommender], metrics: Metrics,
                 poll_s: float, redis_url: str | None, experiments: ExperimentHolder | None = None) -> None:
        """experiments: refreshed after every poll and notice (artifacts/EXPERIMENT.json changed, or
        a pinned arm's version is gone)."""
        self.experiments = experiments
        self.state = state
        self.root = root
        self.make_recommender = make_recommender
        self.metrics = metrics
        self.poll_s = poll_s
        self.redis_url = redis_url
        self._lock = asyncio.Lock()
        # a version that did not load and its folder's signature then: skipped until either changes
        self._failed: tuple[str, Signature] | None = None
        self._last_error: str | None = None  # the failure last logged (each distinct one is logged once)
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def served(self) -> str:
        rec: Recommender = self.state.recommender
        return rec.model_version

    def start(self) -> None:
        if self.poll_s > 0:
            self._tasks.append(asyncio.create_task(self._poll(), name="recsys-poll-current"))
        if self.redis_url:
            self._tasks.append(asyncio.create_task(self._subscribe(self.redis_url), name="recsys-version-pubsub"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    async def reload(self, force: bool = False) -> ReloadResult:
        """Load the version CURRENT names and swap it in; a no-op when it is already served.

        force=True retries a version that failed before. Raises ReloadError (old version kept).
        """
        async with self._lock:
            previous = self.served
            try:
                name = current_version(self.root)
            except ArtifactError as exc:
                self._failure(str(exc), count=True)
                self._set_drift(None, previous)
                raise ReloadError(str(exc), public_reason(exc, self.root, f"{CURRENT} names no loadable version, still "
                                                                           f"serving {previous}")) from None
            self._set_drift(name, previous)
            if name == previous:
                return ReloadResult(previous, previous, False)
            sig = folder_signature(self.root / name)
            if self._failed == (name, sig) and not force:
                return ReloadResult(previous, previous, False)
            changed = self._failed is not None and self._failed[0] == name  # the same version, its folder changed
            try:
                rec = await asyncio.to_thread(self._load, name)
            except ArtifactError as exc:  # load_checked turns every failure into one
                self._failed = (name, sig)
                msg = f"version {name} does not load, still serving {previous}: {exc}"
                self._failure(msg, count=True, force=force or changed)
                raise ReloadError(msg, public_reason(exc, self.root, f"version {name} does not load, still serving "
                                                                     f"{previous}")) from None
            self.state.recommender = rec  # the swap: one reference assignment
            self._set_drift(name, name)
            self._failed = None
            self._last_error = None
            self.metrics.reloads.labels("ok").inc()
            self.metrics.set_version(name)
            logger.info("now serving version %s (was %s)", name, previous)
            return ReloadResult(previous, name, True)

    def _failure(self, msg: str, count: bool, force: bool = False) -> None:
        """Log a failure once (a repeat of the last one is not logged again) and count it."""
        if msg != self._last_error or force:
            logger.error("%s", msg)
            if count:
                self.metrics.reloads.labels("failed").inc()
        self._last_error = msg

    def _load(self, name: str) -> Recommender:
        return load_checked(version_folder(self.root, name), self.make_recommender)

    def _set_drift(self, current: str | None, served: str) -> None:
        self.metrics.set_current(current, served)

    def drift(self) -> dict[str, Any]:
        """What CURRENT names now beside what this worker serves (for /readyz); also refreshes
        the gauges. `current` is None when CURRENT cannot be read."""
        served = self.served
        try:
            current: str | None = current_version(self.root)
        except ArtifactError:
            current = None
        self._set_drift(current, served)
        return {"current": current, "drift": current != served}

    async def _reload_quietly(self) -> None:
        """reload() for the loops: never raises (ReloadError is already logged and counted; any
        other exception is a bug, logged once per distinct message, and the loop goes on)."""
        try:
            await self.reload()
        except ReloadError:
            pass
        except Exception as exc:  # noqa: BLE001  the loop must outlive any bug
            msg = f"reload failed unexpectedly: {type(exc).__name__}: {exc}"
            if msg != self._last_error:
                logger.exception("%s", msg)
                self.metrics.reloads.labels("failed").inc()
            self._last_error = msg
        if self.experiments is not None:
            try:
                await self.experiments.refresh()
            except Exception:  # noqa: BLE001  the loop must outlive any bug
                logger.exception("experiment refresh failed")

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            await self._reload_quietly()

    async def _subscribe(self, url: str) -> None:
        """Reload on every message on VERSION_CHANNEL; reconnect after Redis trouble or any error."""
        while True:
            client = aioredis.Redis.from_url(url, socket_connect_timeout=1.0)
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(VERSION_CHANNEL)
                    logger.info("listening for new versions on %s", VERSION_CHANNEL)
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            logger.info("version notice: %r", message.get("data"))
                            await self._reload_quietly()
            except (redis.RedisError, OSError) as exc:
                logger.warning("version pub/sub unavailable (%s); polling CURRENT meanwhile", exc)
            except Exception:  # noqa: BLE001  a bug must not end the subscription for good
                logger.exception("version pub/sub failed; re-subscribing in %.0f s", PUBSUB_RETRY_S)
            finally:
                with contextlib.suppress(Exception):
                    await client.aclose()
            await asyncio.sleep(PUBSUB_RETRY_S)
