"""The client address behind trusted proxies: the rightmost X-Forwarded-For
entry that is not a trusted proxy, and only when the peer is one."""

from __future__ import annotations

import pytest
from marie_gateway.http.client_address import TrustedProxies, parse_networks

PROXIES = TrustedProxies(parse_networks("10.0.0.0/8, 192.168.1.1, 2001:db8::/32"))


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        # The peer is a trusted proxy: the entry it appended is the client.
        ("10.0.0.5", ["203.0.113.7"], "203.0.113.7"),
        # A client-written entry left of it is ignored (rightmost untrusted).
        ("10.0.0.5", ["1.1.1.1, 203.0.113.7"], "203.0.113.7"),
        # A chain of trusted proxies is walked past; headers are joined in order.
        ("10.0.0.5", ["1.1.1.1, 203.0.113.7", "192.168.1.1, 10.2.3.4"], "203.0.113.7"),
        # Ports and IPv6 forms.
        ("10.0.0.5", ["203.0.113.7:5123"], "203.0.113.7"),
        ("2001:db8::9", ["[2001:db9::1]:443"], "2001:db9::1"),
        ("::ffff:10.0.0.5", ["203.0.113.8"], "203.0.113.8"),
        # Every hop trusted: the leftmost.
        ("10.0.0.5", ["10.9.9.9, 10.0.0.6"], "10.9.9.9"),
        # No header: the peer.
        ("10.0.0.5", [], "10.0.0.5"),
        # The peer is not trusted: the header, whatever it says, is ignored.
        ("203.0.113.9", ["10.0.0.1"], "203.0.113.9"),
        ("198.51.100.2", ["1.2.3.4, 10.0.0.5"], "198.51.100.2"),
    ],
)
def test_rightmost_untrusted(peer: str, forwarded: list[str], client: str) -> None:
    assert PROXIES.client(peer, forwarded) == client


def test_without_trusted_proxies_the_header_is_ignored() -> None:
    assert TrustedProxies(()).client("10.0.0.5", ["203.0.113.7"]) == "10.0.0.5"


def test_a_bad_network_is_named() -> None:
    with pytest.raises(ValueError, match=r"'10\.0\.0\.0/33'"):
        parse_networks("127.0.0.1, 10.0.0.0/33")
