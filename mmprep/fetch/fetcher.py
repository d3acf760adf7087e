"""Loading one URL's bytes: http(s) with limits and retries, data: URLs, and allowed local files."""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import io
import random
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
import httpx

from mmprep.version import __version__
from mmprep.errors import ErrorKind, RowError
from mmprep.fetch.codings import ACCEPT_ENCODING, BodyDecoder, parse_codings
from mmprep.fetch.local import read_file
from mmprep.fetch.policy import DataTarget, FileTarget, HttpTarget, UrlPolicy
from mmprep.fetch.transport import MAX_FIELD_SIZE, MAX_HEADERS, GuardedTransport, HeadersTooLarge
from mmprep.keys import display_url
from mmprep.settings import LoadSettings, MiB

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_RETRY_AFTER = 60.0  # seconds (and at most settings.timeout); a server asking for longer fails the row
SNIFF_BYTES = 512  # how much of an error page / text body is read for the message
FETCH_OVERHEAD = MiB  # decoder pieces and zlib windows, the parser's buffers, the request's own objects
MAX_VALIDATOR_CHARS = 1024  # longer ETag / Last-Modified values are not kept: each is stored with the entry
HEADER_OVERHEAD = (
    4 * MAX_HEADERS * MAX_FIELD_SIZE
)  # the largest header block the parser takes, held raw and parsed (~4 MiB)


def fetch_memory_bound(max_bytes: int, *, header_flood: bool = False) -> int:
    """The most one row's fetch holds at once (gzip/deflate; br/zstd add their windows): the body,
    grown in place (9/8: BytesIO's growth step), plus FETCH_OVERHEAD; docs/operations.md#limits-and-security."""
    return max_bytes * 9 // 8 + FETCH_OVERHEAD + (HEADER_OVERHEAD if header_flood else 0)


@dataclass(frozen=True)
class Fetched:
    """The bytes of one URL, and what the server said about them."""

    data: bytes  # the body (decoded transfer encoding), at most max_bytes
    url: str  # final URL after redirects (input URL for data:/file)
    content_type: str | None
    etag: str | None
    last_modified: str | None
    attempts: int  # 1 + retries used


@dataclass
class _HostSlot:
    """The per-host request cap, and how many requests hold or wait for it."""

    semaphore: asyncio.Semaphore
    users: int = 0


class Fetcher:
    """One per run: the URL policy, per-host limits, retries, and the transport every request goes through.

    Requests are httpx Requests handed straight to `GuardedTransport`: the Fetcher follows redirects,
    keeps no cookies and sets its own headers and deadline, so httpx's client layers (auth, redirects,
    cookie extraction, hooks) would cost CPU for nothing: about 0.15 ms a request (BENCHMARKS.md).
    """

    def __init__(self, settings: LoadSettings) -> None:
        self.settings = settings
        self.policy = UrlPolicy.from_settings(settings)
        self._host_slots: dict[str, _HostSlot] = {}  # only hosts with a request queued or in flight
        self._transport: GuardedTransport | None = None  # made on the first fetch: a cached rerun never pays for TLS
        self._headers = {
            "User-Agent": settings.user_agent or f"mmprep/{__version__}",
            "Accept-Encoding": ACCEPT_ENCODING,
        }
        self._timeouts = {  # per request, as httpx's client would pass them (the row's deadline is _attempt's)
            "connect": settings.connect_timeout,
            "read": settings.read_timeout,
            "write": settings.read_timeout,
            "pool": None,
        }

    @property
    def requests_sent(self) -> int:
        """HTTP requests that reached a connection (their headers went out), over the Fetcher's life."""
        return 0 if self._transport is None else self._transport.requests_sent

    def _transport_now(self) -> GuardedTransport:
        if self._transport is None:
            # The pool is as wide as the pipeline's fan-out, so a fetch never waits for a connection.
            self._transport = GuardedTransport(
                self.policy, max_connections=self.settings.concurrency, connect_timeout=self.settings.connect_timeout
            )
        return self._transport

    async def __aenter__(self) -> Fetcher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the transport and its connections (if a fetch ever made them)."""
        if self._transport is not None:
            await self._transport.aclose()
            self._transport = None

    async def fetch(self, url: str, *, etag: str | None = None, last_modified: str | None = None) -> Fetched | None:
        """Load `url`; None only when `etag`/`last_modified` were given and the server said 304.

        Raises RowError for anything that goes wrong, with `.attempts` set.
        """
        if self.policy.is_local(url):  # disk, or a data URL (possibly megabytes to decode): off the event loop
            return await asyncio.to_thread(self.fetch_local, url)
        target = self.policy.check_url(url)  # no I/O for http(s)
        assert isinstance(target, HttpTarget)  # is_local() said: neither a path nor a data URL
        return await self._fetch_http(target.url, _conditional_headers(etag, last_modified))

    def fetch_local(self, url: str) -> Fetched:
        """A local file or data URL (`policy.is_local`), checked and read on this (worker) thread; RowError if bad."""
        target = self.policy.check_url(url)
        if isinstance(target, DataTarget):
            return Fetched(target.data, url, target.media_type, None, None, attempts=1)
        assert isinstance(target, FileTarget)
        return Fetched(read_file(target.path, self.settings.max_bytes), url, None, None, None, attempts=1)

    async def _fetch_http(self, url: httpx.URL, headers: dict[str, str]) -> Fetched | None:
        """Try, and retry with backoff what may succeed later (timeouts, connection errors, 429, 5xx)."""
        attempt = 0
        while True:
            attempt += 1
            try:
                fetched = await self._attempt(url, headers)
                return None if fetched is None else dataclasses.replace(fetched, attempts=attempt)
            except RowError as error:
                error.attempts = attempt
                delay = self._retry_delay(error, attempt)
                if delay is None:
                    raise
            await asyncio.sleep(delay)

    def _retry_delay(self, error: RowError, attempt: int) -> float | None:
        """Seconds to wait before the next attempt, or None when there is none to make."""
        if not error.retryable or attempt > self.settings.retries:
            return None
        if isinstance(error, _StatusError) and error.retry_after is not None:
            longest = min(MAX_RETRY_AFTER, self.settings.timeout)
            return error.retry_after if error.retry_after <= longest else None
        return self.settings.retry_backoff * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)

    async def _attempt(self, url: httpx.URL, headers: dict[str, str]) -> Fetched | None:
        """One try, redirects included, under one deadline a slow-drip server cannot stretch."""
        try:
            async with asyncio.timeout(None) as deadline:  # armed once the first host slot is ours
                return await self._follow(url, headers, deadline)
        except TimeoutError:
            raise RowError(
                ErrorKind.TIMEOUT, f"no complete response within the {self.settings.timeout:g}s deadline"
            ) from None
        except httpx.RequestError as exc:
            raise self._request_error(exc) from None

    async def _follow(self, url: httpx.URL, headers: dict[str, str], deadline: asyncio.Timeout) -> Fetched | None:
        transport = self._transport_now()
        for _ in range(self.settings.max_redirects + 1):
            async with self._host_slot(url.host):
                if deadline.when() is None:  # time spent queueing for the host is not the row's
                    deadline.reschedule(asyncio.get_running_loop().time() + self.settings.timeout)
                request = httpx.Request(
                    "GET", url, headers={**self._headers, **headers}, extensions={"timeout": self._timeouts}
                )
                response = await transport.handle_async_request(request)
                response.request = request
                try:
                    fields = _fields(response)
                    next_url = self._redirect_target(response, fields.get("location"))
                    if next_url is None:
                        return await self._read(response, fields, conditional=bool(headers))
                finally:
                    await response.aclose()
            url = next_url
        raise RowError(
            ErrorKind.TOO_MANY_REDIRECTS,
            f"more than {self.settings.max_redirects} redirects (the last to {display_url(str(url))})",
        )

    def _redirect_target(self, response: httpx.Response, location: str | None) -> httpx.URL | None:
        """A redirect's vetted target (None when `response` is no redirect); RowError for a target we refuse."""
        if response.status_code not in REDIRECT_STATUSES or location is None:
            return None
        try:
            target = response.url.join(location)
        except (httpx.InvalidURL, ValueError):
            raise RowError(ErrorKind.BAD_SCHEME, f"redirected to an invalid URL {location[:200]!r}") from None
        try:
            return self.policy.check_http(target).url
        except RowError as error:
            raise RowError(error.kind, f"redirected to {display_url(str(target))}: {error.message}") from None

    async def _read(self, response: httpx.Response, fields: dict[str, str], *, conditional: bool) -> Fetched | None:
        """The body of a final response, if it is a success that may be an image."""
        if response.status_code == 304 and conditional:
            return None
        if not 200 <= response.status_code < 300:
            raise await _status_error(response, self.settings.max_bytes)
        content_type = fields.get("content-type")
        media_type = _media_type(content_type)
        if _is_text_type(media_type):
            snippet = _snippet(await _read_prefix(response, self.settings.max_bytes))
            raise RowError(ErrorKind.NOT_AN_IMAGE, f"server sent {media_type} instead of an image: {snippet!r}")
        limit = self.settings.max_bytes
        declared = _content_length(fields.get("content-length"))
        if declared is not None and declared > limit:
            raise RowError(ErrorKind.TOO_LARGE, f"Content-Length {declared:,} is over max_bytes={limit:,}")
        data = await _read_capped(response, limit)
        if _looks_like_markup(data) and media_type != "image/svg+xml":
            shown = f"{media_type} body" if media_type else "body"
            raise RowError(ErrorKind.NOT_AN_IMAGE, f"{shown} looks like HTML/JSON, not an image: {_snippet(data)!r}")
        return Fetched(
            data=data,
            url=str(response.url),
            content_type=content_type,
            etag=_validator(fields.get("etag")),
            last_modified=_validator(fields.get("last-modified")),
            attempts=1,
        )

    @asynccontextmanager
    async def _host_slot(self, host: str) -> AsyncIterator[None]:
        """Hold one of `host`'s settings.per_host request slots; a host's entry lives only while in use."""
        slot = self._host_slots.get(host)
        if slot is None:
            slot = self._host_slots[host] = _HostSlot(asyncio.Semaphore(self.settings.per_host))
        slot.users += 1
        try:
            async with slot.semaphore:
                yield
        finally:
            slot.users -= 1
            if slot.users == 0:  # nobody holds or waits for it: millions of hosts must not pile up
                del self._host_slots[host]

    def _request_error(self, exc: httpx.RequestError) -> RowError:
        """The row error for a failure below HTTP (connect, TLS, read, framing, timeouts)."""
        if isinstance(exc, httpx.ConnectTimeout):
            return RowError(ErrorKind.TIMEOUT, f"connecting took longer than {self.settings.connect_timeout:g}s")
        if isinstance(exc, httpx.ReadTimeout):
            return RowError(ErrorKind.TIMEOUT, f"the server sent nothing for {self.settings.read_timeout:g}s")
        if isinstance(exc, httpx.TimeoutException):
            return RowError(ErrorKind.TIMEOUT, str(exc) or type(exc).__name__)
        if isinstance(exc, HeadersTooLarge):  # the parser's limits on the header block: a bad server, not weather
            return RowError(ErrorKind.CONNECTION_ERROR, f"{exc} (stopped reading)", retryable=False)
        return RowError(ErrorKind.CONNECTION_ERROR, str(exc) or type(exc).__name__)


class _StatusError(RowError):
    """An http_status error that also carries the server's Retry-After, in seconds."""

    def __init__(self, message: str, *, status: int, retryable: bool, retry_after: float | None) -> None:
        super().__init__(ErrorKind.HTTP_STATUS, message, status=status, retryable=retryable)
        self.retry_after = retry_after


async def _status_error(response: httpx.Response, max_bytes: int) -> _StatusError:
    """The row error for an error status, naming the code and quoting an HTML error page."""
    status = response.status_code
    retryable = status == 429 or status >= 500
    message = f"HTTP {status} {response.reason_phrase}".rstrip()
    prefix = await _read_prefix(response, max_bytes)
    media_type = _media_type(response.headers.get("content-type"))
    if media_type == "text/html" or prefix.lstrip()[:1] == b"<":
        message += f" (an HTML page: {_snippet(prefix)!r})"
    retry_after = _retry_after(response.headers.get("retry-after")) if retryable else None
    if retry_after is not None:
        message += f"; Retry-After {retry_after:g}s"
    return _StatusError(message, status=status, retryable=retryable, retry_after=retry_after)


async def _read_capped(response: httpx.Response, limit: int) -> bytes:
    """The decoded body, failing once it passes `limit` bytes (see BodyDecoder: bombs stop early)."""
    body = io.BytesIO()  # grows in place: no second copy of the body at the end
    async with aclosing(_decoded(response, limit)) as pieces:
        async for piece in pieces:
            body.write(piece)
    return body.getvalue()


async def _read_prefix(response: httpx.Response, limit: int) -> bytes:
    """The first SNIFF_BYTES of the decoded body, for error messages (what decodes, if it breaks off)."""
    prefix = bytearray()
    try:
        async with aclosing(_decoded(response, limit)) as pieces:
            async for piece in pieces:
                prefix += piece
                if len(prefix) >= SNIFF_BYTES:
                    break
    except RowError:
        pass
    return bytes(prefix[:SNIFF_BYTES])


async def _decoded(response: httpx.Response, limit: int) -> AsyncIterator[bytes]:
    """The body with its content codings undone, piece by piece (RowError past `limit` or if it does not decode)."""
    codings = parse_codings(response.headers.get_list("content-encoding"))
    decoder = BodyDecoder(codings, limit)
    async with aclosing(response.aiter_raw()) as chunks:
        async for chunk in chunks:
            for piece in decoder.decode(chunk):
                yield piece
                if codings:  # one raw chunk may inflate to max_bytes: let the other rows run meanwhile
                    await asyncio.sleep(0)
    decoder.finish()


def _conditional_headers(etag: str | None, last_modified: str | None) -> dict[str, str]:
    """If-None-Match / If-Modified-Since for what an earlier run stored (skipping unsendable values)."""
    headers = {}
    if etag and _sendable(etag):
        headers["If-None-Match"] = etag
    if last_modified and _sendable(last_modified):
        headers["If-Modified-Since"] = last_modified
    return headers


def _validator(value: str | None) -> str | None:
    """An ETag / Last-Modified worth keeping: a server cannot make every index row and shard header carry 100 KiB."""
    return value if value is not None and len(value) <= MAX_VALIDATOR_CHARS else None


def _sendable(value: str) -> bool:
    return value.isascii() and value.isprintable()


def _media_type(content_type: str | None) -> str | None:
    """`image/png` from `image/png; charset=...`; None when there is no Content-Type."""
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    return media_type or None


def _is_text_type(media_type: str | None) -> bool:
    """Whether a Content-Type says the body is a page or a document rather than an image."""
    if media_type is None:
        return False
    return (
        media_type.startswith("text/")
        or media_type in ("application/json", "application/xml", "application/xhtml+xml")
        or media_type.endswith("+json")
    )


def _looks_like_markup(data: bytes) -> bool:
    """Whether a body starts like HTML, XML or JSON (no image format starts with `<`, `{` or `[`)."""
    head = data[:64].removeprefix(b"\xef\xbb\xbf").lstrip()
    return head[:1] in (b"<", b"{", b"[")


def _snippet(body: bytes, limit: int = 160) -> str:
    """A one-line excerpt of a text body for an error message."""
    text = " ".join(body[: limit * 4].decode("utf-8", "replace").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _fields(response: httpx.Response) -> dict[str, str]:
    """Header fields by lower-case name, repeated ones joined with ", " (as `Headers.get`), decoded in one pass."""
    encoding = response.headers.encoding
    fields: dict[str, str] = {}
    for name, value in response.headers.raw:
        key, text = name.decode(encoding).lower(), value.decode(encoding)
        fields[key] = f"{fields[key]}, {text}" if key in fields else text
    return fields


def _content_length(value: str | None) -> int | None:
    value = value or ""
    return int(value) if value.isascii() and value.isdigit() else None


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds, from either form (delta-seconds or an HTTP date); None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())
