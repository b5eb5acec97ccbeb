"""The client's address behind trusted proxies (Envoy, a load balancer).

`X-Forwarded-For` is believed only as far as it was written by proxies we
trust (`MARIE_GATEWAY_TRUSTED_PROXIES`, a CIDR list): starting from the peer
of the TCP connection and walking the header from right to left, the client
is the first address that is not a trusted proxy (the rightmost untrusted
one). Entries left of it were written by the client itself and are ignored,
so a client cannot pick the address it is throttled under. With no trusted
proxies (the default), or a peer that is not one, the header is ignored.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(text: str) -> tuple[Network, ...]:
    """Comma-separated CIDRs ("10.0.0.0/8, 127.0.0.1"); ValueError naming a bad one."""
    networks = []
    for part in text.split(","):
        entry = part.strip()
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"'{entry}' is not an IP address or CIDR network") from None
    return tuple(networks)


class TrustedProxies:
    def __init__(self, networks: Iterable[Network]) -> None:
        self.networks = tuple(networks)

    def trusts(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.networks)

    def client(self, peer: str, forwarded_for: Iterable[str]) -> str:
        """The client's address, given the connection's peer and the
        `X-Forwarded-For` header values (in order)."""
        if not self.networks or not self.trusts(peer):
            return peer
        hops = [hop.strip() for value in forwarded_for for hop in value.split(",")]
        address = peer
        for hop in reversed(hops):
            if not hop:
                continue
            address = _strip_port(hop)
            if not self.trusts(address):
                return address
        # Every hop is a trusted proxy: the leftmost is as close as we get.
        return address


def _strip_port(hop: str) -> str:
    """The address of a hop without its port: [2001:db8::1]:443, 192.0.2.1:80."""
    if hop.startswith("["):
        return hop[1:].partition("]")[0]
    if hop.count(":") == 1:
        return hop.partition(":")[0]
    return hop
