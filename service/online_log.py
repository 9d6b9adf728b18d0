"""The durable online log (DESIGN.md §8): where accepted events and served lists are written, and
how they are read back (online metrics, training's ``log:`` data source). Records and names:
service/contract/online_log.py.

Two backends, the same records:

- Redis Streams (``RECSYS_REDIS_URL``): ``<prefix>log:events`` and ``<prefix>log:impressions``, one
  field per entry holding the record's JSON, bounded by ``MAXLEN ~ n`` or, when an age is set,
  ``MINID ~ <now - age>``. Events are appended by the history store's own script
  (service/redis_store.py), in the same atomic step as the history: an acknowledged event is in
  both or (before the answer) in neither. Durability across a crash is Redis's AOF setting.
- Rotated JSON Lines files in a folder (``RECSYS_LOG_DIR``, the in-process store):
  ``events-<seq>.jsonl``, ``impressions-<seq>.jsonl``, a new file once one passes
  ``RECSYS_LOG_FILE_MAX_BYTES``. Each batch is one write() + flush (survives the worker's crash;
  ``RECSYS_LOG_FSYNC`` also survives the host's).

Impressions are recorded off the request path: :meth:`ImpressionLog.record` samples and puts a
tuple on a queue; a background thread serialises and writes batches (what arrived within
``LINGER_S`` of a batch's first record). A failing write is counted
(``recsys_online_log_errors_total``) and logged once per outage, never raised to the request.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast
from urllib.parse import parse_qs, urlsplit, urlunsplit

import redis

from service.contract.online_log import (EVENTS_FILE_PREFIX, EVENTS_STREAM, IMPRESSIONS_STREAM, RECORD_FIELD, Impression, ImpressionItem, LoggedEvent,
                                         dumps, load_event, load_impression, log_file_name, log_file_seq)

logger = logging.getLogger(__name__)

DEFAULT_KEY_PREFIX = "recsys:"
STREAM_READ_CHUNK = 10_000


def events_stream(key_prefix: str = DEFAULT_KEY_PREFIX) -> str:
    return f"{key_prefix}{EVENTS_STREAM}"


def impressions_stream(key_prefix: str = DEFAULT_KEY_PREFIX) -> str:
    return f"{key_prefix}{IMPRESSIONS_STREAM}"


@dataclass(frozen=True)
class StreamBound:
    """How a stream is trimmed on every XADD: ``MAXLEN ~ maxlen``, or, when ``max_age_s`` > 0,
    ``MINID ~ <now - max_age_s>`` (entry ids are milliseconds since the epoch). Approximate (~):
    Redis trims whole radix-tree nodes, so a stream holds a little more than the bound."""

    maxlen: int = 1_000_000
    max_age_s: float = 0.0

    def args(self, now: float | None = None) -> list[str]:
        if self.max_age_s > 0:
            now = time.time() if now is None else now
            return ["MINID", "~", str(max(int((now - self.max_age_s) * 1000), 0))]
        return ["MAXLEN", "~", str(self.maxlen)]


class Sink(Protocol):
    def write(self, lines: Sequence[str]) -> None:
        """Append every line (one record's JSON each) durably, in order, or raise."""
        ...

    def close(self) -> None: ...


class RotatingJsonl:
    """Append-only JSON Lines files ``<prefix>-<seq>.jsonl`` in ``folder``; thread-safe. A write
    goes to the newest file; once it reaches ``max_bytes`` the next write starts a new one.
    ``keep_files`` > 0 deletes the oldest files beyond that many."""

    def __init__(self, folder: Path, prefix: str, max_bytes: int = 64 << 20, fsync: bool = False,
                 keep_files: int = 0) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes: must be >= 1, got {max_bytes}")
        if keep_files < 0:
            raise ValueError(f"keep_files: must be >= 0, got {keep_files}")
        self.folder, self.prefix, self.max_bytes, self.fsync, self.keep_files = folder, prefix, max_bytes, fsync, \
            keep_files
        folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        seqs = log_files(folder, prefix)
        self._seq = seqs[-1][0] if seqs else 0
        self._fh = open(folder / log_file_name(prefix, self._seq), "ab")  # noqa: SIM115 (kept open)
        if self._fh.tell() >= max_bytes:
            self._rotate()

    def _rotate(self) -> None:
        self._fh.close()
        self._seq += 1
        self._fh = open(self.folder / log_file_name(self.prefix, self._seq), "ab")  # noqa: SIM115
        if self.keep_files:
            for _seq, path in log_files(self.folder, self.prefix)[:-self.keep_files]:
                path.unlink(missing_ok=True)

    def write(self, lines: Sequence[str]) -> None:
        if not lines:
            return
        data = ("\n".join(lines) + "\n").encode("utf-8")
        with self._lock:
            self._fh.write(data)
            self._fh.flush()
            if self.fsync:
                os.fsync(self._fh.fileno())
            if self._fh.tell() >= self.max_bytes:
                self._rotate()

    def close(self) -> None:
        with self._lock:
            self._fh.close()


def log_files(folder: Path, prefix: str) -> list[tuple[int, Path]]:
    """(seq, path) of prefix's log files in folder, oldest first."""
    if not folder.is_dir():
        return []
    out = [(seq, p) for p in folder.iterdir() if (seq := log_file_seq(prefix, p.name)) is not None]
    return sorted(out)


class StreamSink:
    """XADD of every line to one stream, in one pipelined round trip per batch."""

    def __init__(self, client: redis.Redis, key: str, bound: StreamBound) -> None:
        self.client, self.key, self.bound = client, key, bound

    def write(self, lines: Sequence[str]) -> None:
        if not lines:
            return
        trim = self.bound.args()
        pipe = self.client.pipeline(transaction=False)
        for line in lines:
            pipe.execute_command("XADD", self.key, *trim, "*", RECORD_FIELD, line)
        pipe.execute()

    def close(self) -> None:
        self.client.close()


# --- reading back, incrementally -------------------------------------------------------------

class LogReader(Protocol):
    def read_new(self) -> list[str]:
        """The records (JSON lines) written since the last call, oldest first."""
        ...


class JsonlReader:
    """Tails prefix's files in folder: complete lines only (a line being written is read next time)."""

    def __init__(self, folder: Path, prefix: str) -> None:
        self.folder, self.prefix = folder, prefix
        self._seq, self._offset = -1, 0

    def read_new(self) -> list[str]:
        out: list[str] = []
        for seq, path in log_files(self.folder, self.prefix):
            if seq < self._seq:
                continue
            if seq > self._seq:
                self._seq, self._offset = seq, 0
            try:
                with open(path, "rb") as fh:
                    fh.seek(self._offset)
                    data = fh.read()
            except FileNotFoundError:  # deleted by keep_files between the listing and the open
                continue
            end = data.rfind(b"\n") + 1
            self._offset += end
            out.extend(line for line in data[:end].decode("utf-8").split("\n") if line)
        return out


class StreamReader:
    """XRANGE from after the last entry read, in chunks."""

    def __init__(self, client: redis.Redis, key: str) -> None:
        self.client, self.key = client, key
        self._last = "0-0"

    def read_new(self) -> list[str]:
        out: list[str] = []
        while True:
            entries = cast(list[tuple[Any, dict[Any, Any]]],
                           self.client.xrange(self.key, min=f"({self._last}", count=STREAM_READ_CHUNK))
            for entry_id, fields in entries:
                self._last = _text(entry_id)
                value = fields.get(RECORD_FIELD, fields.get(RECORD_FIELD.encode()))
                if value is not None:
                    out.append(_text(value))
            if len(entries) < STREAM_READ_CHUNK:
                return out


def _text(v: object) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def parse_log_spec(spec: str) -> tuple[str, str]:
    """A log location: ``redis://host:port[/db][?key=<events stream>]`` -> ("redis", url with the
    key in the query), anything else -> ("dir", folder). The ``log:`` data source's argument."""
    if spec.startswith(("redis://", "rediss://", "unix://")):
        return "redis", spec
    if not spec:
        raise ValueError("log spec: must be a redis:// URL or a folder, got ''")
    return "dir", spec


def event_reader(spec: str) -> tuple[LogReader, Callable[[], None]]:
    """A reader of the events log at spec (see parse_log_spec) and its close()."""
    kind, where = parse_log_spec(spec)
    if kind == "dir":
        folder = Path(where)
        if not folder.is_dir():
            raise ValueError(f"log folder {folder} does not exist")
        return JsonlReader(folder, EVENTS_FILE_PREFIX), lambda: None
    parts = urlsplit(where)
    query = parse_qs(parts.query)
    key = query.get("key", [events_stream()])[0]
    client = redis.Redis.from_url(urlunsplit(parts._replace(query="")), decode_responses=True)
    return StreamReader(client, key), client.close


def read_events(spec: str) -> Iterator[LoggedEvent]:
    """Every event the log at spec holds, in log order (training's ``log:`` source)."""
    reader, close = event_reader(spec)
    try:
        for i, line in enumerate(reader.read_new()):
            try:
                yield load_event(line)
            except ValueError as exc:
                raise ValueError(f"{spec}: record {i}: {exc}") from None
    finally:
        close()


# --- the impression log -------------------------------------------------------------------

# how long the writer gathers records after a batch's first before it writes them: one wake-up, one
# write (pipelined XADDs) per batch. Written one by one, a record cost the writer thread ~0.2 ms of
# CPU (futex wake-up, GIL hand-overs, with Redis a round trip), ~5x serialising and writing it in a
# loop; with 20 ms, 2.6-2.8x less, and 0.08-0.17 ms less added p50 with Redis on the 20k x 10k
# version (benchmarks/serving/results/impression_log_cost_20k.txt). Records reach the log that much later.
LINGER_S = 0.02

Pending = tuple[str, str | None, str, str | None, str | None, tuple[tuple[str, float | None, str | None], ...],
                float, float]


class ImpressionLog:
    """Samples served lists and writes them on a background thread, in batches.

    record() costs a random draw and a queue put on the request's thread; the Impression is built
    and serialised on the writer thread, which writes what arrived within linger_s of a batch's
    first record together. A full queue (the sink slower than the traffic) drops
    the record and counts it; a failing sink counts the batch as lost and logs once per outage.
    """

    def __init__(self, sink: Sink, rate: float = 1.0, batch_max: int = 512, queue_max: int = 100_000,
                 on_error: Callable[[str, int], None] | None = None, linger_s: float = LINGER_S) -> None:
        if not 0 <= rate <= 1:
            raise ValueError(f"rate: must be in [0, 1], got {rate}")
        if linger_s < 0:
            raise ValueError(f"linger_s: must be >= 0, got {linger_s}")
        self.sink, self.rate, self.batch_max, self.linger_s = sink, rate, batch_max, linger_s
        self.on_error = on_error or (lambda reason, n: None)
        self.written = 0
        self.dropped = 0
        self.failed = 0
        self._q: queue.Queue[Pending | None] = queue.Queue(maxsize=queue_max)
        self._failing = False
        self._thread = threading.Thread(target=self._run, name="impression-log", daemon=True)
        self._thread.start()

    def record(self, request_id: str, user_id: str | None, version: str,
               items: Sequence[tuple[str, float | None, str | None]], experiment: str | None = None,
               arm: str | None = None) -> bool:
        """items: (item_id, score or None, source or None) best first. True when kept (sampled)."""
        if self.rate < 1.0 and (self.rate == 0.0 or random.random() >= self.rate):
            return False
        try:
            self._q.put_nowait((request_id, user_id, version, experiment, arm, tuple(items), time.time(), self.rate))
        except queue.Full:
            self.dropped += 1
            self.on_error("queue_full", 1)
            return False
        return True

    def _run(self) -> None:
        while True:
            first = self._q.get()
            if first is not None and self.linger_s > 0 and self._q.qsize() < self.batch_max - 1:
                time.sleep(self.linger_s)  # let the records that follow join this batch (LINGER_S)
            batch = [first]
            while len(batch) < self.batch_max:
                try:
                    batch.append(self._q.get_nowait())
                except queue.Empty:
                    break
            records = [p for p in batch if p is not None]
            if records:
                self._write(records)
            for _ in batch:
                self._q.task_done()
            if any(p is None for p in batch):
                return

    def _write(self, records: list[Pending]) -> None:
        lines = [dumps(Impression(rid, uid, ver, exp, arm,
                                  tuple(ImpressionItem(i, pos, s, src) for pos, (i, s, src) in enumerate(items)),
                                  ts, rate)) for rid, uid, ver, exp, arm, items, ts, rate in records]
        try:
            self.sink.write(lines)
        except Exception as exc:  # noqa: BLE001 (any sink failure is counted, never raised to a request)
            self.failed += len(lines)
            self.on_error("write_failed", len(lines))
            if not self._failing:
                logger.warning("impression log: could not write %d records (counted, not retried): %r",
                               len(lines), exc)
            self._failing = True
            return
        if self._failing:
            logger.info("impression log: writing again")
        self._failing = False
        self.written += len(lines)

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every record queued so far is written (or failed); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self._q.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=5.0)
        self.sink.close()


def event_record(user_id: str, item_id: str, type_: str, ts: float, event_id: str | None,
                 request_id: str | None) -> str:
    """One accepted event's log line (the Redis script and the file log write this)."""
    return dumps(LoggedEvent(user_id, item_id, type_, ts, event_id, request_id))


def read_impressions(reader: LogReader) -> list[Impression]:
    return [load_impression(line) for line in reader.read_new()]


class EventFileLog:
    """The in-process store's event log: accepted events as JSON Lines (service/stores.py writes
    it under its lock, before the histories take the events)."""

    def __init__(self, files: RotatingJsonl) -> None:
        self.files = files

    def write_events(self, events: Sequence[Any]) -> None:
        """events: service.stores.Event (user_id, item_id, type, timestamp, event_id, request_id)."""
        self.files.write([event_record(e.user_id, e.item_id, e.type, e.timestamp, e.event_id, e.request_id)
                          for e in events])

    def close(self) -> None:
        self.files.close()
