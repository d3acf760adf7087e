"""What the fetch tests share: settings for loopback servers, one-shot fetches, a self-signed certificate.

The server itself is tests/_http.py (re-exported here for the fetch tests' imports)."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from _http import PNG, Handler, LocalServer, Seen, image, not_found, png_bytes, redirect, serve  # noqa: F401 (re-exported)
from mmprep.errors import RowError
from mmprep.fetch import Fetched, Fetcher
from mmprep.settings import LoadSettings

T = TypeVar("T")


def settings(**overrides: Any) -> LoadSettings:
    """Settings for tests against local servers: http and 127.0.0.1 allowed explicitly, no retry wait."""
    base: dict[str, Any] = dict(allow_http=True, allow_hosts=("127.0.0.1",), retries=0, retry_backoff=0.01, timeout=5.0)
    return LoadSettings(**{**base, **overrides})


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def _fetch(s: LoadSettings, url: str, **kwargs: Any) -> tuple[Fetched | None, Fetcher]:
    async with Fetcher(s) as fetcher:
        return await fetcher.fetch(url, **kwargs), fetcher


def fetch(s: LoadSettings, url: str, **kwargs: Any) -> Fetched | None:
    """Fetch one URL with a fresh Fetcher."""
    return run(_fetch(s, url, **kwargs))[0]


def fetch_error(s: LoadSettings, url: str, **kwargs: Any) -> RowError:
    """The RowError fetching `url` raises (fails the test if it succeeds)."""
    try:
        result = fetch(s, url, **kwargs)
    except RowError as error:
        return error
    raise AssertionError(f"expected a RowError, got {result!r}")


def self_signed_cert(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for `name` and 127.0.0.1 (cert path, key path), made with `cryptography`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path
