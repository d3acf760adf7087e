"""`mmprep check`: the loader alone, against a real local server."""

from __future__ import annotations

import json

from conftest import image_bytes
from _cli import NET, cli, write_manifest


def test_check_reports_rows_by_outcome_and_writes_no_cache(tmp_path, image_server, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = [image_server.add(f"/{i}.png", image_bytes("RGB", (30 + i, 30), "PNG", i)) for i in range(4)]
    html = image_server.add("/page.png", b"<!DOCTYPE html><html>login</html>", "text/html")
    rows = good + [good[0], html, image_server.url("/missing.png"), "{broken"]
    manifest = write_manifest(tmp_path / "m.jsonl", rows)
    result = cli("check", manifest, *NET, "--model", "builtin:tiny-clip", "--json", "--progress", "none")
    assert result.exit_code == 1
    s = json.loads(result.stdout)
    assert (s["rows"], s["ok"], s["failed"], s["duplicates"]) == (8, 4, 3, 1)
    assert s["failures_by_kind"] == {"bad_manifest_line": 1, "http_status": 1, "not_an_image": 1}
    assert s["images_per_s"] > 0 and s["bytes_per_s"] > 0
    records = [json.loads(line) for line in (tmp_path / "mmprep-check-errors.jsonl").read_text().splitlines()]
    assert sorted(r["kind"] for r in records) == ["bad_manifest_line", "http_status", "not_an_image"]
    assert not (tmp_path / "mmprep-cache").exists()  # check never writes a cache


def test_check_with_size_and_all_good_rows_exits_zero(tmp_path, image_server):
    urls = [image_server.add(f"/{i}.jpg", image_bytes("RGB", (64, 48), "JPEG", i), "image/jpeg") for i in range(3)]
    manifest = write_manifest(tmp_path / "m.jsonl", urls)
    errors = tmp_path / "e.jsonl"
    result = cli("check", manifest, *NET, "--size", "32x32", "--errors", str(errors), "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["ok"] == 3 and errors.read_text() == ""
    bad = cli("check", manifest, "--size", "32by32")
    assert bad.exit_code == 2


def test_fast_decode_flag_on_check_and_encode(tmp_path, image_server):
    """--fast-decode is accepted by both commands and still loads/encodes every row."""
    urls = [image_server.add(f"/big{i}.jpg", image_bytes("RGB", (400, 300), "JPEG", i), "image/jpeg") for i in range(3)]
    manifest = write_manifest(tmp_path / "m.jsonl", urls)
    checked = cli(
        "check", manifest, *NET, "--size", "32x32", "--fast-decode", "--errors", str(tmp_path / "e.jsonl"), "--json"
    )
    assert checked.exit_code == 0 and json.loads(checked.stdout)["ok"] == 3
    encoded = cli("encode", manifest, *NET, "--model", "builtin:tiny-clip", "--out", str(tmp_path / "c"),
                      "--fast-decode", "--json", "--progress", "none")  # fmt: skip
    assert encoded.exit_code == 0 and json.loads(encoded.stdout)["encoded"] == 3
