"""The URL policy: address notations, ranges, escape hatches, and fuzzing of the parsers."""

from __future__ import annotations

import base64
import ipaddress
import socket
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmprep.errors import ErrorKind, RowError
from mmprep.fetch import DataTarget, FileTarget, HttpTarget, UrlPolicy
from mmprep.fetch.addresses import blocked_range, parse_ip
from mmprep.fetch.dataurl import parse_data_url
from mmprep.settings import LoadSettings


def kind_of(policy: UrlPolicy, url: str) -> ErrorKind | None:
    """The error kind `check_url` raises, or None when the URL passes."""
    try:
        policy.check_url(url)
    except RowError as error:
        return error.kind
    return None


DEFAULT = UrlPolicy(allow_http=True)

BLOCKED_HOSTS = {
    "2130706433": "loopback",  # decimal
    "0177.1": "loopback",  # octal, short form
    "0x7f.1": "loopback",  # hex, short form
    "0x7f000001": "loopback",
    "127.1": "loopback",
    "127.0.0.1": "loopback",
    "[::ffff:127.0.0.1]": "loopback",  # IPv4-mapped
    "[::127.0.0.1]": "loopback",  # IPv4-compatible
    "[2002:7f00:1::]": "loopback",  # 6to4 around 127.0.0.1
    "[64:ff9b::a9fe:a9fe]": "cloud metadata",  # NAT64 around 169.254.169.254
    "[2001:0:4136:e378:8000:63bf:3fff:fdd2]": "private",  # Teredo, client 192.0.2.45
    "[::1]": "loopback",
    "[fe80::1%25eth0]": "link-local",  # zone id
    "0.0.0.0": "unspecified",
    "0": "unspecified",
    "10.1.2.3": "private",
    "172.16.0.1": "private",
    "192.168.1.1": "private",
    "[fd12::1]": "private",  # unique local
    "100.64.0.1": "carrier-grade NAT",
    "169.254.169.254": "cloud metadata",
    "169.254.1.1": "link-local",
    "[fd00:ec2::254]": "cloud metadata",
    "224.0.0.1": "multicast",
    "[ff02::1]": "multicast",
    "240.0.0.1": "reserved",
    "255.255.255.255": "reserved",
    "[::ffff:93.184.216.34]": "IPv4-mapped",  # a public v4 in a mapped address: still refused
    "localhost": "loopback",
    "localhost.": "loopback",
    "LOCALHOST": "loopback",
    "img.localhost": "loopback",
    "metadata.google.internal": "cloud metadata",
    "METADATA.google.internal.": "cloud metadata",
    "metadata": "cloud metadata",
}


@pytest.mark.parametrize(("host", "reason"), BLOCKED_HOSTS.items())
def test_blocked_notations(host: str, reason: str) -> None:
    for scheme in ("http", "https"):
        with pytest.raises(RowError) as caught:
            DEFAULT.check_url(f"{scheme}://{host}:8080/cat.png")
        assert caught.value.kind is ErrorKind.BLOCKED_URL
        assert reason in caught.value.message


def test_dotted_octal_is_refused_by_the_http_client_parser() -> None:
    # httpx will not parse `0177.0.0.1` at all, so it can never be requested; the row says why.
    with pytest.raises(RowError) as caught:
        DEFAULT.check_url("http://0177.0.0.1/cat.png")
    assert caught.value.kind is ErrorKind.BAD_SCHEME and "Invalid IPv4 address" in caught.value.message


@pytest.mark.parametrize(
    "host",
    [
        "93.184.216.34",
        "[2606:2800:220:1::]",
        "example.com",
        "images.example.org.",
        "[64:ff9b::5db8:d822]",
        "[2002:5db8:d822::1]",
        "xn--bcher-kva.example",
        "bücher.example",
        "1.1.1.1",
    ],
)
def test_public_destinations_pass(host: str) -> None:
    target = DEFAULT.check_url(f"https://{host}/cat.png")
    assert isinstance(target, HttpTarget)
    assert target.url == httpx.URL(f"https://{host}/cat.png")


def test_https_passes_without_allow_http_and_http_does_not() -> None:
    strict = UrlPolicy()
    assert isinstance(strict.check_url("https://example.com/cat.png"), HttpTarget)
    assert kind_of(strict, "http://example.com/cat.png") is ErrorKind.BAD_SCHEME
    assert kind_of(strict, "HTTPS://EXAMPLE.COM/cat.png") is None


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("", ErrorKind.BAD_SCHEME),
        ("ftp://example.com/cat.png", ErrorKind.BAD_SCHEME),
        ("javascript:alert(1)", ErrorKind.BAD_SCHEME),
        ("gopher://example.com:70/_GET", ErrorKind.BAD_SCHEME),
        ("cat.png", ErrorKind.BAD_PATH),  # a relative path, and no local directory is allowed
        ("../cat.png", ErrorKind.BAD_PATH),
        ("https://", ErrorKind.BAD_SCHEME),
        ("https:cat.png", ErrorKind.BAD_SCHEME),
        ("https://exa mple.com:99999999/", ErrorKind.BAD_SCHEME),
        ("data:text/html;base64,PGgxPg==", ErrorKind.BAD_DATA_URL),
        ("/etc/passwd", ErrorKind.BAD_PATH),
        ("file:///etc/passwd", ErrorKind.BAD_PATH),
        ("https://xn--/x.jpg", ErrorKind.BAD_SCHEME),  # a malformed IDNA A-label (was internal_error mid-request)
    ],
)
def test_classification_errors(url: str, kind: ErrorKind) -> None:
    assert kind_of(DEFAULT, url) is kind


def test_targets_by_scheme(tmp_path: Path) -> None:
    (tmp_path / "cat.png").write_bytes(b"png")
    policy = UrlPolicy(allow_local_dirs=(tmp_path,))
    assert policy.check_url(f"file://{tmp_path}/cat.png") == FileTarget(str((tmp_path / "cat.png").resolve()))
    assert policy.check_url("data:IMAGE/PNG;BASE64,cG5n") == DataTarget("image/png", b"png")


def test_allow_private_network_opens_private_ranges_only() -> None:
    private = UrlPolicy(allow_http=True, allow_private_network=True)
    for host in ["10.1.2.3", "127.0.0.1", "[::1]", "localhost", "100.64.0.1", "169.254.1.1", "[::ffff:10.0.0.1]"]:
        assert kind_of(private, f"http://{host}/") is None, host
    for host in ["169.254.169.254", "metadata.google.internal", "224.0.0.1", "0.0.0.0", "[::ffff:93.184.216.34]"]:
        assert kind_of(private, f"http://{host}/") is ErrorKind.BLOCKED_URL, host


def test_allow_hosts_opens_exactly_what_it_names() -> None:
    policy = UrlPolicy(allow_http=True, allow_hosts=("127.0.0.1", "images.internal", "10.8.0.0/16"))
    assert kind_of(policy, "http://127.0.0.1:8000/cat.png") is None
    assert kind_of(policy, "http://2130706433/cat.png") is None  # the same address, another notation
    assert kind_of(policy, "http://10.8.3.4/cat.png") is None
    for url in [
        "http://127.0.0.2/",
        "http://[::1]/",
        "http://localhost/",
        "http://10.9.0.1/",
        "http://[::ffff:127.0.0.1]/",
    ]:
        assert kind_of(policy, url) is ErrorKind.BLOCKED_URL, url
    policy.check_address("images.internal", ipaddress.ip_address("10.0.0.5"))  # an allowed name may resolve privately
    with pytest.raises(RowError, match=r"other.internal resolves to 10.0.0.5, which is private"):
        policy.check_address("other.internal", ipaddress.ip_address("10.0.0.5"))


def test_deny_hosts_wins_over_everything() -> None:
    policy = UrlPolicy(
        allow_http=True,
        allow_private_network=True,
        allow_hosts=("evil.example", "10.0.0.1"),
        deny_hosts=("Evil.Example.", "10.0.0.1", "203.0.113.0/24"),
    )
    for url in [
        "https://evil.example/x",
        "https://EVIL.example./x",
        "http://10.0.0.1/",
        "http://[::ffff:10.0.0.1]/",
        "http://203.0.113.9/",
    ]:
        error = pytest.raises(RowError, policy.check_url, url).value
        assert (error.kind, "deny list" in error.message) == (ErrorKind.BLOCKED_URL, True), url
    with pytest.raises(RowError, match="deny list"):
        policy.check_address("cdn.example", ipaddress.ip_address("203.0.113.7"))
    assert kind_of(policy, "https://good.example/x") is None


def test_from_settings() -> None:
    s = LoadSettings(allow_http=True, allow_hosts=("127.0.0.1",), deny_hosts=("bad.example",), max_bytes=10)
    policy = UrlPolicy.from_settings(s)
    assert kind_of(policy, "http://127.0.0.1/") is None
    assert kind_of(policy, "https://bad.example/") is ErrorKind.BLOCKED_URL
    assert kind_of(policy, "data:image/png;base64," + base64.b64encode(b"x" * 11).decode()) is ErrorKind.TOO_LARGE


# ---------------------------------------------------------------- properties

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
PREFIXES = ["", "http://", "https://", "data:", "data:image/png;base64,", "file://", "file:///", "/", "HTTP://["]


@FUZZ
@given(prefix=st.sampled_from(PREFIXES), rest=st.text())
def test_check_url_raises_only_row_errors(tmp_path: Path, prefix: str, rest: str) -> None:
    policy = UrlPolicy(allow_http=True, allow_local_dirs=(tmp_path,), allow_hosts=("127.0.0.1",))
    try:
        target = policy.check_url(prefix + rest)
    except RowError as error:
        assert error.message
        return
    assert isinstance(target, (HttpTarget, DataTarget, FileTarget))
    if isinstance(target, HttpTarget):  # whatever passed has a host httpx will dial, and it was vetted
        assert target.url.host and target.url.scheme in ("http", "https")


@FUZZ
@given(data=st.binary(min_size=1, max_size=4096), subtype=st.sampled_from(["png", "jpeg", "webp", "x-custom"]))
def test_data_url_roundtrip(data: bytes, subtype: str) -> None:
    decoded = parse_data_url(f"data:image/{subtype};base64,{base64.b64encode(data).decode()}", max_bytes=4096)
    assert (decoded.media_type, decoded.data) == (f"image/{subtype}", data)


@FUZZ
@given(payload=st.text(alphabet="ABCDEFGHabcdefgh0123456789+/=-_ \n%", max_size=64))
def test_data_url_accepts_exactly_canonical_base64(payload: str) -> None:
    try:
        expected: bytes | None = base64.b64decode(payload, validate=True)
    except ValueError:
        expected = None
    try:
        got: bytes | None = parse_data_url(f"data:image/png;base64,{payload}", max_bytes=1024).data
    except RowError as error:
        assert error.kind is ErrorKind.BAD_DATA_URL
        got = None
    assert got == (expected or None)


@FUZZ
@given(number=st.integers(0, 2**32 - 1))
def test_ipv4_notations_agree_with_the_socket_layer(number: int) -> None:
    ip = ipaddress.IPv4Address(number)
    a, b, c, d = ip.packed
    notations = [str(number), hex(number), f"{a}.{(b << 16) | (c << 8) | d}", f"0{a:o}.{b}.{c}.0x{d:x}"]
    for notation in notations:
        assert socket.inet_aton(notation) == ip.packed
        assert parse_ip(notation) == ip, notation
        verdict = kind_of(DEFAULT, f"http://{notation}/")
        assert verdict is (None if blocked_range(ip) is None else ErrorKind.BLOCKED_URL), notation
