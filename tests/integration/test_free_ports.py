"""Ports picked for tcp endpoints are free, distinct, and below the kernel's ephemeral range,
so no outgoing connection can take one as its source port before the mesh binds it (a CI
run failed with "Address already in use" on a port picked from that range)."""

from __future__ import annotations

import socket

import pytest

from statefun_mesh.mesh import _ephemeral_low, free_ports, local_endpoints


def test_picked_ports_are_free_distinct_and_below_the_ephemeral_range() -> None:
    low = _ephemeral_low()
    if low <= 11_000:
        pytest.skip(f"the ephemeral range starts at {low}: no room below it on this machine")
    for _ in range(20):
        ports = free_ports(8)
        assert len(set(ports)) == 8
        assert all(10_000 <= p < low for p in ports), ports
        socks = []
        try:
            for p in ports:  # each is bindable now
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
        finally:
            for s in socks:
                s.close()


def test_excluded_and_taken_ports_are_not_picked() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", free_ports(1)[0]))
        taken.listen()
        port = taken.getsockname()[1]
        promised = free_ports(4)
        for _ in range(20):
            ports = free_ports(4, exclude=promised)
            assert port not in ports and not set(ports) & set(promised)


def test_tcp_endpoints_use_them() -> None:
    endpoints = local_endpoints("tcp", 3, "")
    assert len(set(endpoints)) == 3 and all(e.startswith("tcp://127.0.0.1:") for e in endpoints)
