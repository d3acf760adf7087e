"""Which IP addresses a fetch may connect to: host-string parsing and the blocked ranges.

Pure functions, no I/O. `parse_ip` reads a host the way the socket layer would, so
`2130706433`, `0x7f.1` and `127.1` are all 127.0.0.1 here too; `blocked_range` names the range
an address falls in when it is not a public destination.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from typing import Union
from urllib.parse import unquote

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

# Range names. `PRIVATE_NETWORK` is what --allow-private-network opens up; the others stay shut.
LOOPBACK = "loopback"
PRIVATE = "private"
LINK_LOCAL = "link-local"
SHARED = "carrier-grade NAT (100.64.0.0/10)"
CLOUD_METADATA = "a cloud metadata endpoint"
MULTICAST = "multicast"
UNSPECIFIED = "unspecified"
RESERVED = "reserved"
NOT_GLOBAL = "not globally routable"
WRAPPED_IPV4 = "an IPv4-mapped/compatible IPv6 address"
PRIVATE_NETWORK = frozenset({LOOPBACK, PRIVATE, LINK_LOCAL, SHARED})

_SHARED_NET = ipaddress.IPv4Network("100.64.0.0/10")
_NAT64_NET = ipaddress.IPv6Network("64:ff9b::/96")
_COMPATIBLE_NET = ipaddress.IPv6Network("::/96")
_METADATA_ADDRESSES = frozenset({ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")})
_METADATA_NAMES = frozenset({"metadata.google.internal", "metadata.goog", "metadata"})
_IPV4_CHARS = re.compile(r"[0-9a-fA-FxX.]+")


def parse_ip(host: str) -> IPAddress | None:
    """`host` as an IP address when it is an IP literal in any notation the socket layer accepts, else None.

    IPv4 follows inet_aton (decimal `2130706433`, octal `0177.1`, hex `0x7f.1`, short `127.1`);
    IPv6 may be bracketed and carry a (percent-encoded) zone such as `fe80::1%25eth0`.
    """
    host = host.strip("[]")
    if ":" in host:
        try:
            return ipaddress.IPv6Address(unquote(host))
        except ValueError:
            return None
    if not _IPV4_CHARS.fullmatch(host):  # inet_aton ignores trailing junk after a space; we don't
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, compatible, NAT64, 6to4), if any.

    Teredo carries two (server, client): the client when it is blocked, else the server.
    """
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        server, client = ip.teredo
        return client if blocked_range(client) else server
    if ip in _NAT64_NET or (ip in _COMPATIBLE_NET and int(ip) > 1):  # `::` and `::1` are not wrappers
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def blocked_range(ip: IPAddress) -> str | None:
    """The name of the non-public range `ip` lies in (looking inside IPv6 wrappers), or None if public."""
    inner = embedded_ipv4(ip)
    if inner is not None:
        reason = blocked_range(inner)
        if reason is not None:
            return reason
        if isinstance(ip, ipaddress.IPv6Address) and (ip.ipv4_mapped is not None or ip in _COMPATIBLE_NET):
            return WRAPPED_IPV4  # no legitimate URL needs these; NAT64/6to4/Teredo of a public v4 are fine
        return None
    ip = without_zone(ip)
    if ip in _METADATA_ADDRESSES:
        return CLOUD_METADATA
    if ip.is_unspecified:
        return UNSPECIFIED
    if ip.is_loopback:
        return LOOPBACK
    if ip.is_link_local:
        return LINK_LOCAL
    if ip.is_multicast:
        return MULTICAST
    if isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED_NET:
        return SHARED
    if ip.is_reserved:
        return RESERVED
    if ip.is_private:
        return PRIVATE
    if not ip.is_global:
        return NOT_GLOBAL
    return None


def without_zone(ip: IPAddress) -> IPAddress:
    """`ip` without an IPv6 zone (`fe80::1%eth0` -> `fe80::1`); the zone never changes the range."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        return ipaddress.IPv6Address(str(ip).split("%")[0])
    return ip


def blocked_name(name: str) -> str | None:
    """The range a special host name stands for (`localhost`, cloud metadata names), or None."""
    if name == "localhost" or name.endswith(".localhost"):
        return LOOPBACK
    if name in _METADATA_NAMES:
        return CLOUD_METADATA
    return None


def normalize_name(name: str) -> str:
    """A host name as compared against policy lists: lowercase, without a trailing dot."""
    return name.strip().lower().rstrip(".")
