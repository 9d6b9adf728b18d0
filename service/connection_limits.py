"""Connection-level limits of the HTTP server (issue 23), enforced in uvicorn's httptools protocol.

uvicorn (0.29 - 0.55 read) closes a connection only `timeout_keep_alive` after a *response*: a
connection that never completes a request, or sends its head or body a byte at a time, is held
for ever (probed on main: 1,000 idle connections held 30 s, 50 slowloris and 50 slow bodies held
60 s, none closed). httptools sets no limit on the size of a request head (a 64 MiB header was
buffered, answered 200, and stalled /healthz for 3.7 s), and `limit_concurrency` answers 503
only once a request's head has arrived, counting connections that may never send one.

`LimitedHttpToolsProtocol` is uvicorn's httptools protocol with four limits (RECSYS_*,
service/core/config.py), each a few timer or counter operations per request:

- idle: a connection with no request in progress is closed after `keep_alive_s`, from the
  moment it is accepted as well as after each response (uvicorn armed it after responses only);
- head deadline: a request's head (request line + headers) must arrive within
  `header_timeout_s` of its first byte; body deadline: its body within `body_timeout_s` of the
  end of its head. Past either: 408 (when no response has started) and the connection closed;
- connections: beyond `max_connections` open on one worker, a new connection is answered 503
  (Retry-After: 1) and closed at once, before anything of it is read;
- head size: a head larger than `max_header_bytes` is answered 431 and the connection closed,
  having read at most that many bytes of it (plus, for a request pipelined behind another on
  the same connection, the rest of the read that held the end of the previous one).

Connections closed by a limit are counted per reason in `closed_counts()` (exported as
`recsys_connections_closed_total`). The limits come from RECSYS_* once per worker process
(`recsys serve` passes this class to uvicorn by its import path, so spawned workers read the
same environment), or from `limits` set on a subclass.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from service.core.config import Settings

PROTOCOL = "service.connection_limits:LimitedHttpToolsProtocol"  # uvicorn's `http` (an import path)
REASONS = ("idle", "header_timeout", "body_timeout", "max_connections", "header_too_large")
_closed: Counter[str] = Counter()


@dataclass(frozen=True)
class ConnectionLimits:
    keep_alive_s: float
    header_timeout_s: float
    body_timeout_s: float
    max_connections: int
    max_header_bytes: int

    @classmethod
    def from_settings(cls, s: Settings) -> ConnectionLimits:
        return cls(s.keep_alive_s, s.header_timeout_s, s.body_timeout_s, s.max_connections, s.max_header_bytes)


@cache
def _from_environment() -> ConnectionLimits:
    return ConnectionLimits.from_settings(Settings())


def closed_counts() -> dict[str, int]:
    """Connections this process closed by each limit since it started."""
    return {reason: _closed[reason] for reason in REASONS}


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits above; one instance per connection."""

    limits: ClassVar[ConnectionLimits | None] = None  # None: from RECSYS_* (once per process)

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._limits = self.limits or _from_environment()
        self.timeout_keep_alive = self._limits.keep_alive_s  # type: ignore[assignment]  # a float is fine
        self._deadline: asyncio.TimerHandle | None = None
        self._in_head = True  # between requests or inside a head (not inside a body)
        self._head_bytes = 0  # bytes of the current head read so far
        self._heads_done = 0

    # -- connections -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        if len(self.connections) > self._limits.max_connections:  # this one included
            self._refuse(503, "max_connections", "Too many connections; retry shortly.", retry_after=True)
            return
        # idle before the first request: the same timer uvicorn arms after each response (and
        # cancels when data arrives)
        self.timeout_keep_alive_task = self.loop.call_later(self._limits.keep_alive_s,
                                                            self.timeout_keep_alive_handler)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def timeout_keep_alive_handler(self) -> None:  # uvicorn arms it after each response too
        if not self.transport.is_closing():
            _closed["idle"] += 1
            self.transport.close()

    # -- reading a request ---------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        if self._in_head and self._deadline is None:
            self._arm(self._limits.header_timeout_s, "header_timeout")
        if not self._in_head:
            super().data_received(data)
            return
        room = self._limits.max_header_bytes - self._head_bytes
        if len(data) <= room:
            self._head_bytes += len(data)
            super().data_received(data)
            return
        # the head may end within `room` bytes: feed those, and refuse if it did not
        heads = self._heads_done
        self._head_bytes += room
        super().data_received(data[:room])
        if self.transport.is_closing():
            return
        if self._heads_done == heads:
            self._refuse(431, "header_too_large",
                         f"Request header fields larger than {self._limits.max_header_bytes} bytes.")
            return
        self.data_received(data[room:])

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:
            self._arm(self._limits.header_timeout_s, "header_timeout")

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._heads_done += 1
        self._cancel_deadline()
        self._arm(self._limits.body_timeout_s, "body_timeout")
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._cancel_deadline()
        self._in_head = True
        self._head_bytes = 0
        super().on_message_complete()

    # -- helpers -------------------------------------------------------------------------------
    def _arm(self, seconds: float, reason: str) -> None:
        self._deadline = self.loop.call_later(seconds, self._expired, reason)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self, reason: str) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and cycle.response_started and not cycle.response_complete:
            _closed[reason] += 1  # a response is under way: no status left to send
            self.transport.close()
            return
        what = "headers" if reason == "header_timeout" else "body"
        self._refuse(408, reason, f"The request {what} did not arrive in time.")

    def _refuse(self, status: int, reason: str, message: str, retry_after: bool = False) -> None:
        """Answer `status` with `message` and close the connection; the request in progress (if
        any) sees a disconnect and its response, if it comes, is dropped."""
        _closed[reason] += 1
        self._cancel_deadline()
        self._unset_keepalive_if_required()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()
        body = message.encode("ascii")
        content = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        if retry_after:
            content.append(b"retry-after: 1\r\n")
        content.extend([b"content-type: text/plain; charset=utf-8\r\n",
                        b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                        b"connection: close\r\n\r\n", body])
        self.transport.write(b"".join(content))
        self.transport.close()
