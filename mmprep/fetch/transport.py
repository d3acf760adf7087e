"""The network layer: an httpx transport over aiohttp that connects only to addresses the policy allows.

httpx stays the API (requests, responses, URLs, errors); beneath it `GuardedTransport` sends each
request with one shared `aiohttp.ClientSession`, whose parser and pool cost a fifth of httpcore's per
request and do not grow with the pool (httpcore's pool rescans every connection on every request; BENCHMARKS.md "HTTP transport").

Every TCP connection is vetted on the address actually dialled, twice: `GuardedResolver` resolves a
host name itself and runs `UrlPolicy.check_address` on every address before any is dialled (a mixed
answer is refused, with the name in the message), and the connector's `socket_factory` checks the
address of every socket it is about to connect, which also covers IP-literal URLs (aiohttp never
resolves those) and every redirect hop. Nothing else resolves the name in between (no DNS cache), so
DNS rebinding has no window. TLS still verifies the host name (SNI and certificate); only the TCP dial
uses the IP. Bodies come raw (`auto_decompress=False`): `mmprep.fetch.codings` undoes content codings
with its own bounds.
"""

from __future__ import annotations

import asyncio
import contextvars
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anyio
import httpx
import yarl
from aiohttp import http_exceptions
from aiohttp.abc import ResolveResult

from mmprep.errors import RowError
from mmprep.fetch.addresses import IPAddress, parse_ip
from mmprep.fetch.policy import UrlPolicy

MAX_HEADERS = 128  # response header fields aiohttp parses (its default); more fail the row
MAX_FIELD_SIZE = 8190  # bytes of one header line (name and value; aiohttp's default); longer fails the row
HEADER_LIMITS = f"more than {MAX_HEADERS} header fields or one over {MAX_FIELD_SIZE:,} bytes"

_host: contextvars.ContextVar[str | None] = contextvars.ContextVar("mmprep_dial_host", default=None)


async def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to, in resolver order (tests replace this: there is no DNS here)."""
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))


class Refused(OSError):
    """A connection the policy refused (or a name that did not resolve); carries the row's error."""

    def __init__(self, error: RowError | str) -> None:
        super().__init__(str(error))
        self.error = error


class GuardedResolver(aiohttp.abc.AbstractResolver):
    """aiohttp's resolver: our `resolve`, then the policy on every address, before any is dialled."""

    def __init__(self, policy: UrlPolicy, timeout: float | None) -> None:
        self._policy = policy
        self._timeout = timeout

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        addresses = await self._addresses(host, port)
        for ip in addresses:  # all of them, before dialling any: a mixed answer is refused
            try:
                self._policy.check_address(host, ip)
            except RowError as error:
                raise Refused(error) from None
        return [
            ResolveResult(
                hostname=host,
                host=str(ip),
                port=port,
                family=socket.AF_INET6 if ip.version == 6 else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for ip in addresses
        ]

    async def _addresses(self, host: str, port: int) -> list[IPAddress]:
        literal = parse_ip(host)  # a legacy IPv4 form (`2130706433`, `127.1`) that aiohttp hands us as a name
        if literal is not None:
            return [literal]
        try:
            with anyio.fail_after(self._timeout):
                addresses = await resolve(host, port)
        except TimeoutError:
            raise asyncio.TimeoutError from None  # aiohttp: a connect timeout
        except OSError as exc:  # socket.gaierror and friends
            raise Refused(f"cannot resolve {host}: {exc.strerror or exc}") from None
        if not addresses:
            raise Refused(f"cannot resolve {host}: no addresses")
        return addresses

    async def close(self) -> None:
        pass


class GuardedTransport(httpx.AsyncBaseTransport):
    """An httpx transport sending through one aiohttp session whose every socket the policy vets."""

    def __init__(self, policy: UrlPolicy, *, max_connections: int, connect_timeout: float | None = None) -> None:
        self._policy = policy
        self._max_connections = max_connections
        self._connect_timeout = connect_timeout
        self._ssl = httpx.create_ssl_context()  # certifi's roots, or SSL_CERT_FILE / SSL_CERT_DIR: as httpx
        self._session: aiohttp.ClientSession | None = None  # made on the first request, inside the event loop
        self.requests_sent = 0  # requests that reached a connection (their headers were written)

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=self._max_connections,  # as wide as the pipeline's fan-out: a fetch never waits for one
            limit_per_host=0,  # the Fetcher's per-host slots decide
            use_dns_cache=False,  # every new connection resolves and is checked anew
            resolver=GuardedResolver(self._policy, self._connect_timeout),
            socket_factory=self._socket,
            ssl=self._ssl,
        )
        return aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,  # raw bodies: mmprep.fetch.codings decodes them within its bounds
            cookie_jar=aiohttp.DummyCookieJar(),  # cookies are httpx's to keep (the Fetcher keeps none)
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept"),  # httpx sets them
            trust_env=False,  # no proxies from the environment: the policy must see the real peer
            max_headers=MAX_HEADERS,
            max_field_size=MAX_FIELD_SIZE,
        )

    def _socket(self, addr_info: Any) -> socket.socket:
        """The connector's socket factory: the last word on every address dialled, IP literals included."""
        family, kind, proto, _, sockaddr = addr_info
        ip = ipaddress.ip_address(sockaddr[0])
        host = _host.get() or str(ip)
        try:
            self._policy.check_address(host, ip)
        except RowError as error:
            raise Refused(error) from None
        return socket.socket(family, kind, proto)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._session is None:
            self._session = self._open()
        timeout = request.extensions.get("timeout", {})
        url = request.url
        host = url.raw_host.decode("ascii")  # IDNA-encoded: what was vetted, and the certificate name
        token = _host.set(host)
        connected = False
        try:
            response = await self._session.request(
                request.method,
                # as httpx encoded it; no userinfo (httpx turned it into the Authorization header)
                yarl.URL(f"{url.scheme}://{url.netloc.decode('ascii')}{url.raw_path.decode('ascii')}", encoded=True),
                headers=[(name.decode("latin-1"), value.decode("latin-1")) for name, value in request.headers.raw],
                data=request.content or None,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=timeout.get("connect"), sock_read=timeout.get("read")
                ),
                server_hostname=host if url.scheme == "https" else None,
            )
            connected = True
        except aiohttp.ClientConnectorError as exc:
            raise _connect_error(exc) from None
        except aiohttp.ConnectionTimeoutError as exc:
            raise httpx.ConnectTimeout(str(exc)) from None
        except (aiohttp.ClientError, http_exceptions.HttpProcessingError) as exc:
            connected = True
            raise _response_error(exc) from None
        finally:
            _host.reset(token)
            if connected:
                self.requests_sent += 1
        return httpx.Response(
            status_code=response.status,
            headers=response.raw_headers,
            stream=_Body(response),
            extensions={
                "http_version": b"HTTP/1.1",
                "reason_phrase": (response.reason or "").encode("latin-1", "replace"),
            },
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class _Body(httpx.AsyncByteStream):
    """A response body as aiohttp hands it in (still content-encoded); closing an unfinished one drops the connection."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        content = self._response.content
        try:
            while chunk := await content.readany():
                yield chunk
        except (aiohttp.ClientError, http_exceptions.HttpProcessingError) as exc:
            raise _response_error(exc) from None

    async def aclose(self) -> None:
        response = self._response
        if response.content.at_eof():
            response.release()  # read to the end: the connection goes back to the pool
        else:
            response.close()


def _connect_error(exc: aiohttp.ClientConnectorError) -> Exception:
    """What a failed connection is for the Fetcher: the policy's refusal as is, else an httpx error."""
    cause = exc.os_error
    if isinstance(cause, Refused):
        if isinstance(cause.error, RowError):
            return cause.error
        return httpx.ConnectError(cause.error)
    if isinstance(cause, (ssl.SSLError, ssl.CertificateError)) or isinstance(exc, aiohttp.ClientSSLError):
        return httpx.ConnectError(f"TLS with {exc.host}:{exc.port} failed: {cause}")
    return httpx.ConnectError(f"cannot connect to {exc.host}:{exc.port}: {cause.strerror or cause}")


def _response_error(exc: BaseException) -> Exception:
    """What a failure after connecting is for the Fetcher, in httpx's terms (the kind decides retries)."""
    if isinstance(exc, aiohttp.SocketTimeoutError):
        return httpx.ReadTimeout(str(exc))
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(str(exc))
    if any(_over_header_limits(e) for e in _causes(exc)):
        return HeadersTooLarge(f"response headers over the parser's limit ({HEADER_LIMITS})")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return httpx.RemoteProtocolError(f"peer closed connection without sending complete message body ({exc})")
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        return httpx.ReadError(str(exc) or type(exc).__name__)
    return httpx.RemoteProtocolError(str(exc) or type(exc).__name__)


def _causes(exc: BaseException | None) -> list[BaseException]:
    """`exc` and what caused it, in order (aiohttp wraps a parser error twice)."""
    chain: list[BaseException] = []
    while exc is not None and len(chain) < 8:
        chain.append(exc)
        exc = exc.__cause__
    return chain


def _over_header_limits(exc: BaseException) -> bool:
    return isinstance(exc, http_exceptions.LineTooLong) or (
        isinstance(exc, http_exceptions.BadHttpMessage) and "Too many headers" in str(exc)
    )


class HeadersTooLarge(httpx.RemoteProtocolError):
    """The server sent more header fields, or a longer header line, than the parser takes."""
