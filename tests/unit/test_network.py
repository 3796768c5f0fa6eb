"""What a local run exposes on the network, the part that needs no cluster: telling a loopback address. The sockets of
a local cluster and of the demo's head are measured in ``tests/cluster/test_network.py``, with this ``is_loopback``."""

import ipaddress

import pytest


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1, an IPv6 socket bound to IPv4 loopback
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


@pytest.mark.parametrize("address, loopback", [("127.0.0.1", True), ("::1", True), ("::ffff:127.0.0.1", True),
                                               ("0.0.0.0", False), ("::", False), ("192.0.2.2", False)])
def test_is_loopback(address, loopback):
    assert is_loopback(address) is loopback
