"""service/supervisor.py: one SO_REUSEPORT socket per worker, connections spread over them."""

from __future__ import annotations

import socket

import pytest

from service.supervisor import bind_group, reuse_port_supported

pytestmark = pytest.mark.skipif(not reuse_port_supported(), reason="no SO_REUSEPORT on this platform")


def test_a_burst_of_connections_is_spread_over_the_group() -> None:
    """The case uvicorn's shared socket gets wrong: a client pool opened in one burst."""
    group = bind_group("127.0.0.1", 0, 2)
    try:
        port = group[0].getsockname()[1]
        assert all(s.getsockname()[1] == port for s in group)
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(64)]
        accepted = []
        for s in group:
            s.setblocking(False)
            count = 0
            while True:
                try:
                    conn, _ = s.accept()
                except BlockingIOError:
                    break
                conn.close()
                count += 1
            accepted.append(count)
        assert sum(accepted) == 64
        assert min(accepted) >= 16, accepted  # hashed by address: about half each (binomial, p ~ 1e-5 below 16)
        for c in clients:
            c.close()
    finally:
        for s in group:
            s.close()


def test_a_taken_port_is_an_oserror_and_nothing_stays_bound() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        with pytest.raises(OSError):
            bind_group("127.0.0.1", taken.getsockname()[1], 2)  # the other socket has no SO_REUSEPORT
    finally:
        taken.close()
