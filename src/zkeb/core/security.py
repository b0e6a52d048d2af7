"""Who is on the other end of a request: the client address and scheme, honouring only trusted proxies.

`X-Forwarded-For` and `X-Forwarded-Proto` are believed only when the socket peer is one of `TRUSTED_PROXIES`
(IPs or CIDR networks; none by default). Anyone can send those headers, so trusting them from an untrusted
peer would let a client pick the address its rate limit and audit events are attributed to.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from functools import lru_cache

from litestar.types import Scope

__all__ = ("TrustedProxies", "client_ip", "request_is_tls", "trusted_proxies")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class TrustedProxies:
    """A set of networks whose forwarding headers are believed."""

    __slots__ = ("_networks",)

    def __init__(self, networks: Iterable[str]) -> None:
        self._networks: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(n, strict=False) for n in networks)

    def __bool__(self) -> bool:
        return bool(self._networks)

    def __contains__(self, address: object) -> bool:
        if not self._networks or not isinstance(address, str):
            return False
        try:
            ip = ipaddress.ip_address(address.strip())
        except ValueError:
            return False
        return any(ip in network for network in self._networks)


@lru_cache(maxsize=16)
def trusted_proxies(networks: tuple[str, ...]) -> TrustedProxies:
    """A cached `TrustedProxies` for a settings tuple (settings are immutable)."""
    return TrustedProxies(networks)


def _header(scope: Scope, name: bytes) -> str | None:
    values = [value for key, value in scope.get("headers", ()) if key.lower() == name]
    if not values:
        return None
    return ",".join(value.decode("latin-1") for value in values)


def _peer(scope: Scope) -> str | None:
    client = scope.get("client")
    return client[0] if client else None


def client_ip(scope: Scope, proxies: TrustedProxies) -> str | None:
    """The client's IP address.

    The socket peer, unless it is a trusted proxy: then `X-Forwarded-For` is walked from the right, skipping
    trusted proxies, and the first address that is not one is the client (the left-most if all are trusted).
    A malformed entry stops the walk at the last trustworthy hop.
    """
    peer = _peer(scope)
    if peer is None or peer not in proxies:
        return peer
    forwarded = _header(scope, b"x-forwarded-for")
    if not forwarded:
        return peer
    hop = peer
    for entry in reversed([item.strip() for item in forwarded.split(",") if item.strip()]):
        try:
            ipaddress.ip_address(entry)
        except ValueError:
            return hop
        hop = entry
        if entry not in proxies:
            return entry
    return hop


def request_is_tls(scope: Scope, proxies: TrustedProxies) -> bool:
    """Whether the client reached us over TLS: the ASGI scheme, or a trusted proxy's `X-Forwarded-Proto`."""
    if scope.get("scheme") in {"https", "wss"}:
        return True
    if _peer(scope) not in proxies:
        return False
    proto = _header(scope, b"x-forwarded-proto")
    # The left-most value is what the first proxy saw from the client.
    return proto is not None and proto.split(",")[0].strip().lower() == "https"
