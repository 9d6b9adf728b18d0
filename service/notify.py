"""Version-change notifications over Redis pub/sub (DESIGN.md §8 hot swap).

Publishers (`recsys reindex`, `recsys rollback`) send the new version name on VERSION_CHANNEL
after CURRENT has been replaced; every API replica subscribed to it reloads. Without Redis the
replicas poll artifacts/CURRENT instead, so a lost message only delays the swap.
"""

from __future__ import annotations

import logging

import redis

logger = logging.getLogger(__name__)

VERSION_CHANNEL = "recsys:version"


def notify_version(redis_url: str, version: str, timeout_s: float = 2.0) -> int:
    """Publish `version` on VERSION_CHANNEL; returns how many subscribers got it.

    Raises redis.RedisError when Redis cannot be reached (the caller decides whether that is
    fatal: CURRENT is already replaced, and polling replicas will still pick it up).
    """
    client = redis.Redis.from_url(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        receivers = int(client.publish(VERSION_CHANNEL, version))
    finally:
        client.close()
    logger.info("announced version %s on %s to %d subscriber(s)", version, VERSION_CHANNEL, receivers)
    return receivers
