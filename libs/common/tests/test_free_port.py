"""free_port (tests, ``make run --free-ports``): ports outside the kernel's ephemeral range, so an
outgoing connection's source port never takes one before its server binds it."""

from __future__ import annotations

import socket

from rempart.common.testing.localstack import _ephemeral_ports, free_port


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    low, high = _ephemeral_ports()
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    assert all(port < low or port > high for port in ports), sorted(ports)[-5:]
    for port in ports[:20]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))
            sock.listen()

