"""serve binds the [web] port itself, before it starts any process (serve.web_sockets): every
address the host names, as uvicorn's own binding did."""

from __future__ import annotations

import socket

import pytest

from dicomnode.ports import free_port
from dicomnode.serve import web_sockets


def _answers(family: socket.AddressFamily, host: str, port: int) -> bool:
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(2)
        return client.connect_ex((host, port)) == 0


def _ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_an_empty_host_is_every_address_of_both_families() -> None:
    if not _ipv6():
        pytest.skip("no IPv6 on this host")
    port = free_port()
    bound = web_sockets("", port)
    try:
        assert {s.family for s in bound} == {socket.AF_INET, socket.AF_INET6}
        assert {s.getsockname()[1] for s in bound} == {port}
        # Bound to 0.0.0.0 alone, IPv6 clients were refused.
        assert _answers(socket.AF_INET, "127.0.0.1", port)
        assert _answers(socket.AF_INET6, "::1", port)
        six = next(s for s in bound if s.family == socket.AF_INET6)
        assert six.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    finally:
        for server in bound:
            server.close()


def test_a_host_name_is_each_address_it_resolves_to() -> None:
    port = free_port()
    resolved = {a[4][0] for a in socket.getaddrinfo("localhost", port, type=socket.SOCK_STREAM)}
    bound = web_sockets("localhost", port)
    try:
        assert {s.getsockname()[0] for s in bound} == resolved
    finally:
        for server in bound:
            server.close()


def test_one_taken_address_closes_the_others_and_raises() -> None:
    if not _ipv6():
        pytest.skip("no IPv6 on this host")
    port = free_port()
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as taken:
        taken.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        taken.bind(("::", port))
        taken.listen()
        with pytest.raises(OSError):
            web_sockets("", port)
    # The IPv4 socket it had bound is closed: the port can be bound again at once.
    bound = web_sockets("", port)
    for server in bound:
        server.close()
