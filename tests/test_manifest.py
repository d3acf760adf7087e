from __future__ import annotations

import gzip
import io
import json
import sys

import pytest

from mmprep.errors import UsageError
from mmprep.manifest import BadLine, Record, check_readable, parse_line, read_manifests


def urls(items):
    return [(i.url, i.id) for i in items if isinstance(i, Record)]


@pytest.mark.parametrize(
    "line, expected",
    [
        ('{"url": "https://a/x.png"}', [("https://a/x.png", None)]),
        ('{"url": "https://a/x.png", "id": "k1"}', [("https://a/x.png", "k1")]),
        ('{"url": "https://a/x.png", "id": 7}', [("https://a/x.png", "7")]),
        ('{"image_url": "https://a/y.png"}', [("https://a/y.png", None)]),
        ('{"image_url": {"url": "https://a/z.png"}, "id": "z"}', [("https://a/z.png", "z")]),
        ('"https://a/bare.png"', [("https://a/bare.png", None)]),
    ],
)
def test_simple_forms(line, expected):
    assert urls(parse_line(line, "m.jsonl", 3)) == expected


def test_openai_batch_line_yields_every_image_part_with_numbered_ids():
    line = json.dumps(
        {
            "custom_id": "req-1",
            "method": "POST",
            "body": {
                "model": "x",
                "messages": [
                    {"role": "system", "content": "be nice"},
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "compare"},
                            {"type": "image_url", "image_url": {"url": "https://a/1.png"}},
                            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                        ],
                    },
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://a/3.png"}}]},
                ],
            },
        }
    )
    assert urls(parse_line(line, "m", 1)) == [
        ("https://a/1.png", "req-1:0"),
        ("data:image/png;base64,AAAA", "req-1:1"),
        ("https://a/3.png", "req-1:2"),
    ]


def test_bare_chat_request_and_text_only_request():
    bare = json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "https://a/b"}]}]})
    assert urls(parse_line(bare, "m", 1)) == [("https://a/b", None)]
    text_only = json.dumps({"messages": [{"role": "user", "content": "hello"}]})
    assert parse_line(text_only, "m", 1) == []  # no images: nothing to encode, not an error


@pytest.mark.parametrize(
    "line, fragment",
    [
        ("{not json", "invalid JSON"),
        ('{"url": 5}', "url must be a string"),
        ('{"url": ""}', "url is empty"),
        ('{"id": "x"}', "no image URL"),
        ("[1, 2]", "expected a JSON object or string"),
        ("42", "expected a JSON object or string"),
        ('{"url": "https://a", "id": [1]}', "id must be a string or integer"),
        ('{"image_url": {"uri": "x"}}', "image_url.url must be a string"),
        ('{"messages": "hi"}', "messages must be a list"),
        ('{"body": []}', "body must be an object"),
    ],
)
def test_malformed_lines_become_bad_lines_with_position(line, fragment):
    [bad] = parse_line(line, "m.jsonl", 12)
    assert isinstance(bad, BadLine)
    assert (bad.source, bad.line) == ("m.jsonl", 12)
    assert fragment in bad.message


def test_read_manifests_streams_files_gzip_and_blank_lines(tmp_path):
    plain = tmp_path / "a.jsonl"
    plain.write_text('{"url": "https://a/1"}\n\n   \n{bad\n"https://a/2"\n')
    packed = tmp_path / "b.jsonl.gz"
    packed.write_bytes(gzip.compress(b'{"url": "https://b/1"}\n'))
    items = list(read_manifests([str(plain), str(packed)]))
    assert [(type(i).__name__, i.source, i.line) for i in items] == [
        ("Record", str(plain), 1),
        ("BadLine", str(plain), 4),
        ("Record", str(plain), 5),
        ("Record", str(packed), 1),
    ]


def test_gzip_detected_by_magic_not_name(tmp_path):
    odd = tmp_path / "manifest.data"
    odd.write_bytes(gzip.compress(b'"https://x/1"\n'))
    assert urls(read_manifests([str(odd)])) == [("https://x/1", None)]


def test_stdin(monkeypatch):
    fake = io.TextIOWrapper(io.BytesIO(b'"https://s/1"\n{"url": "https://s/2"}\n'))
    monkeypatch.setattr(sys, "stdin", fake)
    assert urls(read_manifests(["-"])) == [("https://s/1", None), ("https://s/2", None)]


def test_check_readable(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        check_readable([str(tmp_path / "missing.jsonl")])
    with pytest.raises(UsageError, match="not a file"):
        check_readable([str(tmp_path)])
    check_readable(["-"])


@pytest.mark.parametrize(
    "line",
    ['{"url": "https://a/b.jpg"}', '{"url":"x","id":"7"}', '{ "url" : "ü" , "id" : "" }', '{"url": " "}',
     '{"url": "x", "id": 7}', '{"url": "a\\"b"}', '{"url": "a\\u0041"}', '{"id": "1", "url": "x"}',
     '{"url": "x", "url": "y"}', '{"url": "tab\there"}', '{"url": "x", "id": null}', '{"url": ""}'],
)  # fmt: skip
def test_plain_line_fast_path_reads_like_the_json_parser(tmp_path, line: str) -> None:
    """Lines in the plain form skip json.loads; every line must still read exactly as parse_line reads it."""
    path = tmp_path / "m.jsonl"
    path.write_text(line + "\n", encoding="utf-8")
    assert list(read_manifests([str(path)])) == parse_line(line, str(path), 1)


def test_invalid_utf8_is_a_bad_line_not_a_silently_changed_url(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"url": "https://e.com/\xff\xfe.jpg"}\n{"url": "https://e.com/caf\xc3\xa9.jpg"}\n')
    bad, good = list(read_manifests([str(path)]))
    assert isinstance(bad, BadLine) and bad.line == 1 and bad.message == "line is not valid UTF-8"
    assert good == Record("https://e.com/café.jpg", None, str(path), 2)


def test_an_overlong_line_is_refused_without_being_held_and_reading_goes_on(tmp_path, monkeypatch):
    import os

    import mmprep.manifest.source as manifest

    monkeypatch.setattr(manifest, "MAX_LINE_CHARS", 4096)
    path = tmp_path / "m.jsonl"
    binary = os.urandom(100_000).replace(b"\n", b"x").replace(b"\r", b"x")  # one 100 KB binary "line"
    path.write_bytes(b'"https://e.com/1.jpg"\n' + binary + b'\n"https://e.com/3.jpg"\n' + b"y" * 5000)
    items = list(read_manifests([str(path)]))
    assert [type(i).__name__ for i in items] == ["Record", "BadLine", "Record", "BadLine"]
    assert items[1].line == 2 and "longer than 4096 characters" in items[1].message
    assert items[2] == Record("https://e.com/3.jpg", None, str(path), 3) and items[3].line == 4


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ('{"url": "img/a.png", "id": "\\udcff"}', "id holds an unpaired surrogate"),
        ('{"url": "img/\\ud800.jpg"}', "url holds an unpaired surrogate"),
        ('{"url": "a.png", "id": ' + "7" * 4400 + "}", "Exceeds the limit (4300 digits)"),
        ("[" * 100_000, "RecursionError"),
    ],
)
def test_json_that_parses_to_unstorable_values_is_a_bad_line(line, fragment):
    """Each of these once stopped a whole run (exit 2) after work had started, or broke the cache."""
    [bad] = parse_line(line, "m.jsonl", 7)
    assert isinstance(bad, BadLine) and bad.line == 7 and fragment in bad.message


def test_a_byte_order_mark_on_the_first_line_is_ignored(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"url": "https://e.com/1.jpg"}\r\n{"url": "https://e.com/2.jpg"}\r\n')
    assert [r.url for r in read_manifests([str(path)])] == ["https://e.com/1.jpg", "https://e.com/2.jpg"]


@pytest.mark.parametrize("damage", ["truncated", "bad_crc"])
def test_a_damaged_gzip_manifest_yields_what_it_can_then_one_bad_line(tmp_path, damage):
    rows = "".join(json.dumps(f"https://e.com/{i}.jpg") + "\n" for i in range(40)).encode()
    data = bytearray(gzip.compress(rows))
    if damage == "truncated":
        data = data[:-30]
    else:
        data[-6] ^= 0xFF  # the CRC32 trailer
    path = tmp_path / "m.jsonl.gz"
    path.write_bytes(bytes(data))
    items = list(read_manifests([str(path)]))
    *records, last = items
    assert all(isinstance(r, Record) for r in records) and len(records) >= 20  # the readable part
    assert isinstance(last, BadLine) and "the rest of the manifest is unreadable" in last.message
    assert last.line == len(records) + 1


def test_lines_end_at_lf_only_whatever_the_endings_and_every_line_number_is_exact(tmp_path, monkeypatch):
    """A raw CR is JSON whitespace: it must not split a line (issue 15); CRLF and mixed endings still work."""
    lines = [
        b'{"url": "https://e.com/1.jpg",\r "id": "x"}',  # CR between tokens
        b'{"url":\r\r"https://e.com/2.jpg"}',  # several
        b"\r",  # a line holding only a CR: blank
        b'"https://e.com/4.jpg"\r',  # CRLF ending
        b'{"messages": [{"role": "user",\r"content": [{"type": "image_url", "image_url": "https://e.com/5.jpg"}]}]}',
        b"{bad\rjson}",  # still one bad line, not two
        b'{"url": "https://e.com/7.jpg"}\r',
        b'{"url": "https://e.com/8.jpg"}',
    ]
    data = b"\n".join(lines)  # mixed: LF, CRLF (the lines ending in \r) and no final newline
    expected = [
        ("Record", "https://e.com/1.jpg", 1), ("Record", "https://e.com/2.jpg", 2), ("Record", "https://e.com/4.jpg", 4),
        ("Record", "https://e.com/5.jpg", 5), ("BadLine", None, 6), ("Record", "https://e.com/7.jpg", 7),
        ("Record", "https://e.com/8.jpg", 8),
    ]  # fmt: skip
    path = tmp_path / "m.jsonl"
    path.write_bytes(data)
    packed = tmp_path / "m.jsonl.gz"
    packed.write_bytes(gzip.compress(data))
    for source in (path, packed):
        got = [(type(i).__name__, getattr(i, "url", None), i.line) for i in read_manifests([str(source)])]
        assert got == expected, source
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    assert [(type(i).__name__, getattr(i, "url", None), i.line) for i in read_manifests(["-"])] == expected


def test_surrounding_whitespace_is_stripped_from_urls_not_from_ids(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(
        '{"url": " https://e.com/1.jpg\\t", "id": " k "}\n{"url": "  /data/x.png "}\n"\\nhttps://e.com/3.jpg "\n'
    )
    assert [(r.url, r.id) for r in read_manifests([str(path)])] == [
        ("https://e.com/1.jpg", " k "),
        ("/data/x.png", None),
        ("https://e.com/3.jpg", None),
    ]


def batch_line(custom_id: str, body: dict, endpoint: str = "/v1/chat/completions") -> str:
    """One line of an OpenAI Batch API input file, in the documented key order."""
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": endpoint, "body": body})


def test_openai_batch_envelope_url_is_the_endpoint_never_an_image():
    chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "https://e.com/a.jpg", "detail": "low"}},
    ]}], "max_tokens": 10}  # fmt: skip
    assert urls(parse_line(batch_line("r1", chat), "b.jsonl", 1)) == [("https://e.com/a.jpg", "r1:0")]
    text_only = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    assert parse_line(batch_line("r2", text_only), "b.jsonl", 2) == []  # the endpoint is not taken as an image
    [bad] = parse_line(batch_line("r3", {"model": "x", "prompt": "hi"}, "/v1/completions"), "b.jsonl", 3)
    assert isinstance(bad, BadLine) and "neither messages (Chat Completions) nor input (Responses)" in bad.message


def test_responses_api_input_image_parts_bare_and_in_a_batch_line():
    body = {"model": "gpt-4.1", "input": [
        {"role": "user", "content": [
            {"type": "input_text", "text": "compare"},
            {"type": "input_image", "image_url": "https://e.com/1.jpg", "detail": "auto"},
            {"type": "input_image", "image_url": "data:image/png;base64,AAAA"},
        ]},
        {"type": "message", "role": "user", "content": [{"type": "input_image", "image_url": "https://e.com/3.jpg"}]},
    ]}  # fmt: skip
    expected = [("https://e.com/1.jpg", "q:0"), ("data:image/png;base64,AAAA", "q:1"), ("https://e.com/3.jpg", "q:2")]
    assert urls(parse_line(batch_line("q", body, "/v1/responses"), "b", 1)) == expected
    assert urls(parse_line(json.dumps(body), "b", 1)) == [(u, None) for u, _ in expected]  # a bare Responses body
    assert parse_line(json.dumps({"model": "x", "input": "just text"}), "b", 1) == []
    [bad] = parse_line(
        json.dumps({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}]}), "b", 4
    )
    assert (
        isinstance(bad, BadLine)
        and bad.message == "an input_image given by file_id cannot be fetched: give image_url instead"
    )
