"""The feedback loop's parts (DESIGN.md §8), built from the settings at start-up: the durable
event log the history store writes, the impression log the recommend use case writes, and the
online metrics that join the two. Without Redis and without RECSYS_LOG_DIR there is no log (and
no online metrics): the in-process store is the development mode.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from service.contract.online_log import EVENTS_FILE_PREFIX, IMPRESSIONS_FILE_PREFIX
from service.core.config import Settings
from service.online_log import (EventFileLog, ImpressionLog, JsonlReader, RotatingJsonl, Sink, StreamBound,
                                StreamReader, StreamSink, events_stream, impressions_stream)
from service.online_metrics import OnlineMetrics

logger = logging.getLogger(__name__)


@dataclass
class Feedback:
    stream_bound: StreamBound | None  # the Redis store's event stream
    event_log: EventFileLog | None  # the in-process store's event file log
    impressions: ImpressionLog | None
    online: OnlineMetrics | None
    _closers: tuple[Callable[[], Any], ...] = ()

    def close(self) -> None:
        if self.impressions is not None:
            self.impressions.close()
        if self.event_log is not None:
            self.event_log.close()
        for close in self._closers:
            close()


def build_feedback(settings: Settings, on_error: Callable[[str, int], None]) -> Feedback:
    """on_error(reason, records): a record the impression log could not keep (counted on /metrics)."""
    rate = settings.impression_sample_rate
    if settings.redis_url:
        bound = StreamBound(settings.log_stream_maxlen, settings.log_stream_max_age_s)
        writer = redis.Redis.from_url(settings.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
        reader = redis.Redis.from_url(settings.redis_url, socket_timeout=10.0, socket_connect_timeout=1.0)
        sink: Sink = StreamSink(writer, impressions_stream(), bound)
        imp = ImpressionLog(sink, rate, on_error=on_error) if rate > 0 else None
        online = OnlineMetrics(StreamReader(reader, impressions_stream()), StreamReader(reader, events_stream()),
                               settings.attribution_window_s, before_read=None if imp is None else imp.flush)
        logger.info("online log: redis streams (%s), impressions sampled at %s", bound, rate)
        return Feedback(bound, None, imp, online, (reader.close,) if imp is not None else (reader.close,
                                                                                            writer.close))
    if settings.log_dir is None:
        logger.info("online log: off (no RECSYS_REDIS_URL, no RECSYS_LOG_DIR)")
        return Feedback(None, None, None, None)
    folder, size = settings.log_dir, settings.log_file_max_bytes
    events = EventFileLog(RotatingJsonl(folder, EVENTS_FILE_PREFIX, size, settings.log_fsync))
    imp = (ImpressionLog(RotatingJsonl(folder, IMPRESSIONS_FILE_PREFIX, size, settings.log_fsync), rate,
                         on_error=on_error) if rate > 0 else None)
    online = OnlineMetrics(JsonlReader(folder, IMPRESSIONS_FILE_PREFIX), JsonlReader(folder, EVENTS_FILE_PREFIX),
                           settings.attribution_window_s, before_read=None if imp is None else imp.flush)
    logger.info("online log: JSON Lines in %s (rotated at %d bytes), impressions sampled at %s", folder, size, rate)
    return Feedback(None, events, imp, online)
