"""The network layer: every TCP connection is vetted on the address actually dialled.

httpcore asks its network backend to `connect_tcp(host, port)`. `GuardedBackend` resolves `host`
itself, runs `UrlPolicy.check_address` on every address, and only then connects, to a checked IP
literal. Nothing else resolves the name in between, so DNS rebinding has no window. TLS still gets
the host name (httpcore passes it as the SNI / certificate name), only the TCP dial uses the IP.
"""

from __future__ import annotations

import ipaddress
import select
import socket
import ssl
from collections.abc import Iterable
from typing import Any

import anyio
import httpcore
import httpx

from mmprep.fetch.addresses import IPAddress, parse_ip
from mmprep.fetch.policy import UrlPolicy


async def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to, in resolver order (tests replace this: there is no DNS here)."""
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """An httpcore network backend that connects only to addresses the policy allows."""

    def __init__(self, policy: UrlPolicy) -> None:
        self._policy = policy
        self._dialer = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            with anyio.fail_after(timeout):
                addresses = await self._addresses(host, port)
                for ip in addresses:  # all of them, before dialling any: a mixed answer is refused
                    self._policy.check_address(host, ip)
                return await self._dial(host, addresses, port, local_address, socket_options)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"connecting to {host}:{port} took longer than {timeout:g}s") from None

    async def _addresses(self, host: str, port: int) -> list[IPAddress]:
        literal = parse_ip(host)
        if literal is not None:
            return [literal]
        try:
            addresses = await resolve(host, port)
        except OSError as exc:  # socket.gaierror and friends
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc.strerror or exc}") from None
        if not addresses:
            raise httpcore.ConnectError(f"cannot resolve {host}: no addresses")
        return addresses

    async def _dial(
        self,
        host: str,
        addresses: list[IPAddress],
        port: int,
        local_address: str | None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None,
    ) -> httpcore.AsyncNetworkStream:
        """Connect to the first address that answers."""
        failure: Exception | None = None
        for ip in addresses:
            try:
                return PooledStream(await self._dialer.connect_tcp(
                    str(ip), port, local_address=local_address, socket_options=socket_options
                ))  # fmt: skip
            except httpcore.ConnectError as exc:
                failure = exc
        raise httpcore.ConnectError(f"cannot connect to {host}:{port}: {failure}")

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are never used")

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)


class PooledStream(httpcore.AsyncNetworkStream):
    """An httpcore stream whose "is_readable" is cheap. The pool asks it of every idle connection on
    every request; anyio answers by rebuilding the socket's attribute table (a getpeername call) and a
    fresh poll object each time, which cost ~15% of the event loop's time fetching small images."""

    def __init__(self, stream: httpcore.AsyncNetworkStream) -> None:
        self._stream = stream
        sock = stream.get_extra_info("socket")
        self._poll: select.poll | None = None
        if sock is not None and sock.fileno() >= 0:
            self._poll = select.poll()
            self._poll.register(sock.fileno(), select.POLLIN)

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._stream.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._stream.write(buffer, timeout)

    async def aclose(self) -> None:
        self._poll = None
        await self._stream.aclose()

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.AsyncNetworkStream:
        return PooledStream(await self._stream.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":  # data or EOF waiting on an idle connection: the pool drops it
            return self._poll is None or bool(self._poll.poll(0))
        return self._stream.get_extra_info(info)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport, with a connection pool that dials only through `GuardedBackend`."""

    def __init__(self, policy: UrlPolicy, *, max_connections: int) -> None:
        super().__init__()
        # httpx has no public hook for the network backend; httpcore's pool takes one, so we
        # replace the pool httpx built (no proxies: we pass the transport, so env proxies are off).
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            network_backend=GuardedBackend(policy),
        )
