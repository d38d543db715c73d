"""The shipped test fixtures themselves (agent.testing)."""

from __future__ import annotations

import socket

from agent.testing.broker import _ephemeral_ports, free_port


def test_free_port_is_outside_the_ephemeral_range_and_free() -> None:
    # Inside that range any socket the kernel numbers itself (bound to port 0, a client's
    # source port) could take the port while a broker stopped for an outage is down.
    low, high = _ephemeral_ports()
    for _ in range(50):
        port = free_port()
        assert not low <= port <= high
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
