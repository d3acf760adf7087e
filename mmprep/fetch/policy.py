"""The URL policy: the one object that decides what may be loaded. Default deny.

`check_url` runs before anything is fetched (scheme, data URL, local path, host name or IP literal);
`check_address` runs again on every address a host name resolves to, at connection time, so a
name that resolves somewhere else later (DNS rebinding) cannot slip through. Both raise `RowError`.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Union

import httpx

from mmprep.errors import ErrorKind, RowError
from mmprep.fetch.addresses import (
    PRIVATE_NETWORK,
    IPAddress,
    blocked_name,
    blocked_range,
    embedded_ipv4,
    normalize_name,
    parse_ip,
    without_zone,
)
from mmprep.fetch.dataurl import parse_data_url
from mmprep.fetch.local import path_of, resolve_inside
from mmprep.keys import is_data_url
from mmprep.settings import LoadSettings, MiB

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


@dataclass(frozen=True)
class HttpTarget:
    """An http(s) URL that passed the policy; the request is made with this very object."""

    url: httpx.URL


@dataclass(frozen=True)
class DataTarget:
    """A data: URL, already decoded."""

    media_type: str
    data: bytes


@dataclass(frozen=True)
class FileTarget:
    """A local file, its path fully resolved and inside an allowed directory."""

    path: str


Target = Union[HttpTarget, DataTarget, FileTarget]

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")


class UrlPolicy:
    """Decides which URLs, host names and addresses may be loaded."""

    def __init__(
        self,
        *,
        allow_http: bool = False,
        allow_local_dirs: Iterable[str | os.PathLike[str]] = (),
        allow_private_network: bool = False,
        allow_hosts: Iterable[str] = (),
        deny_hosts: Iterable[str] = (),
        max_bytes: int = 20 * MiB,
    ) -> None:
        self.allow_http = allow_http
        self.allow_private_network = allow_private_network
        self.max_bytes = max_bytes
        self.local_dirs = tuple(os.path.realpath(d) for d in allow_local_dirs)
        self._allow_names, self._allow_nets = _host_rules(allow_hosts)
        self._deny_names, self._deny_nets = _host_rules(deny_hosts)

    @classmethod
    def from_settings(cls, s: LoadSettings) -> UrlPolicy:
        """The policy a run's settings describe."""
        return cls(
            allow_http=s.allow_http,
            allow_local_dirs=s.allow_local_dirs,
            allow_private_network=s.allow_private_network,
            allow_hosts=s.allow_hosts,
            deny_hosts=s.deny_hosts,
            max_bytes=s.max_bytes,
        )

    def is_local(self, url: str) -> bool:
        """Whether `url` is read without the network (a data URL, a path or file:// URL); no I/O, no checks."""
        if is_data_url(url):
            return True
        match = _SCHEME.match(url)
        return match is None or match.group(1).lower() == "file"

    def check_url(self, url: str) -> Target:
        """Classify and vet `url`; may read the disk (local paths) or decode (data URLs)."""
        if not url:
            raise RowError(ErrorKind.BAD_SCHEME, "empty URL")
        if is_data_url(url):
            decoded = parse_data_url(url, self.max_bytes)
            return DataTarget(media_type=decoded.media_type, data=decoded.data)
        match = _SCHEME.match(url)
        scheme = match.group(1).lower() if match else None
        if scheme is None or scheme == "file":  # a path (relative ones against the current directory)
            return FileTarget(path=resolve_inside(path_of(url), self.local_dirs))
        if scheme in ("http", "https"):
            try:
                parsed = httpx.URL(url)
            except (httpx.InvalidURL, ValueError) as exc:  # ValueError: IDNA errors
                raise RowError(ErrorKind.BAD_SCHEME, f"not a valid URL: {exc}") from None
            return self.check_http(parsed)
        raise RowError(ErrorKind.BAD_SCHEME, f"unsupported scheme {scheme!r}: {_SUPPORTED}")

    def check_http(self, url: httpx.URL) -> HttpTarget:
        """Vet an already parsed http(s) URL: the `check_url` step that redirect hops go through too."""
        if url.scheme == "http" and not self.allow_http:
            raise RowError(
                ErrorKind.BAD_SCHEME, "plain http:// is refused (see --allow-http)" + self._also_blocked(url)
            )
        if url.scheme not in ("http", "https"):
            raise RowError(ErrorKind.BAD_SCHEME, f"unsupported scheme {url.scheme!r}: {_SUPPORTED}")
        host = url.raw_host.decode("ascii")
        if not host:
            raise RowError(ErrorKind.BAD_SCHEME, "URL has no host")
        try:
            url.host  # noqa: B018  decodes the IDNA name: a malformed A-label ("xn--") fails here, not mid-request
        except ValueError as exc:
            raise RowError(ErrorKind.BAD_SCHEME, f"invalid host name {host!r}: {exc}") from None
        if url.port is not None and not 0 < url.port < 65536:
            raise RowError(ErrorKind.BAD_SCHEME, f"invalid port {url.port}")
        ip = parse_ip(host)
        if ip is not None:
            self.check_address(host, ip)
        else:
            self._check_name(normalize_name(host))
        return HttpTarget(url=url)

    def _also_blocked(self, url: httpx.URL) -> str:
        """For an http URL refused by scheme: what --allow-http alone would still meet, so that the first
        error names every flag the URL needs (a loopback/private IP or name, known without DNS)."""
        try:
            https = url.copy_with(scheme="https")
            self.check_http(https)
        except RowError as exc:
            if exc.kind is ErrorKind.BLOCKED_URL:
                return f", and {exc.message}"
        except ValueError:
            pass
        return ""

    def check_address(self, host: str, ip: IPAddress) -> None:
        """Refuse connecting to `ip` (for `host`) unless it is public or explicitly allowed."""
        name = normalize_name(host)
        if name in self._deny_names or any(_in(a, self._deny_nets) for a in (ip, embedded_ipv4(ip))):
            raise _blocked(f"{host} is on the deny list (--deny-host)")
        if name in self._allow_names or _in(ip, self._allow_nets):
            return
        reason = blocked_range(ip)
        if reason is None or (self.allow_private_network and reason in PRIVATE_NETWORK):
            return
        inner = embedded_ipv4(ip)
        address = str(ip) if inner is None else f"{ip}, wrapping {inner}"
        if parse_ip(host) is None:
            subject = f"{host} resolves to {address}, which"
        else:
            subject = host if address == host else f"{host} ({address})"
        raise _blocked(f"{subject} is {reason}{_hint(reason)}")

    def _check_name(self, name: str) -> None:
        """Refuse denied names and names that stand for internal endpoints (`localhost`, metadata)."""
        if name in self._deny_names:
            raise _blocked(f"{name} is on the deny list (--deny-host)")
        if name in self._allow_names:
            return
        reason = blocked_name(name)
        if reason is not None and not (self.allow_private_network and reason in PRIVATE_NETWORK):
            raise _blocked(f"{name} is {reason}{_hint(reason)}")


_SUPPORTED = "only https://, http:// with --allow-http, data:image/...;base64 and allowed local files"


def _host_rules(entries: Iterable[str]) -> tuple[frozenset[str], tuple[IPNetwork, ...]]:
    """Split --allow-host/--deny-host entries into host names and IP networks (a bare IP is a /32 or /128)."""
    names: set[str] = set()
    nets: list[IPNetwork] = []
    for entry in entries:
        ip = parse_ip(entry.strip())
        if ip is not None:
            nets.append(ipaddress.ip_network(without_zone(ip)))
            continue
        try:
            nets.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            names.add(normalize_name(entry))
    return frozenset(names), tuple(nets)


def _in(ip: IPAddress | None, nets: tuple[IPNetwork, ...]) -> bool:
    return ip is not None and any(without_zone(ip) in net for net in nets)


def _hint(reason: str) -> str:
    return " (see --allow-host" + (" or --allow-private-network)" if reason in PRIVATE_NETWORK else ")")


def _blocked(message: str) -> RowError:
    return RowError(ErrorKind.BLOCKED_URL, message)
